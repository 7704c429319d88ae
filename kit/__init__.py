"""kit: a JAX/Flax research kit for self-attention."""

from kit.attention import (
    MASK_VALUE,
    attention_logits,
    attention_weights,
    causal_mask,
    chunked_attention,
    combine_masks,
    dot_product_attention,
    init_attention_params,
    local_window_mask,
    masked_softmax,
    multi_head_attention,
    padding_mask,
    project_heads,
    project_output,
    project_qkv,
    single_head_attention,
)

__all__ = [
    "MASK_VALUE",
    "attention_logits",
    "attention_weights",
    "causal_mask",
    "chunked_attention",
    "combine_masks",
    "dot_product_attention",
    "init_attention_params",
    "local_window_mask",
    "masked_softmax",
    "multi_head_attention",
    "padding_mask",
    "project_heads",
    "project_output",
    "project_qkv",
    "single_head_attention",
]
