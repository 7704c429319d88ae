"""Ring attention: the sequence split over a mesh axis, key/value blocks passed around it.

Each of the P devices along `axis_name` holds one block of T / P queries and
one of S / P keys and values. In P steps every key/value block visits every
device (`lax.ppermute` to the next device on the ring); a device runs the
chunked kernel (`kit.attention.chunked`) on its query block against the block
it holds, and merges the partial results by their log-sum-exp:

    lse = logaddexp(lse_a, lse_b),
    out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.

The backward pass sends the key/value blocks around again, now with their
gradient accumulators dk and dv, which are back on their own device after the
P-th step; dq stays where its queries are. Each block's backward recomputes
its scores from the saved (global) log-sum-exp, so a device holds O(T / P)
residuals and scratch, never anything of length T.

Load balance: the blocks are contiguous (device p holds positions
[p T / P, (p + 1) T / P)). With `is_causal`, a key block wholly in a device's
future is skipped (`lax.switch`, not computed and masked), the device's own
block is the causal diagonal, and earlier blocks need no mask; so device p does
p + 1 blocks of work (p whole ones and half of one), device P - 1 about 2P
times as much as device 0. The steps run in lockstep, so a causal ring takes
about as long as a non-causal one, at (P + 1) / 2P of its useful work. The
known remedy, a zig-zag order (device p holding query/key chunks p and
2P - 1 - p of 2P), is not implemented here.

References:
  Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for
  Near-Infinite Context", 2023.
  Brandon et al., "Striped Attention: Faster Ring Attention for Causal
  Transformers", 2023 (the load imbalance of contiguous causal blocks).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kit.attention import context
from kit.attention.blocks import BlockConfig, default_block_sizes
from kit.attention.chunked import BlockSizes, block_config, pad_axis
from kit.attention.inputs import check_inputs
from kit.attention.masks import MASK_VALUE, stat_dtype
from kit.attention.passes import (
    backward_from_delta,
    by_row,
    dq_from_transposed,
    forward_all,
    row_delta,
)
from kit.attention.programs import MASK_ARGS, SCORE_ARGS, trace

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static options of one ring: one compiled program per distinct ring."""

    axis_name: str
    size: int  # P, the devices on the ring
    # The kernel's config for a key block with no causal mask (any block when
    # not causal, an earlier block when causal) and for the causal diagonal.
    full: BlockConfig
    diagonal: BlockConfig | None
    query_length: int  # T / P
    key_length: int  # S / P

    def block(self, r):
        """The key/value block a device holds at step r, whether to skip it (causal:
        wholly in the future) and whether it is the causal diagonal."""
        p = lax.axis_index(self.axis_name)
        src = (p - r) % self.size  # blocks move from device p to p + 1 each step
        return src, src > p, src == p

    def key_lengths(self, kv_len: Array, src: Array) -> Array:
        """int32 `[B]`: the live keys of block src, from the global key lengths."""
        return jnp.clip(kv_len - src * self.key_length, 0, self.key_length)

    def permute(self, x):
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return lax.ppermute(x, self.axis_name, perm)


def _run(ring: _Ring, r, compute, skip):
    """`compute(cfg)` for the block held at step r, or `skip()` if it is wholly masked."""
    src, future, diagonal = ring.block(r)
    if ring.diagonal is None:
        return compute(src, ring.full)
    index = jnp.where(future, 0, jnp.where(diagonal, 2, 1))
    return lax.switch(
        index,
        (skip, lambda: compute(src, ring.full), lambda: compute(src, ring.diagonal)),
    )


