"""Flax NNX modules: dense and sparse FFNs, and a Llama-style decoder LM.

```python
from jsparse import models
cfg = models.preset("tiny", ffn=models.FFNConfig(kind="sparse", activation_sparsity="2:4"))
model = models.Transformer(cfg, rngs=nnx.Rngs(0))
logits_BxLxV = model(tokens_BxL)
models.set_sparse(model, False)            # dense warm-up / final dense phase
models.prepare_sparse_phase(model, tokens_BxL)
stats = models.collect_stats(model)         # {"layer0/act_density": ..., ...}
```
"""

from jsparse.models._ops import CHECKPOINT_NAMES as CHECKPOINT_NAMES
from jsparse.models.config import FFNConfig as FFNConfig
from jsparse.models.config import TransformerConfig as TransformerConfig
from jsparse.models.ffn import SquaredReLUFFN as SquaredReLUFFN
from jsparse.models.ffn import SwiGLUFFN as SwiGLUFFN
from jsparse.models.ffn import swiglu_matched_d_ff as swiglu_matched_d_ff
from jsparse.models.phases import after_optimizer_step as after_optimizer_step
from jsparse.models.phases import group_weights as group_weights
from jsparse.models.phases import prepare_sparse_phase as prepare_sparse_phase
from jsparse.models.phases import set_sparse as set_sparse
from jsparse.models.phases import set_stats as set_stats
from jsparse.models.presets import PRESETS as PRESETS
from jsparse.models.presets import preset as preset
from jsparse.models.recipe import RecipeSpec as RecipeSpec
from jsparse.models.recipe import n_dense_features as n_dense_features
from jsparse.models.recipe import sparse_ffn as sparse_ffn
from jsparse.models.sparse_ffn import SparseFFN as SparseFFN
from jsparse.models.sparse_ffn import SparsityState as SparsityState
from jsparse.models.sste import sste_weight as sste_weight
from jsparse.models.stats import collect_stats as collect_stats
from jsparse.models.transformer import Transformer as Transformer
