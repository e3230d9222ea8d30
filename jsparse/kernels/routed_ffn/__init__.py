"""The routed (neuron-grouped) squared-ReLU FFN: public op (api.py), masked-dense reference, padded-einsum and
``lax.ragged_dot`` baselines, token layouts, and the grouped-GEMM path on the Mosaic GPU kernels."""
