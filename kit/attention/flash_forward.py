"""The chunked kernel's forward pass for one example: online softmax over key blocks.

References:
  Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
  Partitioning", 2023.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kit.attention.blocks import (
    block_band,
    block_live,
    example_rows,
    head_major,
    pass_dims,
    position_major,
    slice_block,
    swap01,
    varying_like,
)
from kit.attention.masks import MASK_VALUE
from kit.attention.programs import block_call, kernel_lists, visit_lists

Array = jax.Array


def block_rows(x: Array | None, G: int, bq: int) -> Array | None:
    """`[K|1, G|1, bq|1, bk|1]` -> `[K|1, bq * G|1, bk|1]`: the forward's flattened rows."""
    if x is None:
        return None
    if x.shape[1:3] == (1, 1):
        return x[:, 0]
    x = jnp.swapaxes(x, 1, 2)  # [K|1, bq|1, G|1, bk|1]
    return jnp.broadcast_to(x, (x.shape[0], bq, G, x.shape[3])).reshape(x.shape[0], bq * G, -1)


def live_pairs(cfg, i, j, q_len, kv_len, mask_blk, first=0, kb=None) -> Array:
    """bool `[K|1, G|1, bq - first, kb]`: which (query, key) pairs of block (i, j)
    may attend, for the block's queries from `first` on (default all), with key
    blocks of `kb` keys (default `cfg.block_k`)."""
    kb = cfg.block_k if kb is None else kb
    t0, s0 = i * cfg.block_q + first, j * kb
    live = block_live(cfg, t0, cfg.block_q - first, s0, kb, q_len, kv_len)[None, None]
    return live if mask_blk is None else live & mask_blk


# Keys per step on the causal diagonal when one query block holds every query (see
# diagonal_keys).
DIAGONAL_KEYS = 128


def diagonal_keys(cfg) -> int:
    """Keys per step on the causal diagonal: DIAGONAL_KEYS when there is one query block
    and it divides both block sizes, else `block_k`.

    With one query block the diagonal is the whole pass. `experiments/bench_diagonal.py`
    (B=4, N=8, H=64, default blocks, AVX2-only AMD EPYC, 2026-12-07): steps of 128 keys
    made the forward 1.03-1.64x faster (medians) at T=256 and 512, forward+backward
    0.96-1.12x. With more query blocks, the same steps on each block's diagonal were
    slower for K=8 in a scratch comparison (0.80-0.97x at T=1024 and 2048, medians),
    so there the diagonal keeps steps of `block_k`.
    """
    bq, bk, dk = cfg.block_q, cfg.block_k, DIAGONAL_KEYS
    if cfg.num_q_blocks == 1 and bk % dk == 0 and bq % dk == 0:
        return dk
    return bk


