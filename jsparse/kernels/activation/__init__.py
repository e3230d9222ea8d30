"""Fused squared-ReLU + N:M selection for the FFN activation path."""
