"""The chunked kernel's backward pass for one example: block scores recomputed
from the saved log-sum-exp, in the transposed (key, query) layout.

References:
  Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
  Partitioning", 2023.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kit.attention import programs
from kit.attention.blocks import (
    add_block,
    block_band,
    block_live,
    example_rows,
    head_major,
    pass_dims,
    slice_block,
    swap01,
    varying_like,
)

Array = jax.Array


def _live_t(cfg, i, j, q_len, kv_len, mask_t, rows=None) -> Array:
    """bool `[K|1, rows, bq, G|1]`: `_live` in the backward's transposed (key, query)
    layout, for the first `rows` keys of the block (default all)."""
    t0, s0, rows = i * cfg.block_q, j * cfg.block_k, rows or cfg.block_k
    live = block_live(cfg, t0, cfg.block_q, s0, rows, q_len, kv_len, keys_first=True)
    live = live[None, :, :, None]
    return live if mask_t is None else live & mask_t


def _q_range(cfg, j, q_len, kv_len) -> tuple[Array, Array, Array]:
    """Query blocks for key block j: [lo, full) need a mask, [full, hi) do not."""
    lo, hi = block_band(cfg, j, q_len, kv_len, keys_first=True)
    if not cfg.structural_only:
        return lo, hi, hi
    if cfg.is_causal:  # from the first query block wholly at or below the diagonal
        last_s = j * cfg.block_k + cfg.block_k - 1
        return lo, jnp.minimum(jnp.maximum(lo, -(-last_s // cfg.block_q)), hi), hi
    return lo, lo, hi


def example_backward(
    cfg, b, q, k, v, bias, mask, q_len, kv_len, lse, delta, d_out, dq_t=None, dyn=None
):
    """Returns example b's dq^T `[K, H, Tp * G]`, dk and dv `[Sp, K, H]` in `stat_dtype`,
    dbias `[K|1, G|1, Tp|1, Sp|1]` (or None) and the cotangents of the score
    function's floating captures (`programs.grad_captures`; () without a program);
    lse and delta are `[B, K, Tp * G]`.

    The backward works in the transposed layout: block scores are
    `[K, bk, bq, G]` (key rows, query columns), so that every product is a
    plain or right-transposed matmul, and dq is accumulated as dq^T
    `[K, H, Tp * G]`. In the `[K, bq * G, bk]` layout two of the five products
    (dv and dk) contract the query axis of P and dS, and XLA copies each block
    into a transpose first. With `dq_t`, dq^T is added to it (a caller summing
    the gradients of several key blocks, as ring attention does, keeps one
    accumulator and no per-block copy).
    """
    Tp, _, H, K, G, bq, bk, stat, scale = pass_dims(cfg, q, k)

    def transposed(x):  # [K|1, G|1, bq|1, bk|1] -> [K|1, bk|1, bq|1, G|1]
        return None if x is None else jnp.transpose(x, (0, 3, 2, 1))

    program = cfg.program
    lists = programs.kernel_lists(cfg, dyn, q_len, kv_len, transpose=True)
    scored = program is not None and program.score is not None
    grad_caps = programs.grad_captures(program, dyn.captures) if scored else ()
    # Inside shard_map the captures are typed varying like the blocks before the VJP:
    # otherwise the VJP's transpose of that cast would sum each block's cotangent
    # over the devices (the caller sums the total once, `chunked._sum_over_devices`).
    grad_caps = varying_like(grad_caps, q, k, v, d_out, *([] if dyn is None else dyn[2:]))

    def modded(s, live, at, sizes):
        """The score function on s and its VJP (to the raw scores and the captures)."""
        if live is not None:  # dead pairs' raw scores are replaced, so that no
            s = jnp.where(live, s, 0.0)  # derivative there is inf or nan

        def score(s, caps):
            caps = programs.with_grad_captures(program, dyn.captures, caps)
            return programs.block_call(program, dyn, "ukqg", at, sizes, s, caps)

        return jax.vjp(score, s, grad_caps)

    def kv_block(carry, xs):
        j, col_lists = xs
        k_blk = swap01(example_rows(k, b, j * bk, bk))  # [K, bk, H]
        v_blk = swap01(example_rows(v, b, j * bk, bk))
        k_blk_t = jnp.swapaxes(k_blk, 1, 2)  # [K, H, bk], small
        bias_j, mask_j = (
            slice_block(bias, j * bk, bk, axis=3),
            slice_block(mask, j * bk, bk, axis=3),
        )

        def q_step(i, inner, masked, rows=bk):
            # Only the block's first `rows` keys may be live (the causal diagonal).
            dk, dv, dq_t, dbias, dcaps = inner
            k_rows, v_rows, k_rows_t = k_blk[:, :rows], v_blk[:, :rows], k_blk_t[..., :rows]
            # [K, bq * G, H]: query columns in (position, head) order.
            q_blk = head_major(example_rows(q, b, i * bq, bq), K)
            do_blk = head_major(example_rows(d_out, b, i * bq, bq), K)
            lse_blk, delta_blk = (  # [B, K, Tp * G] -> [K, 1, bq, G]
                lax.dynamic_slice(
                    x, (b, jnp.int32(0), i * bq * G), (1, K, bq * G), allow_negative_indices=False
                ).reshape(K, 1, bq, G)
                for x in (lse, delta)
            )
            s = (
                jnp.einsum(  # [K, rows, H] x [K, bq * G, H] -> [K, rows, bq * G]
                    "ush,uch->usc", k_rows, q_blk, preferred_element_type=stat
                ).reshape(K, rows, bq, G)
                * scale
            )
            bias_blk = transposed(slice_block(bias_j, i * bq, bq, axis=2))
            if bias_blk is not None:
                s = s + bias_blk[:, :rows].astype(stat)
            at, sizes = {"q": i * bq, "k": j * bk}, {"u": K, "k": rows, "q": bq, "g": G}
            live = None
            if masked:  # exp(-inf - lse) is exactly 0: one pass for the mask and the exp
                mask_blk = transposed(slice_block(mask_j, i * bq, bq, axis=2))
                live = _live_t(cfg, i, j, q_len, kv_len, mask_blk, rows)
                if program is not None and program.mask is not None:
                    live = live & programs.block_call(program, dyn, "ukqg", at, sizes)
            if scored:
                s, score_vjp = modded(s, live, at, sizes)
            if live is not None:
                s = jnp.where(live, s, -jnp.inf)
            p = jnp.exp(s - lse_blk)  # [K, rows, bq, G]
            dv_rows = jnp.einsum(  # [K, rows, bq * G] x [K, bq * G, H] -> [K, rows, H]
                "usc,uch->ush",
                p.reshape(K, rows, bq * G).astype(d_out.dtype),
                do_blk,
                preferred_element_type=stat,
            )
            dp = jnp.einsum(  # [K, rows, H] x [K, bq * G, H] -> [K, rows, bq * G]
                "ush,uch->usc", v_rows, do_blk, preferred_element_type=stat
            ).reshape(K, rows, bq, G)
            ds = p * (dp - delta_blk)  # gradient of the (biased) logits, [K, rows, bq, G]
            if scored:  # through the score function, to the raw scores and the captures
                ds, ds_caps = score_vjp(ds)
                dcaps = tuple(a + d.astype(a.dtype) for a, d in zip(dcaps, ds_caps, strict=True))
            # The scale is applied to the float32 products, not to ds in the input dtype,
            # where a tiny scale would underflow it (float16) and a huge one overflow it.
            ds_low = ds.reshape(K, rows, bq * G).astype(q.dtype)
            dk_rows = scale * jnp.einsum(  # [K, rows, bq * G] x [K, bq * G, H] -> [K, rows, H]
                "usc,uch->ush", ds_low, q_blk, preferred_element_type=stat
            )
            # XLA may fold k^T's transpose into this product, and XLA:CPU's dot for
            # a transposed operand has no bfloat16 x bfloat16 -> float32. Products of
            # two bfloat16 or float16 numbers are exact in float32, so the operands
            # are taken in float32 here with the same result.
            dq_blk = scale * jnp.einsum(  # [K, H, rows] x [K, rows, bq * G] -> [K, H, bq * G]
                "uhs,usc->uhc", k_rows_t.astype(stat), ds_low.astype(stat)
            )
            if rows == bk:
                dk, dv = dk + dk_rows, dv + dv_rows
            else:
                dk, dv = dk.at[:, :rows].add(dk_rows), dv.at[:, :rows].add(dv_rows)
            dq_t = add_block(dq_t, dq_blk, {2: i * bq * G})
            if dbias is not None:
                dbias = _add_bias_grad(dbias, transposed(ds), i * bq, j * bk)
            return dk, dv, dq_t, dbias, dcaps

        lo, full, hi = _q_range(cfg, j, q_len, kv_len)
        zeros = varying_like(jnp.zeros((K, bk, H), stat), q, k, v, d_out, bias, mask, q_len, kv_len)
        inner = (zeros, zeros, *carry)
        if col_lists is not None:  # the block mask's lists
            dk, dv, *carry = programs.visit_lists(q_step, col_lists, inner)
            return tuple(carry), (swap01(dk), swap01(dv))
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
        dk, dv, *carry = lax.fori_loop(full, hi, functools.partial(q_step, masked=False), inner)
        return tuple(carry), (swap01(dk), swap01(dv))  # [bk, K, H]

    carry = (
        jnp.zeros((K, H, Tp * G), stat) if dq_t is None else dq_t,
        None if bias is None else jnp.zeros(bias.shape, stat),
        tuple(jnp.zeros(c.shape, jnp.promote_types(c.dtype, stat)) for c in grad_caps),
    )
    carry = varying_like(carry, q, k, v, d_out, lse, delta, bias, mask, q_len, kv_len)
    xs = (jnp.arange(cfg.num_k_blocks, dtype=jnp.int32), lists)
    (dq_t, dbias, dcaps), (dk, dv) = lax.scan(kv_block, carry, xs)
    # dq^T as it is: the caller brings all examples' dq into [B, Tp, N, H] with
    # one transpose (XLA:CPU runs it several times slower fused into the loop's output).
    dk, dv = dk.reshape(-1, K, H), dv.reshape(-1, K, H)  # [nk, bk, ...] -> [Sp, ...]
    return dq_t, dk, dv, dbias, dcaps


def _add_bias_grad(dbias: Array, ds: Array, t0: Array, s0: Array) -> Array:
    """Adds ds `[K, G, bq, bk]` into dbias, summing over the axes where bias broadcasts."""
    sum_axes = tuple(a for a in range(4) if dbias.shape[a] == 1)
    ds = jnp.sum(ds, axis=sum_axes, keepdims=True)
    starts = {axis: start for axis, start in ((2, t0), (3, s0)) if dbias.shape[axis] != 1}
    return add_block(dbias, ds, starts)
