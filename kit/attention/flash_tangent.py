"""The chunked kernel's tangent (forward-mode derivative) for one example.

With P = softmax(S) known from the forward's log-sum-exp (P = exp(S - lse), no
online softmax needed), the tangent of out = P V along (dq, dk, dv, dbias) is

    dS   = scale * (dq k^T + q dk^T) + dbias
    dP   = P * (dS - rowsum(P * dS))
    dout = dP V + P dv = (P * dS) V + P dv - rowsum(P * dS) * out,

accumulated over key blocks like the forward, so no `[T, S]` array is formed.
It is linear in the tangents; its transpose is the kernel's backward
(`flash_backward`), which is how `kit.attention.chunked` pairs the two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kit.attention import blocks, programs
from kit.attention.flash_forward import block_rows, kv_range, live_pairs

Array = jax.Array


def example_tangent(
    cfg, b, q, k, v, bias, mask, q_len, kv_len, out, lse, dq, dk, dv, dbias, dyn=None, dcaps=()
):
    """Returns example b's d_out `[Tp, N, H]` (q's dtype): the tangent of its output.

    q, out, dq are `[B, Tp, N, H]`; k, v, dk, dv `[B, Sp, K, H]`; lse is the
    forward's `[B, K, Tp * G]`; bias, mask and dbias come per example,
    `[K|1, G|1, Tp|1, Sp|1]` (dbias None without a bias). With a program
    (`cfg.program`, its arrays in `dyn`), `dcaps` are the tangents of the score
    function's floating captures (`programs.grad_captures`), and the score
    tangent goes through the score function.
    """
    Tp, N, H, K, G, bq, bk, stat, scale = blocks.pass_dims(cfg, q, k)

    def product(x, y):  # [K, rows, H] x [K, bk, H] -> [K, rows, bk]
        return jnp.einsum("uch,ush->ucs", x, y, preferred_element_type=stat)

    program = cfg.program
    lists = programs.kernel_lists(cfg, dyn, q_len, kv_len)
    scored = program is not None and program.score is not None
    grad_caps = programs.grad_captures(program, dyn.captures) if scored else ()

    def q_block(_, xs):
        i, row_lists = xs
        q_blk, dq_blk, out_blk = (
            blocks.head_major(blocks.example_rows(x, b, i * bq, bq), K) for x in (q, dq, out)
        )  # [K, bq * G, H]
        lse_blk = lax.dynamic_slice(
            lse, (b, jnp.int32(0), i * bq * G), (1, K, bq * G), allow_negative_indices=False
        )[0]
        bias_i, mask_i, dbias_i = (
            blocks.slice_block(x, i * bq, bq, axis=2) for x in (bias, mask, dbias)
        )

        def kv_step(j, carry, masked):
            acc, row = carry  # [K, bq * G, H], [K, bq * G]
            k_blk, v_blk, dk_blk, dv_blk = (
                blocks.swap01(blocks.example_rows(x, b, j * bk, bk)) for x in (k, v, dk, dv)
            )  # [K, bk, H]
            s = scale * product(q_blk, k_blk)
            bias_blk = block_rows(blocks.slice_block(bias_i, j * bk, bk, axis=3), G, bq)
            if bias_blk is not None:
                s = s + bias_blk.astype(stat)
            ds = scale * (product(dq_blk, k_blk) + product(q_blk, dk_blk))
            dbias_blk = block_rows(blocks.slice_block(dbias_i, j * bk, bk, axis=3), G, bq)
            if dbias_blk is not None:
                ds = ds + dbias_blk.astype(stat)
            at, sizes = {"q": i * bq, "k": j * bk}, {"u": K, "q": bq, "g": G, "k": bk}
            live = None
            if masked:
                mask_blk = blocks.slice_block(mask_i, j * bk, bk, axis=3)
                live = block_rows(live_pairs(cfg, i, j, q_len, kv_len, mask_blk), G, bq)
                if program is not None and program.mask is not None:
                    keep = programs.block_call(program, dyn, "uqgk", at, sizes)
                    live = live & keep.reshape(s.shape)
            if scored:  # the tangent through the score function (of the scores and captures)
                raw = s if live is None else jnp.where(live, s, 0.0)

                def score(s, caps):
                    caps = programs.with_grad_captures(program, dyn.captures, caps)
                    s4 = s.reshape(K, bq, G, bk)
                    scored_blk = programs.block_call(program, dyn, "uqgk", at, sizes, s4, caps)
                    return scored_blk.reshape(s.shape)

                s, ds = jax.jvp(score, (raw, grad_caps), (ds, tuple(dcaps)))
            if live is not None:
                s = jnp.where(live, s, -jnp.inf)
            p = jnp.exp(s - lse_blk[..., None])  # [K, bq * G, bk]; 0 where masked
            pds = p * ds
            acc = acc + jnp.einsum(  # [K, bq * G, bk] x [K, bk, H] -> [K, bq * G, H]
                "ucs,ush->uch", pds, v_blk.astype(stat)
            )
            acc = acc + jnp.einsum("ucs,ush->uch", p, dv_blk.astype(stat))
            return acc, row + jnp.sum(pds, axis=-1)

        lo, full, hi = kv_range(cfg, i, q_len, kv_len)
        carry = (jnp.zeros((K, bq * G, H), stat), jnp.zeros((K, bq * G), stat))
        carry = blocks.varying_like(carry, q, k, v, dq, dk, dv, lse, bias, mask, q_len, kv_len)
        if row_lists is not None:
            acc, row = programs.visit_lists(kv_step, row_lists, carry)
        else:
            carry = lax.fori_loop(lo, full, functools.partial(kv_step, masked=False), carry)
            acc, row = lax.fori_loop(full, hi, functools.partial(kv_step, masked=True), carry)
        d_out = acc - row[..., None] * out_blk.astype(stat)
        return None, blocks.position_major(d_out.astype(q.dtype), bq)  # [bq, N, H]

    xs = (jnp.arange(cfg.num_q_blocks, dtype=jnp.int32), lists)
    _, d_out = lax.scan(q_block, None, xs)
    return d_out.reshape(Tp, N, H)