def kv_range(cfg, i, q_len, kv_len) -> tuple[Array, Array, Array]:
    """Key blocks for query block i: [lo, full) need no mask, [full, hi) do."""
    lo, hi = block_band(cfg, i, q_len, kv_len)
    if not cfg.structural_only:
        return lo, lo, hi
    if cfg.is_causal:  # the blocks wholly at or below the diagonal
        return lo, jnp.minimum(hi, (i * cfg.block_q + 1) // cfg.block_k), hi
    return lo, hi, hi


def example_forward(cfg, b, q, k, v, bias, mask, q_len, kv_len, dyn=None):
    """Returns example b's out `[Tp, N, H]` (q's dtype) and lse `[K, Tp * G]` (`stat_dtype`,
    MASK_VALUE for rows with no live key).

    With a program (`cfg.program`, its arrays in `dyn`), the score function is
    applied to every visited block and the mask function in its partial blocks;
    with block states the loop visits each query block's full and partial key
    blocks from their lists (`programs.kernel_lists`), and no dead one.

    Each query block's G heads are flattened into bq * G rows, so that a block
    is one `[bq * G, H] x [H, bk]` product per key/value head and the softmax
    works on plain rows. Masked pairs get a -inf logit inside the block: their
    exponential is exactly 0, and since the running max starts at the finite
    MASK_VALUE, a row with no live key so far stays at m = MASK_VALUE, l = 0.
    """
    Tp, N, H, K, G, bq, bk, stat, scale = pass_dims(cfg, q, k)

    # In float32 the scale goes into the query block (one pass per query block):
    # scaling each score block instead makes XLA keep a scaled copy for the row max.
    fold_scale = q.dtype == stat

    program = cfg.program
    lists = kernel_lists(cfg, dyn, q_len, kv_len)

    def q_block(_, xs):
        i, row_lists = xs
        q_blk = head_major(example_rows(q, b, i * bq, bq), K)
        if fold_scale:
            q_blk = q_blk * scale
        bias_i, mask_i = (
            slice_block(bias, i * bq, bq, axis=2),
            slice_block(mask, i * bq, bq, axis=2),
        )

        def kv_step(j, carry, masked, first=0, kb=bk):
            # Key block j of `kb` keys. Only the block's queries from `first` on may be
            # live (the causal diagonal).
            rows = bq - first

            def part(x):  # [K, bq * G, ...] -> the rows of positions [first, bq)
                return x[:, first * G :] if first else x

            def from_first(x):  # [K|1, G|1, bq|1, bk|1] -> [K|1, G|1, rows|1, bk|1]
                return x if x is None or x.shape[2] == 1 else x[:, :, first:]

            m, l, acc = map(part, carry)  # [K, rows * G], [K, rows * G], [K, rows * G, H]
            k_blk = swap01(example_rows(k, b, j * kb, kb))  # [K, kb, H]
            v_blk = swap01(example_rows(v, b, j * kb, kb))
            s = jnp.einsum(  # [K, rows * G, H] x [K, kb, H] -> [K, rows * G, kb]
                "uch,ush->ucs", part(q_blk), k_blk, preferred_element_type=stat
            )
            if not fold_scale:
                s = scale * s
            bias_blk = block_rows(from_first(slice_block(bias_i, j * kb, kb, axis=3)), G, rows)
            if bias_blk is not None:
                s = s + bias_blk.astype(stat)
            at = {"q": i * bq + first, "k": j * kb}
            sizes = {"u": K, "q": rows, "g": G, "k": kb}
            if program is not None and program.score is not None:
                s4 = s.reshape(K, rows, G, kb)
                s = block_call(program, dyn, "uqgk", at, sizes, s4).reshape(s.shape)
            if masked:
                mask_blk = from_first(slice_block(mask_i, j * kb, kb, axis=3))
                live = live_pairs(cfg, i, j, q_len, kv_len, mask_blk, first, kb)
                live = block_rows(live, G, rows)
                if program is not None and program.mask is not None:
                    live = live & block_call(program, dyn, "uqgk", at, sizes).reshape(s.shape)
                s = jnp.where(live, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum(  # [K, rows * G, kb] x [K, kb, H] -> [K, rows * G, H]
                "ucs,ush->uch", p.astype(v.dtype), v_blk, preferred_element_type=stat
            )
            l = l * correction + jnp.sum(p, axis=-1)
            new = (m_new, l, acc * correction[..., None] + pv)
            if not first:
                return new
            # Write the rows back into the [K, bq * G, ...] carry.
            return tuple(x.at[:, first * G :].set(y) for x, y in zip(carry, new, strict=True))

        lo, full, hi = kv_range(cfg, i, q_len, kv_len)
        carry = (
            jnp.full((K, bq * G), MASK_VALUE, stat),
            jnp.zeros((K, bq * G), stat),
            jnp.zeros((K, bq * G, H), stat),
        )
        carry = varying_like(carry, q, k, v, bias, mask, q_len, kv_len)
        if row_lists is not None:
            return None, finish(*visit_lists(kv_step, row_lists, carry))
        carry = lax.fori_loop(lo, full, functools.partial(kv_step, masked=False), carry)
        if cfg.structural_only and cfg.is_causal and bq % bk == 0 and bk > 1:
            # On the causal diagonal, the r-th key block of dk keys from block `full`
            # on is seen only by the queries from r * dk on: those steps compute
            # just those rows.
            dk = diagonal_keys(cfg)
            per = bk // dk
            for r in range(bq // dk):
                carry = lax.cond(
                    full * per + r < hi * per,
                    functools.partial(kv_step, full * per + r, masked=True, first=r * dk, kb=dk),
                    lambda carry: carry,
                    carry,
                )
            m, l, acc = carry
        else:
            m, l, acc = lax.fori_loop(full, hi, functools.partial(kv_step, masked=True), carry)
        return None, finish(m, l, acc)

    def finish(m, l, acc):
        has_live = l > 0
        safe_l = jnp.where(has_live, l, 1.0)
        out = position_major((acc / safe_l[..., None]).astype(q.dtype), bq)  # [bq, N, H]
        # A row with no live key gets lse = MASK_VALUE: merged with other partial
        # results by log-sum-exp (ring attention) it weighs nothing, and the
        # backward, whose blocks mask such a row wholly, reads exp(-inf - lse) = 0.
        return out, jnp.where(has_live, m + jnp.log(safe_l), MASK_VALUE)

    xs = (jnp.arange(cfg.num_q_blocks, dtype=jnp.int32), lists)
    _, (out, lse) = lax.scan(q_block, None, xs)
    # [nq, bq, N, H] -> [Tp, N, H]; [nq, K, bq * G] -> [K, Tp * G]
    return out.reshape(Tp, N, H), swap01(lse).reshape(K, Tp * G)
