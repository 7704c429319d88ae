"""Scaled dot-product attention as pure JAX functions (no flax, no flags, no prints).

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads (K divides N; G = N // K query heads share one key/value
head), H head dim, D model dim.

Modules, whose imports run one way (masks <- inputs <- {core, chunked} <- api
<- projections):

- `masks`: causal, sliding-window and padding masks, `combine_masks`;
- `inputs`: the argument checks and the checked inputs (`Inputs`);
- `core`: float32 masked softmax, the single-head core and its vmap over heads
  and batch (the materialized "xla" path);
- `blocks`, `flash_forward`, `flash_backward`, `chunked`: the memory-efficient
  (flash-style) path with its own derivatives (a blockwise JVP and backward);
- `api`: `dot_product_attention`, `attention_weights`, `chunked_attention`;
- `ring`: `ring_attention`, the sequence split over a mesh axis, on the
  chunked kernel;
- `context`: a model's attention with its sequence split over a mesh axis
  (all-gather or ring, the zig-zag order), for training (`config.mesh.seq`);
- `projections`: Q/K/V and output projections, `init_attention_params`,
  functional `multi_head_attention`.
"""

from kit.attention import mods
from kit.attention.api import attention_weights, chunked_attention, dot_product_attention
from kit.attention.core import attention_logits, masked_softmax, single_head_attention
from kit.attention.flex import (
    BlockMask,
    and_masks,
    create_block_mask,
    flex_attention,
    or_masks,
)
from kit.attention.masks import (
    MASK_VALUE,
    causal_mask,
    combine_masks,
    local_window_mask,
    padding_mask,
)
from kit.attention.projections import (
    ablate_heads,
    head_value_norms,
    init_attention_params,
    multi_head_attention,
    project_heads,
    project_output,
    project_qkv,
)
from kit.attention.ring import ring_attention

__all__ = [
    "MASK_VALUE",
    "BlockMask",
    "ablate_heads",
    "and_masks",
    "attention_logits",
    "attention_weights",
    "causal_mask",
    "chunked_attention",
    "combine_masks",
    "create_block_mask",
    "dot_product_attention",
    "flex_attention",
    "head_value_norms",
    "init_attention_params",
    "local_window_mask",
    "masked_softmax",
    "mods",
    "multi_head_attention",
    "or_masks",
    "padding_mask",
    "project_heads",
    "project_output",
    "project_qkv",
    "ring_attention",
    "single_head_attention",
]
