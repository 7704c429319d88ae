"""Memory-efficient (flash-style) attention in pure JAX, with its own VJP.

Queries and keys/values are processed in blocks with an online softmax
(running max m and sum l), so no `[T, S]` array is ever formed; the backward
pass recomputes each block's scores from the saved log-sum-exp, so the
residuals are O(T), not O(T * S). Blocks wholly outside a causal or window
mask, or wholly beyond the sequence lengths, are skipped by the loop bounds,
not computed and masked; where the causal structure is the only mask, a block
on the diagonal computes only its rows that can be live.

Semantics are those of `kit.dot_product_attention` (see `kit.attention`):
float32 scores and softmax statistics, a finite mask value, and exactly zero
output with zero gradients for query rows with no live key.

The kernel works on one example at a time (`lax.map` over the example
indices), with all its K key/value heads, each with G = N // K query heads,
together. It reads the inputs in their own `[B, T, N, H]` layout and writes
the outputs in it: each block is read straight from the whole input and
brought into the products' head-major layout on its own, so no transposed
copy of an example, let alone of a whole array, is made.

References:
  Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory", 2021.
  Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
  IO-Awareness", 2022. Dao, "FlashAttention-2", 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kit.attention import MASK_VALUE, prepare_inputs

Array = jax.Array

DEFAULT_UNITS_PER_STEP = 8


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static options: one compiled loop per distinct config."""

    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    block_q: int
    block_k: int
    num_q_blocks: int
    num_k_blocks: int
    # True when nothing but the causal structure masks anything (no user mask,
    # lengths, window or padding): blocks wholly below the diagonal then skip
    # the mask arithmetic, and loop bounds do not depend on the lengths.
    structural_only: bool
    units_per_step: int
    # The backward pass's (block_q, block_k); the padded lengths are multiples of both.
    backward_blocks: tuple[int, int]

    def for_backward(self) -> _Config:
        bq, bk = self.backward_blocks
        return dataclasses.replace(
            self,
            block_q=bq,
            block_k=bk,
            num_q_blocks=self.num_q_blocks * self.block_q // bq,
            num_k_blocks=self.num_k_blocks * self.block_k // bk,
        )


