"""The chunked kernel's passes over all (local) examples: forward, tangent, backward.

Each runs its one-example kernel (`flash_forward`, `flash_tangent`,
`flash_backward`) under `lax.map` over the example indices; `kit.attention.partition`
splits them over a mesh and `kit.attention.chunked` holds their derivatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kit.attention import cpu_kernels
from kit.attention.flash_backward import example_backward
from kit.attention.flash_forward import example_forward
from kit.attention.flash_tangent import example_tangent
from kit.attention.masks import stat_dtype
from kit.attention.programs import Dynamic, grad_captures

Array = jax.Array

# All examples: lax.map over the examples, max(1, units_per_step // K) at a
# time. Arrays keep the layout of the inputs: q, out and d_out [B, Tp, N, H],
# k and v [B, Sp, K, H]; lse and delta are [B, K, Tp * G], lengths [B];
# bias and mask [B|1, K|1, G|1, Tp|1, Sp|1], where a leading 1 (shared by all
# examples) is closed over, not copied per example.


def _map_examples(cfg, fn, B, K, pairwise, *per_example):
    """lax.map of `fn(b, *example_pairwise, *example_rows)` over the example
    indices b: `pairwise` are bias-like arrays `[B|1, ...]` (bias, mask), each
    given as its example b or, where it broadcasts, whole; example_rows are the
    rows b of `per_example`."""
    n = len(pairwise)
    shared = [None if x is None or x.shape[0] != 1 else x[0] for x in pairwise]
    mapped = [None if x is None or x.shape[0] == 1 else x for x in pairwise]

    def call(example):
        b, *rest = example
        own, rows = rest[:n], rest[n:]
        given = [s if x is None else x for s, x in zip(shared, own, strict=True)]
        return fn(b, *given, *rows)

    examples = max(1, cfg.units_per_step // K)
    indices = jnp.arange(B, dtype=jnp.int32)
    return lax.map(
        call, (indices, *mapped, *per_example), batch_size=examples if examples > 1 else None
    )


def _program_arrays(prog, q):
    """A programmed call's arrays `(captures, states, examples, heads)` (see
    `kit.attention.chunked`), or their defaults without a program."""
    if prog is None:
        return (), None, jnp.arange(q.shape[0], dtype=jnp.int32), None
    return prog


def _dynamic(prog, states, example, heads) -> Dynamic | None:
    return None if prog is None else Dynamic(prog[0], states, example, heads)


def forward_all(cfg, q, k, v, bias, mask, q_len, kv_len, prog=None):
    """The kernel's forward over all (local) examples: out `[B, Tp, N, H]` and
    lse `[B, K, Tp * G]` (float32; MASK_VALUE for rows with no live key).
    `prog`: a programmed call's arrays (`chunked.program_arrays`) or None. On a CPU,
    where it fits, the compiled kernel (`cpu_kernels.flash_forward`) runs instead."""
    if cpu_kernels.flash_fits(cfg, q, k, v, bias, mask, prog):
        return cpu_kernels.flash_forward(cfg, q, k, v, q_len, kv_len)
    _, states, examples, heads = _program_arrays(prog, q)

    def example(b, bias, mask, states, index):
        dyn = _dynamic(prog, states, index, heads)
        return example_forward(cfg, b, q, k, v, bias, mask, q_len[b], kv_len[b], dyn)

    return _map_examples(cfg, example, q.shape[0], k.shape[2], (bias, mask, states), examples)


def tangent_all(
    cfg, q, k, v, bias, mask, q_len, kv_len, out, lse, dq, dk, dv, dbias, prog=None, dcaps=()
):
    """The kernel's tangent over all (local) examples: d_out `[B, Tp, N, H]` along
    (dq, dk, dv, dbias) and `dcaps`, the tangents of the score function's
    floating captures (`flash_tangent`; dbias None without a bias)."""
    _, states, examples, heads = _program_arrays(prog, q)

    def example(b, bias, mask, dbias, states, index):
        dyn = _dynamic(prog, states, index, heads)
        return example_tangent(
            cfg, b, q, k, v, bias, mask, q_len[b], kv_len[b], out, lse, dq, dk, dv, dbias, dyn,
            dcaps,
        )  # fmt: skip

    pairwise = (bias, mask, dbias, states)
    return _map_examples(cfg, example, q.shape[0], k.shape[2], pairwise, examples)


def backward_all(cfg, q, k, v, bias, mask, q_len, kv_len, out, lse, d_out, prog=None):
    """The kernel's backward over all (local) examples, `cfg` being the forward's.

    Returns:
      dq, dk, dv in the shapes and dtypes of q, k, v, dbias in the shape
      and dtype of bias (summed over the examples where bias broadcasts) or None,
      and the cotangents of the score function's floating captures (a tuple).
    """
    delta = row_delta(out, d_out, k.shape[2])
    if cpu_kernels.flash_fits(cfg, q, k, v, bias, mask, prog):
        dq, dk, dv = cpu_kernels.flash_backward(cfg, q, k, v, q_len, kv_len, lse, delta, d_out)
        return dq, dk, dv, None, ()
    return backward_from_delta(
        cfg, q, k, v, bias, mask, q_len, kv_len, delta, lse, d_out, prog=prog
    )


def row_delta(out: Array, d_out: Array, K: int) -> Array:
    """delta_t = sum_h dO_th O_th = sum_s P_ts dP_ts, the softmax backward's row term:
    float32 `[B, K, Tp * G]` (lse's layout) from out and d_out `[B, Tp, N, H]`."""
    B, Tp, N, _ = out.shape
    stat = stat_dtype(out.dtype)
    delta = jnp.sum(d_out.astype(stat) * out.astype(stat), axis=-1)  # [B, Tp, N]
    return jnp.swapaxes(delta.reshape(B, Tp, K, N // K), 1, 2).reshape(B, K, -1)


def backward_from_delta(
    cfg, q, k, v, bias, mask, q_len, kv_len, delta, lse, d_out, dq_t=None, prog=None
):
    """`backward_all` given delta (`row_delta`) instead of out.

    Given `dq_t` (float32 `[B, K, H, Tp * G]`), dq, dk and dv are returned in
    float32 and dq as dq^T added to `dq_t`, for a caller that sums the
    gradients of several key blocks (`dq_from_transposed` turns the sum into
    dq); such a caller computes delta once, and keeps no out for it.
    """
    bcfg = cfg.for_backward()
    summing = dq_t is not None

    captures, states, examples, heads = _program_arrays(prog, q)

    def example(b, bias, mask, states, index, dq_t):
        dyn = _dynamic(prog, states, index, heads)
        return example_backward(
            bcfg, b, q, k, v, bias, mask, q_len[b], kv_len[b], lse, delta, d_out, dq_t, dyn
        )

    pairwise = (bias, mask, states)
    dq, dk, dv, dbias, dcaps = _map_examples(
        cfg, example, q.shape[0], k.shape[2], pairwise, examples, dq_t
    )
    if dcaps:
        caps = grad_captures(cfg.program, captures)
        dcaps = tuple(jnp.sum(d, axis=0).astype(c.dtype) for d, c in zip(dcaps, caps, strict=True))
    if dbias is not None:
        if bias.shape[0] == 1:
            dbias = jnp.sum(dbias, axis=0, keepdims=True)
        dbias = dbias.astype(bias.dtype)
    if summing:
        return dq, dk, dv, dbias, dcaps
    dq = dq_from_transposed(dq, q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, dcaps


def dq_from_transposed(dq_t: Array, shape: tuple[int, ...]) -> Array:
    """dq^T `[B, K, H, Tp * G]` -> dq `[B, Tp, N, H]` (`shape`)."""
    B, Tp, N, _ = shape
    K = dq_t.shape[1]
    # [B, K, H, Tp * G] -> [B, Tp, K, G, H] (with no size-1 G axis: see swap01)
    if N == K:
        return jnp.transpose(dq_t, (0, 3, 1, 2))
    return jnp.transpose(dq_t.reshape(B, K, -1, Tp, N // K), (0, 3, 1, 4, 2)).reshape(shape)


def by_row(lse: Array, G: int) -> Array:
    """The kernel's lse `[B, K, Tp * G]` in the output's `[B, Tp, N]` layout."""
    B, K, rows = lse.shape
    return jnp.swapaxes(lse.reshape(B, K, rows // G, G), 1, 2).reshape(B, rows // G, K * G)