def _ring_forward(ring: _Ring, q, k, v, kv_len):
    """out `[B, Tp, N, H]` and lse `[B, K, Tp * G]` of the local queries against all keys."""
    B, Tp, N, _ = q.shape
    K = k.shape[2]
    q_len = jnp.full((B,), ring.query_length, jnp.int32)
    stat = stat_dtype(q.dtype)

    def step(r, carry):
        k, v, out, lse = carry

        def compute(src, cfg):
            out_b, lse_b = forward_all(
                cfg, q, k, v, None, None, q_len, ring.key_lengths(kv_len, src)
            )
            new = jnp.logaddexp(lse, lse_b)
            w_a, w_b = (jnp.exp(by_row(x - new, N // K))[..., None] for x in (lse, lse_b))
            return w_a * out + w_b * out_b.astype(stat), new

        out, lse = _run(ring, r, compute, lambda: (out, lse))
        k, v = ring.permute((k, v))
        return k, v, out, lse

    out = jnp.zeros(q.shape, stat)
    lse = jnp.full((B, K, Tp * (N // K)), MASK_VALUE, stat)
    k, v, out, lse = lax.fori_loop(0, ring.size, step, (k, v, out, lse))
    return out.astype(q.dtype), lse, k, v


def _ring_backward(ring: _Ring, q, k, v, kv_len, out, lse, d_out):
    B, Tp, N, H = q.shape
    K = k.shape[2]
    q_len = jnp.full((B,), ring.query_length, jnp.int32)
    delta = row_delta(out, d_out, K)  # once: out is not kept through the ring

    def step(r, carry):
        k, v, dk, dv, dq_t = carry

        def compute(src, cfg):
            lengths = ring.key_lengths(kv_len, src)
            dq_b, dk_b, dv_b, *_ = backward_from_delta(
                cfg, q, k, v, None, None, q_len, lengths, delta, lse, d_out, dq_t
            )
            return dq_b, dk + dk_b, dv + dv_b

        dq_t, dk, dv = _run(ring, r, compute, lambda: (dq_t, dk, dv))
        # dk and dv travel with their block: after the P-th step they are home.
        k, v, dk, dv = ring.permute((k, v, dk, dv))
        return k, v, dk, dv, dq_t

    stat = stat_dtype(q.dtype)
    zeros_kv = jnp.zeros(k.shape, stat)
    dq_t = jnp.zeros((B, K, H, Tp * (N // K)), stat)  # dq^T, as the kernel sums it
    _, _, dk, dv, dq_t = lax.fori_loop(0, ring.size, step, (k, v, zeros_kv, zeros_kv, dq_t))
    dq = dq_from_transposed(dq_t, q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _programmed(x, mesh, axis_name, kv_len, score_mod, mask_mod) -> Array:
    """`ring_attention` with score and mask functions, on the context ring: the
    sides hold each token's global index, through which the user's functions see
    global q_idx and kv_idx."""
    B, T = x.query.shape[:2]
    S = x.key.shape[1]
    q_places = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    k_places = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    q_side = {"index": q_places, "positions": q_places}
    k_side = {"index": k_places, "positions": k_places}
    if kv_len is not None:
        k_side["live"] = k_places < kv_len[:, None]
    score_fn, extras = None, ()
    if score_mod is not None:
        # Its captured arrays become the call's extras: their gradients come back.
        run, extras = trace("score_mod", score_mod, 5, SCORE_ARGS, stat_dtype(x.query.dtype))

        def score_fn(q_pos, k_pos, *captures):
            def score(s, b, h, q_idx, kv_idx):
                return run(s, b, h, q_pos[b, q_idx], k_pos[b, kv_idx], *captures)

            return score

    mask_fn = None
    if mask_mod is not None:
        run_mask, mask_captures = trace("mask_mod", mask_mod, 4, MASK_ARGS)

        def mask_fn(q_side, k_side):
            def mask(b, h, q_idx, kv_idx):
                q_at, k_at = q_side["index"][b, q_idx], k_side["index"][b, kv_idx]
                return run_mask(b, h, q_at, k_at, *mask_captures)

            return mask

    split = context.SequenceSplit(mesh, "ring", axis=axis_name, batch_axis=None, balance=False)
    return context.split_attention(
        split, x.query, x.key, x.value, q_side=q_side, k_side=k_side, causal=x.is_causal,
        score_fn=score_fn, extras=tuple(extras), mask_fn=mask_fn, scale=x.scale,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring, q, k, v, kv_len):
    return _ring_forward(ring, q, k, v, kv_len)[0]


def _ring_fwd(ring, q, k, v, kv_len):
    out, lse, k, v = _ring_forward(ring, q, k, v, kv_len)
    return out, (q, k, v, kv_len, out, lse)


def _ring_bwd(ring, res, d_out):
    return (*_ring_backward(ring, *res, d_out), None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    scale: float | None = None,
    key_value_seq_lengths: Array | None = None,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
) -> Array:
    """Attention with the sequence split over a mesh axis (ring attention).

    out = softmax(scale * Q K^T, masked) V, as `kit.dot_product_attention`,
    with query, key and value split along their sequence axes over the P
    devices of `mesh` axis `axis_name` (`jax.shard_map`; other mesh axes hold
    copies). Key/value blocks pass around the ring, each device merging its
    partial results by log-sum-exp; the VJP passes them around again with
    their gradients, so memory per device grows with T / P, not T. See the
    module docstring for how causal work is balanced (contiguous blocks:
    device p does p + 1 blocks of work; no zig-zag order).

    A query row whose keys are all masked (`key_value_seq_lengths` = 0)
    returns exactly zero with zero gradients, as `kit.dot_product_attention`.

    Args:
      query: `[B, T, N, H]` or `[T, N, H]`; P must divide T.
      key: `[B, S, K, H]` or `[S, K, H]`; K divides N (grouped-query
        attention); P must divide S.
      value: as `key`.
      mesh: the device mesh.
      axis_name: the mesh axis to split the sequence over (the ring).
      is_causal: query i attends to keys j <= i; needs T == S.
      scale: a Python number; defaults to 1 / sqrt(H).
      key_value_seq_lengths: int `[B]`; keys at s >= length are padding.
      score_mod: `(score, b, h, q_idx, kv_idx) -> score`, as `kit.flex_attention`
        takes it (global indices; floating arrays it closes over get gradients),
        or None.
      mask_mod: `(b, h, q_idx, kv_idx) -> bool`, as `kit.flex_attention`'s block
        mask function (global indices; ANDed with the causal and length masks),
        or None. With either function the ring runs on
        `kit.attention.context.split_attention`: each step rebuilds the block
        mask of the key block it holds and skips its dead blocks.

    Returns:
      `[B, T, N, H]` (or `[T, N, H]`), dtype of `query`, split like `query`.

    Raises:
      ValueError: naming the argument: every input `kit.dot_product_attention`
        rejects, a mesh that is not a `jax.sharding.Mesh`, an axis name not in
        it, T or S not divisible by its size, `is_causal` with T != S, or a
        traced `scale`.

    References:
      Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for
      Near-Infinite Context", 2023.
    """
    x = check_inputs(
        query,
        key,
        value,
        scale=scale,
        is_causal=is_causal,
        key_value_seq_lengths=key_value_seq_lengths,
    )
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name: expected one of the mesh's axes {mesh.axis_names}, got {axis_name!r}"
        )
    P = mesh.shape[axis_name]
    B, T = x.query.shape[:2]
    S = x.key.shape[1]
    for name, length, letter in (("query", T, "T"), ("key", S, "S")):
        if length % P:
            raise ValueError(
                f"{name}: its length {letter} = {length} must be divisible by the {P} devices "
                f"of mesh axis {axis_name!r}"
            )
    if x.is_causal and T != S:
        raise ValueError(
            f"is_causal: ring attention's causal mask needs T == S (a device's query and key "
            f"blocks then cover the same positions), got T = {T}, S = {S}"
        )
    lengths_given = x.key_value_seq_lengths is not None
    local = (T // P, S // P)
    # Half the one-device backward key block (256 instead of 512): the backward's
    # score-sized scratch is a ring device's largest buffer besides its blocks, and
    # halving it takes the per-device memory at T = 16,384 on 8 devices from 0.28
    # to 0.25 of one device's program (docs/benchmarks.md).
    sizes = BlockSizes(backward_block_k=min(256, default_block_sizes(*local, backward=True)[1]))
    full = block_config(*local, x.scale, False, None, not lengths_given, sizes)
    diagonal = (
        block_config(*local, x.scale, True, None, not lengths_given, sizes) if x.is_causal else None
    )
    kv_len = jnp.full((B,), S, jnp.int32)
    if lengths_given:
        kv_len = jnp.minimum(x.key_value_seq_lengths, S)
    if score_mod is not None or mask_mod is not None:
        out = _programmed(
            x, mesh, axis_name, kv_len if lengths_given else None, score_mod, mask_mod
        )
        return x.unbatch(out)
    ring = _Ring(axis_name, P, full, diagonal, *local)
    Tp, Sp = full.padded_lengths

    def per_device(q, k, v, kv_len):
        q, k, v = pad_axis(q, 1, Tp), pad_axis(k, 1, Sp), pad_axis(v, 1, Sp)
        return _ring(ring, q, k, v, kv_len)[:, : local[0]]

    seq, whole = PartitionSpec(None, axis_name), PartitionSpec()
    specs = (seq, seq, seq, whole)
    args = (x.query, x.key, x.value, kv_len)
    if AxisType.Explicit in mesh.axis_types:  # shard_map takes such arrays only as it splits them
        args = [
            jax.sharding.reshard(a, NamedSharding(mesh, s))
            for a, s in zip(args, specs, strict=True)
        ]
    # check_vma=False: the kernel's loops start from constants (not varying over
    # the ring) that become varying, which the varying-axes check rejects.
    ring_map = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=seq, check_vma=False)
    out = ring_map(*args)
    return x.unbatch(out)