def default_block_sizes(
    query_length: int, key_length: int, *, backward: bool = False
) -> tuple[int, int]:
    """Block sizes `(block_q, block_k)` chosen from the lengths.

    Of 128-1024 query/key blocks with 1-32 units per step, the forward pass
    measured fastest with 512 x 256 and 8 units, and the backward (whose
    blocks are `[block_k, block_q]`, keys as rows) with 256 x 512, for causal
    attention at B=4, T=2048, N=8, H=64 on a 2-core CPU. Short sequences use
    one block rounded up to a multiple of 8.
    """
    max_q, max_k = (256, 512) if backward else (512, 256)
    return min(max_q, -(-query_length // 8) * 8), min(max_k, -(-key_length // 8) * 8)


# --------------------------------------------------------------------------
# One example b: its K key/value heads, each with G query heads. The kernel
# reads its blocks from the whole inputs in their own layout, q `[B, Tp, N, H]`
# and k, v `[B, Sp, K, H]`, and brings each block into head-major `[K, ...]`
# layout, where a query's G heads are consecutive rows: a query block is
# `[K, bq * G, H]` in (position, head) order. Bias and mask come per example,
# `[K|1, G|1, Tp|1, Sp|1]`, and the lengths as scalars.


def _slice(x: Array | None, start: Array, size: int, axis: int) -> Array | None:
    """The block [start, start + size) of `x` along `axis`, or `x` if it broadcasts there."""
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _swap01(x: Array) -> Array:
    """Swaps the two leading axes, as a transpose with no size-1 axes: XLA:CPU
    transposes with size-1 axes (G = 1, say) several times slower."""
    a, b, *rest = x.shape
    if a == 1 or b == 1:
        return x.reshape(b, a, *rest)
    n = math.prod(rest)
    return jnp.swapaxes(x.reshape(a, b, n) if n > 1 else x.reshape(a, b), 0, 1).reshape(b, a, *rest)


def _head_major(x: Array, K: int) -> Array:
    """`[T, K * G, H]` -> `[K, T * G, H]`."""
    T, N, H = x.shape
    return _swap01(x.reshape(T, K, N // K * H)).reshape(K, -1, H)


def _position_major(x: Array, T: int) -> Array:
    """`[K, T * G, H]` -> `[T, K * G, H]`, the inverse of `_head_major`."""
    K, _, H = x.shape
    return _swap01(x.reshape(K, T, -1)).reshape(T, -1, H)


def _rows(x: Array | None, G: int, bq: int) -> Array | None:
    """`[K|1, G|1, bq|1, bk|1]` -> `[K|1, bq * G|1, bk|1]`: the forward's flattened rows."""
    if x is None:
        return None
    if x.shape[1:3] == (1, 1):
        return x[:, 0]
    x = jnp.swapaxes(x, 1, 2)  # [K|1, bq|1, G|1, bk|1]
    return jnp.broadcast_to(x, (x.shape[0], bq, G, x.shape[3])).reshape(x.shape[0], bq * G, -1)


def _pair_live(cfg, t: Array, s: Array, q_len, kv_len) -> Array:
    """bool: may query position t attend to key position s (broadcasting)?"""
    live = (t < q_len) & (s < kv_len)
    if cfg.is_causal:
        live = live & (s <= t)
    if cfg.window is not None:
        left, right = cfg.window
        live = live & (s >= t - left) & (s <= t + right)
    return live


def _positions(start: Array, size: int) -> Array:
    return start + jnp.arange(size, dtype=jnp.int32)


def _live(cfg, i, j, q_len, kv_len, mask_blk, first=0) -> Array:
    """bool `[K|1, G|1, bq - first, bk]`: which (query, key) pairs of block (i, j)
    may attend, for the block's queries from `first` on (default all)."""
    t = _positions(i * cfg.block_q + first, cfg.block_q - first)[:, None]
    s = _positions(j * cfg.block_k, cfg.block_k)[None, :]
    live = _pair_live(cfg, t, s, q_len, kv_len)[None, None]
    return live if mask_blk is None else live & mask_blk


def _kv_range(cfg, i, q_len, kv_len) -> tuple[Array, Array, Array]:
    """Key blocks for query block i: [lo, full) need no mask, [full, hi) do."""
    first_t = i * cfg.block_q
    last_t = first_t + cfg.block_q - 1
    lo, hi = jnp.int32(0), jnp.int32(cfg.num_k_blocks)
    if cfg.is_causal:
        hi = jnp.minimum(hi, last_t // cfg.block_k + 1)
    if cfg.structural_only:
        full = jnp.minimum(hi, (first_t + 1) // cfg.block_k) if cfg.is_causal else hi
        return lo, full, hi
    hi = jnp.minimum(hi, -(-kv_len // cfg.block_k))
    if cfg.window is not None:
        left, right = cfg.window
        lo = jnp.maximum(lo, (first_t - left) // cfg.block_k)
        hi = jnp.minimum(hi, (last_t + right) // cfg.block_k + 1)
    hi = jnp.maximum(jnp.where(first_t < q_len, hi, lo), lo)  # padding queries do nothing
    return lo, lo, hi


def _q_range(cfg, j, q_len, kv_len) -> tuple[Array, Array, Array]:
    """Query blocks for key block j: [lo, full) need a mask, [full, hi) do not."""
    first_s = j * cfg.block_k
    last_s = first_s + cfg.block_k - 1
    lo, hi = jnp.int32(0), jnp.int32(cfg.num_q_blocks)
    if cfg.is_causal:
        lo = jnp.maximum(lo, first_s // cfg.block_q)
    if cfg.structural_only:
        full = jnp.maximum(lo, -(-last_s // cfg.block_q)) if cfg.is_causal else lo
        return lo, jnp.minimum(full, hi), hi
    hi = jnp.minimum(hi, -(-q_len // cfg.block_q))
    if cfg.window is not None:
        left, right = cfg.window
        lo = jnp.maximum(lo, (first_s - right) // cfg.block_q)
        hi = jnp.minimum(hi, (last_s + left) // cfg.block_q + 1)
    hi = jnp.maximum(jnp.where(first_s < kv_len, hi, lo), lo)
    return lo, hi, hi


def _example_forward(cfg, b, q, k, v, bias, mask, q_len, kv_len):
    """Returns example b's out `[Tp, N, H]` (q's dtype) and lse `[K, Tp * G]` (float32).

    Each query block's G heads are flattened into bq * G rows, so that a block
    is one `[bq * G, H] x [H, bk]` product per key/value head and the softmax
    works on plain rows. Masked pairs get a -inf logit inside the block: their
    exponential is exactly 0, and since the running max starts at the finite
    MASK_VALUE, a row with no live key so far stays at m = MASK_VALUE, l = 0.
    """
    _, Tp, N, H = q.shape
    K = k.shape[2]
    G = N // K
    bq, bk = cfg.block_q, cfg.block_k
    scale = jnp.float32(cfg.scale)

    # In float32 the scale goes into the query block (one pass per query block):
    # scaling each score block instead makes XLA keep a scaled copy for the row max.
    fold_scale = q.dtype == jnp.float32

    def q_block(_, i):
        q_blk = _head_major(_example_rows(q, b, i * bq, bq), K)
        if fold_scale:
            q_blk = q_blk * scale
        bias_i, mask_i = _slice(bias, i * bq, bq, axis=2), _slice(mask, i * bq, bq, axis=2)

        def kv_step(j, carry, masked, first=0):
            # Only the block's queries from `first` on may be live (the causal diagonal).
            rows = bq - first

            def part(x):  # [K, bq * G, ...] -> the rows of positions [first, bq)
                return x[:, first * G :] if first else x

            def from_first(x):  # [K|1, G|1, bq|1, bk|1] -> [K|1, G|1, rows|1, bk|1]
                return x if x is None or x.shape[2] == 1 else x[:, :, first:]

            m, l, acc = map(part, carry)  # [K, rows * G], [K, rows * G], [K, rows * G, H]
            k_blk = _swap01(_example_rows(k, b, j * bk, bk))  # [K, bk, H]
            v_blk = _swap01(_example_rows(v, b, j * bk, bk))
            s = jnp.einsum(  # [K, rows * G, H] x [K, bk, H] -> [K, rows * G, bk]
                "uch,ush->ucs", part(q_blk), k_blk, preferred_element_type=jnp.float32
            )
            if not fold_scale:
                s = scale * s
            bias_blk = _rows(from_first(_slice(bias_i, j * bk, bk, axis=3)), G, rows)
            if bias_blk is not None:
                s = s + bias_blk.astype(jnp.float32)
            if masked:
                mask_blk = from_first(_slice(mask_i, j * bk, bk, axis=3))
                live = _live(cfg, i, j, q_len, kv_len, mask_blk, first)
                s = jnp.where(_rows(live, G, rows), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum(  # [K, rows * G, bk] x [K, bk, H] -> [K, rows * G, H]
                "ucs,ush->uch", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32
            )
            l = l * correction + jnp.sum(p, axis=-1)
            new = (m_new, l, acc * correction[..., None] + pv)
            if not first:
                return new
            # Write the rows back into the [K, bq * G, ...] carry.
            return tuple(x.at[:, first * G :].set(y) for x, y in zip(carry, new, strict=True))

        lo, full, hi = _kv_range(cfg, i, q_len, kv_len)
        carry = (
            jnp.full((K, bq * G), MASK_VALUE, jnp.float32),
            jnp.zeros((K, bq * G), jnp.float32),
            jnp.zeros((K, bq * G, H), jnp.float32),
        )
        carry = lax.fori_loop(lo, full, functools.partial(kv_step, masked=False), carry)
        if cfg.structural_only and cfg.is_causal and bq % bk == 0 and bk > 1:
            # On the causal diagonal, key block full + r is seen only by the
            # queries from r * bk on: those steps compute just those rows.
            for r in range(bq // bk):
                carry = lax.cond(
                    full + r < hi,
                    functools.partial(kv_step, full + r, masked=True, first=r * bk),
                    lambda carry: carry,
                    carry,
                )
            m, l, acc = carry
        else:
            m, l, acc = lax.fori_loop(full, hi, functools.partial(kv_step, masked=True), carry)
        has_live = l > 0
        safe_l = jnp.where(has_live, l, 1.0)
        out = _position_major((acc / safe_l[..., None]).astype(q.dtype), bq)  # [bq, N, H]
        return None, (out, jnp.where(has_live, m + jnp.log(safe_l), 0.0))

    _, (out, lse) = lax.scan(q_block, None, jnp.arange(cfg.num_q_blocks, dtype=jnp.int32))
    # [nq, bq, N, H] -> [Tp, N, H]; [nq, K, bq * G] -> [K, Tp * G]
    return out.reshape(Tp, N, H), _swap01(lse).reshape(K, Tp * G)


def _live_t(cfg, i, j, q_len, kv_len, mask_t, rows=None) -> Array:
    """bool `[K|1, rows, bq, G|1]`: `_live` in the backward's transposed (key, query)
    layout, for the first `rows` keys of the block (default all)."""
    s = _positions(j * cfg.block_k, rows or cfg.block_k)[:, None, None]
    t = _positions(i * cfg.block_q, cfg.block_q)[None, :, None]
    live = _pair_live(cfg, t, s, q_len, kv_len)[None]
    return live if mask_t is None else live & mask_t


def _example_backward(cfg, b, q, k, v, bias, mask, q_len, kv_len, lse, delta, d_out):
    """Returns example b's dq^T `[K, H, Tp * G]`, dk and dv `[Sp, K, H]` in float32
    and dbias `[K|1, G|1, Tp|1, Sp|1]` (or None); lse and delta are `[B, K, Tp * G]`.

    The backward works in the transposed layout: block scores are
    `[K, bk, bq, G]` (key rows, query columns), so that every product is a
    plain or right-transposed matmul, and dq is accumulated as dq^T
    `[K, H, Tp * G]`. In the `[K, bq * G, bk]` layout two of the five products
    (dv and dk) contract the query axis of P and dS, and XLA copies each block
    into a transpose first.
    """
    _, Tp, N, H = q.shape
    K = k.shape[2]
    G = N // K
    bq, bk = cfg.block_q, cfg.block_k
    scale = jnp.float32(cfg.scale)

    def transposed(x):  # [K|1, G|1, bq|1, bk|1] -> [K|1, bk|1, bq|1, G|1]
        return None if x is None else jnp.transpose(x, (0, 3, 2, 1))

    def kv_block(carry, j):
        k_blk = _swap01(_example_rows(k, b, j * bk, bk))  # [K, bk, H]
        v_blk = _swap01(_example_rows(v, b, j * bk, bk))
        k_blk_t = jnp.swapaxes(k_blk, 1, 2)  # [K, H, bk], small
        bias_j, mask_j = _slice(bias, j * bk, bk, axis=3), _slice(mask, j * bk, bk, axis=3)

        def q_step(i, inner, masked, rows=bk):
            # Only the block's first `rows` keys may be live (the causal diagonal).
            dk, dv, dq_t, dbias = inner
            k_rows, v_rows, k_rows_t = k_blk[:, :rows], v_blk[:, :rows], k_blk_t[..., :rows]
            # [K, bq * G, H]: query columns in (position, head) order.
            q_blk = _head_major(_example_rows(q, b, i * bq, bq), K)
            do_blk = _head_major(_example_rows(d_out, b, i * bq, bq), K)
            lse_blk, delta_blk = (  # [B, K, Tp * G] -> [K, 1, bq, G]
                lax.dynamic_slice(x, (b, 0, i * bq * G), (1, K, bq * G)).reshape(K, 1, bq, G)
                for x in (lse, delta)
            )
            s = (
                jnp.einsum(  # [K, rows, H] x [K, bq * G, H] -> [K, rows, bq * G]
                    "ush,uch->usc", k_rows, q_blk, preferred_element_type=jnp.float32
                ).reshape(K, rows, bq, G)
                * scale
            )
            bias_blk = transposed(_slice(bias_j, i * bq, bq, axis=2))
            if bias_blk is not None:
                s = s + bias_blk[:, :rows].astype(jnp.float32)
            if masked:  # exp(-inf - lse) is exactly 0: one pass for the mask and the exp
                mask_blk = transposed(_slice(mask_j, i * bq, bq, axis=2))
                live = _live_t(cfg, i, j, q_len, kv_len, mask_blk, rows)
                s = jnp.where(live, s, -jnp.inf)
            p = jnp.exp(s - lse_blk)  # [K, rows, bq, G]
            dv_rows = jnp.einsum(  # [K, rows, bq * G] x [K, bq * G, H] -> [K, rows, H]
                "usc,uch->ush",
                p.reshape(K, rows, bq * G).astype(d_out.dtype),
                do_blk,
                preferred_element_type=jnp.float32,
            )
            dp = jnp.einsum(  # [K, rows, H] x [K, bq * G, H] -> [K, rows, bq * G]
                "ush,uch->usc", v_rows, do_blk, preferred_element_type=jnp.float32
            ).reshape(K, rows, bq, G)
            ds = p * (dp - delta_blk)  # gradient of the (biased) logits, [K, rows, bq, G]
            # The scale is applied to the float32 products, not to ds in the input dtype,
            # where a tiny scale would underflow it (float16) and a huge one overflow it.
            ds_low = ds.reshape(K, rows, bq * G).astype(q.dtype)
            dk_rows = scale * jnp.einsum(  # [K, rows, bq * G] x [K, bq * G, H] -> [K, rows, H]
                "usc,uch->ush", ds_low, q_blk, preferred_element_type=jnp.float32
            )
            # XLA may fold k^T's transpose into this product, and XLA:CPU's dot for
            # a transposed operand has no bfloat16 x bfloat16 -> float32. Products of
            # two bfloat16 or float16 numbers are exact in float32, so the operands
            # are taken in float32 here with the same result.
            dq_blk = scale * jnp.einsum(  # [K, H, rows] x [K, rows, bq * G] -> [K, H, bq * G]
                "uhs,usc->uhc", k_rows_t.astype(jnp.float32), ds_low.astype(jnp.float32)
            )
            if rows == bk:
                dk, dv = dk + dk_rows, dv + dv_rows
            else:
                dk, dv = dk.at[:, :rows].add(dk_rows), dv.at[:, :rows].add(dv_rows)
            dq_t = _add_block(dq_t, dq_blk, {2: i * bq * G})
            if dbias is not None:
                dbias = _add_bias_grad(dbias, transposed(ds), i * bq, j * bk)
            return dk, dv, dq_t, dbias

        lo, full, hi = _q_range(cfg, j, q_len, kv_len)
        zeros = jnp.zeros((K, bk, H), jnp.float32)
        inner = (zeros, zeros, *carry)
        if cfg.structural_only and cfg.is_causal and bk % bq == 0:
            # On the causal diagonal, query block lo + r sees only the first
            # (r + 1) * bq keys of this block: those steps compute just those rows.
            for r in range(bk // bq - 1):
                inner = lax.cond(
                    lo + r < full,
                    functools.partial(q_step, lo + r, masked=True, rows=(r + 1) * bq),
                    lambda inner: inner,
                    inner,
                )
            lo = jnp.minimum(lo + bk // bq - 1, full)
        inner = lax.fori_loop(lo, full, functools.partial(q_step, masked=True), inner)
        dk, dv, dq_t, dbias = lax.fori_loop(
            full, hi, functools.partial(q_step, masked=False), inner
        )
        return (dq_t, dbias), (_swap01(dk), _swap01(dv))  # [bk, K, H]

    carry = (
        jnp.zeros((K, H, Tp * G), jnp.float32),
        None if bias is None else jnp.zeros(bias.shape, jnp.float32),
    )
    (dq_t, dbias), (dk, dv) = lax.scan(
        kv_block, carry, jnp.arange(cfg.num_k_blocks, dtype=jnp.int32)
    )
    # dq^T as it is: the caller brings all examples' dq into [B, Tp, N, H] with
    # one transpose (XLA:CPU runs it several times slower fused into the loop's output).
    return dq_t, dk.reshape(-1, K, H), dv.reshape(-1, K, H), dbias  # [nk, bk, ...] -> [Sp, ...]


def _add_block(full: Array, block: Array, starts: dict[int, Array]) -> Array:
    index = [starts.get(axis, jnp.int32(0)) for axis in range(full.ndim)]
    current = lax.dynamic_slice(full, index, block.shape)
    return lax.dynamic_update_slice(full, current + block, index)


def _add_bias_grad(dbias: Array, ds: Array, t0: Array, s0: Array) -> Array:
    """Adds ds `[K, G, bq, bk]` into dbias, summing over the axes where bias broadcasts."""
    sum_axes = tuple(a for a in range(4) if dbias.shape[a] == 1)
    ds = jnp.sum(ds, axis=sum_axes, keepdims=True)
    starts = {axis: start for axis, start in ((2, t0), (3, s0)) if dbias.shape[axis] != 1}
    return _add_block(dbias, ds, starts)


# --------------------------------------------------------------------------
# All examples: lax.map over the examples, max(1, units_per_step // K) at a
# time. Arrays keep the layout of the inputs: q, out and d_out [B, Tp, N, H],
# k and v [B, Sp, K, H]; lse and delta are [B, K, Tp * G], lengths [B];
# bias and mask [B|1, K|1, G|1, Tp|1, Sp|1], where a leading 1 (shared by all
# examples) is closed over, not copied per example.


def _map_examples(cfg, fn, B, K, bias, mask):
    """lax.map of `fn(b, example_bias, example_mask)` over the example indices b."""
    shared = [None if x is None or x.shape[0] != 1 else x[0] for x in (bias, mask)]
    mapped = [None if x is None or x.shape[0] == 1 else x for x in (bias, mask)]

    def call(example):
        b, example_bias, example_mask = example
        example_bias = shared[0] if example_bias is None else example_bias
        example_mask = shared[1] if example_mask is None else example_mask
        return fn(b, example_bias, example_mask)

    examples = max(1, cfg.units_per_step // K)
    indices = jnp.arange(B, dtype=jnp.int32)
    return lax.map(call, (indices, *mapped), batch_size=examples if examples > 1 else None)


def _example_rows(x: Array, b: Array, start: Array, size: int) -> Array:
    """`x[b, start:start + size]`: one block of positions of example b, read in place."""
    index = (b, start) + (0,) * (x.ndim - 2)
    return lax.dynamic_slice(x, index, (1, size, *x.shape[2:]))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, mask, q_len, kv_len):
    return _flash_fwd(cfg, q, k, v, bias, mask, q_len, kv_len)[0]


def _flash_fwd(cfg, q, k, v, bias, mask, q_len, kv_len):
    def example(b, bias, mask):
        return _example_forward(cfg, b, q, k, v, bias, mask, q_len[b], kv_len[b])

    out, lse = _map_examples(cfg, example, q.shape[0], k.shape[2], bias, mask)
    return out, (q, k, v, bias, mask, q_len, kv_len, out, lse)


def _flash_bwd(cfg, res, d_out):
    q, k, v, bias, mask, q_len, kv_len, out, lse = res

    bcfg = cfg.for_backward()

    def example(b, bias, mask):
        return _example_backward(
            bcfg, b, q, k, v, bias, mask, q_len[b], kv_len[b], lse, delta, d_out
        )

    # delta_t = sum_h dO_th O_th = sum_s P_ts dP_ts, the softmax backward's row term.
    B, Tp, N, _ = q.shape
    K = k.shape[2]
    G = N // K
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Tp, N]
    delta = jnp.swapaxes(delta.reshape(B, Tp, K, G), 1, 2).reshape(B, K, -1)
    dq, dk, dv, dbias = _map_examples(cfg, example, B, K, bias, mask)
    # [B, K, H, Tp * G] -> [B, Tp, K, G, H] (with no size-1 G axis: see _swap01)
    if G == 1:
        dq = jnp.transpose(dq, (0, 3, 1, 2))
    else:
        dq = jnp.transpose(dq.reshape(B, K, -1, Tp, G), (0, 3, 1, 4, 2))
    dq = dq.reshape(q.shape)
    if dbias is not None:
        if bias.shape[0] == 1:
            dbias = jnp.sum(dbias, axis=0, keepdims=True)
        dbias = dbias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------
# Layout and padding around the kernel.


def _pad_axis(x: Array | None, axis: int, size: int, *, broadcast: bool = False) -> Array | None:
    """Zero-pads `axis` to `size`; with `broadcast`, a size-1 (broadcast) axis stays 1."""
    if x is None or x.shape[axis] == size or (broadcast and x.shape[axis] == 1):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _per_head_group(x: Array | None, K: int, G: int, T: int, S: int) -> Array | None:
    """`[B|1, N|1, T|1, S|1]` -> `[B|1, K|1, G|1, Tp|1, Sp|1]`, as the kernel takes it."""
    if x is None:
        return None
    b, n = x.shape[:2]
    x = x[:, None] if n == 1 else x.reshape(b, K, G, *x.shape[2:])
    return _pad_axis(_pad_axis(x, 3, T, broadcast=True), 4, S, broadcast=True)


def chunked_from_prepared(
    p: dict[str, Any],
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    backward_block_q: int | None = None,
    backward_block_k: int | None = None,
    units_per_step: int | None = None,
) -> Array:
    """Runs the chunked kernel on the output of `kit.attention.prepare_inputs`.

    Returns:
      `[B, T, N, H]` (or `[T, N, H]` for unbatched input).
    """
    query, key, value = p["query"], p["key"], p["value"]
    B, T, N = query.shape[:3]
    S, K = key.shape[1], key.shape[2]
    G = N // K
    for name, size in (
        ("block_q", block_q),
        ("block_k", block_k),
        ("backward_block_q", backward_block_q),
        ("backward_block_k", backward_block_k),
    ):
        if size is not None:
            _check_block(name, size)
    # Unset backward sizes follow the forward ones where those were given.
    auto_q, auto_k = default_block_sizes(T, S)
    auto_bq, auto_bk = default_block_sizes(T, S, backward=True)
    bwd_q = backward_block_q or block_q or auto_bq
    bwd_k = backward_block_k or block_k or auto_bk
    block_q, block_k = block_q or auto_q, block_k or auto_k
    units = DEFAULT_UNITS_PER_STEP if units_per_step is None else units_per_step
    units = _check_block("units_per_step", units)
    scale = p["scale"]
    if not isinstance(scale, float):
        raise ValueError(
            f"scale: the chunked path needs a Python number, got a {type(scale).__name__}"
        )
    # Padded lengths: multiples of the forward and the backward block sizes.
    step_q, step_k = math.lcm(block_q, bwd_q), math.lcm(block_k, bwd_k)
    Tp, Sp = -(-T // step_q) * step_q, -(-S // step_k) * step_k
    num_q, num_k = Tp // block_q, Sp // block_k
    structural_only = (
        p["mask"] is None
        and p["query_seq_lengths"] is None
        and p["key_value_seq_lengths"] is None
        and p["window"] is None
        and (Tp, Sp) == (T, S)
    )
    cfg = _Config(
        scale,
        p["is_causal"],
        p["window"],
        block_q,
        block_k,
        num_q,
        num_k,
        structural_only,
        units,
        (bwd_q, bwd_k),
    )

    q = _pad_axis(query, 1, Tp)
    k, v = _pad_axis(key, 1, Sp), _pad_axis(value, 1, Sp)
    bias = _per_head_group(p["bias"], K, G, Tp, Sp)
    mask = _per_head_group(p["mask"], K, G, Tp, Sp)
    # Padding rows and columns are dead through the lengths, which always exist here.
    q_len = jnp.full((B,), T, jnp.int32)
    kv_len = jnp.full((B,), S, jnp.int32)
    if p["query_seq_lengths"] is not None:
        q_len = jnp.minimum(p["query_seq_lengths"], T)
    if p["key_value_seq_lengths"] is not None:
        kv_len = jnp.minimum(p["key_value_seq_lengths"], S)

    out = _flash(cfg, q, k, v, bias, mask, q_len, kv_len)[:, :T]  # [B, T, N, H]
    return out[0] if p["unbatched"] else out


def _check_block(name: str, size: Any) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"{name}: expected a positive int, got {size!r}")
    return size


def chunked_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    backward_block_q: int | None = None,
    backward_block_k: int | None = None,
    units_per_step: int | None = None,
) -> Array:
    """Memory-efficient attention; `kit.dot_product_attention(..., implementation="chunked")`.

    out = softmax(scale * Q K^T + bias, masked) V, computed block by block
    with an online softmax, never forming `[T, S]`. The VJP recomputes block
    scores from the saved log-sum-exp. Query rows with no live key return
    exactly zero, with zero gradients.

    Args:
      query: `[B, T, N, H]` or `[T, N, H]`.
      key: `[B, S, K, H]` or `[S, K, H]`; K divides N.
      value: as `key`.
      bias: optional, broadcastable to `[B, N, T, S]` (a full bias is O(T S)
        memory of its own, and so is its gradient).
      mask: optional bool, broadcastable to `[B, N, T, S]`, True = may attend.
      scale: a Python number; defaults to 1 / sqrt(H).
      is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size:
        as in `kit.dot_product_attention`.
      block_q: the forward pass's query block size; chosen from T if None.
      block_k: the forward pass's key/value block size; chosen from S if None.
      backward_block_q, backward_block_k: the backward pass's block sizes;
        if None, `block_q` / `block_k` where given, else chosen from T / S.
        The lengths are padded to multiples of both passes' sizes.
      units_per_step: about how many (example, key/value head) pairs each
        loop step processes together (default 8): a step takes
        max(1, units_per_step // K) whole examples.

    Returns:
      `[B, T, N, H]` (or `[T, N, H]`), dtype of `query`.

    Raises:
      ValueError: for every input `kit.dot_product_attention` rejects, a
        non-positive block size, or a traced `scale`.

    References:
      Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
      Work Partitioning", 2023.
    """
    p = prepare_inputs(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
    )
    return chunked_from_prepared(
        p,
        block_q=block_q,
        block_k=block_k,
        backward_block_q=backward_block_q,
        backward_block_k=backward_block_k,
        units_per_step=units_per_step,
    )
