"""Context parallelism: a model's attention with the sequence split over a mesh axis.

`kit.ring_attention` splits one call's sequence; a model also needs what its
attention reads beside q, k and v to follow the split: the positions a score
function measures distances in (ALiBi, T5), the segment ids of packed examples,
the padding, and, for causal attention, where each token sits in its row. Here
these are *sides*: dicts of `[B, L]` arrays, one for the queries and one for the
keys, split like q and k (`"index"`: the token's place in its row, what the
causal mask compares; `"positions"`: what the score function reads; optional
`"segments"` and `"live"`, a bool key mask). The mask is built from them, so a
token's place in the array does not matter: the rows may be permuted.

Two strategies (MaxText's `context_parallel_strategy`):

- `"all_gather"`: each device keeps its queries and gathers all keys and values
  (and their sides) along the axis, then runs `kit.flex_attention`; the
  gradients of the gathered keys are summed back (reduce-scatter). Simple, one
  collective, but each device holds all S keys and values while it attends.
- `"ring"`: keys and values (with their sides) pass around the ring as in
  `kit.ring_attention`, each device merging its partial results by log-sum-exp;
  the backward passes them around again with their gradients, so a device never
  holds more than its own block and the one visiting. Each step runs the chunked
  kernel with the mask and score functions of the block it holds (block masks
  rebuilt per step, dead blocks skipped), and the score function's learned
  arrays (`extras`, e.g. T5's table) get their gradients summed over the steps.

Load balance for causal attention (`zigzag_order`): the row is cut into 2P
chunks and device i holds chunks i and 2P - 1 - i (Brandon et al.'s "striped"
and the zig-zag order of ring-flash-attention and MaxText's
`reorder_causal_load_balanced`), so every device has the same number of live
(query, key) pairs. The permutation is applied once to a batch's sequences
(tokens, positions, segment ids, targets and loss weights); the sides carry the
original places.

References:
  Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for
  Near-Infinite Context", 2023.
  Brandon et al., "Striped Attention: Faster Ring Attention for Causal
  Transformers", 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kit.attention.blocks import BlockConfig, block_state, default_block_sizes
from kit.attention.chunked import BlockSizes, block_config, mask_blocks, pad_axis, program_arrays
from kit.attention.flex import BlockMask, and_masks, create_block_mask, flex_attention
from kit.attention.masks import MASK_VALUE, stat_dtype
from kit.attention.passes import (
    backward_from_delta,
    by_row,
    dq_from_transposed,
    forward_all,
    row_delta,
)
from kit.attention.programs import combine_states, differentiable, make_program

Array = jax.Array

STRATEGIES = ("all_gather", "ring")
# The block masks' granularity (and so the kernel's smallest block) along each side.
MASK_BLOCK = 128


def zigzag_order(length: int, parts: int) -> np.ndarray:
    """The load-balanced order of a row of `length` tokens over `parts` devices:
    int32 `[length]`, slot -> the token's original place. The row is cut into
    2 * parts chunks; device i (slots [i L / P, (i + 1) L / P)) holds chunks i
    and 2 * parts - 1 - i, so under a causal mask every device has the same
    number of live pairs.

    Raises:
      ValueError: if 2 * parts does not divide `length`.
    """
    if length % (2 * parts):
        raise ValueError(
            f"length: the zig-zag order cuts the row into 2 x {parts} chunks, "
            f"which does not divide {length}"
        )
    chunks = np.arange(length, dtype=np.int32).reshape(2 * parts, -1)
    pairs = [(chunks[i], chunks[2 * parts - 1 - i]) for i in range(parts)]
    return np.concatenate([c for pair in pairs for c in pair])


def live_blocks_per_device(order: np.ndarray, parts: int, block: int) -> np.ndarray:
    """Causal work per device of a row laid out in `order` (`[L]`, slot -> place),
    cut into blocks of `block` slots: how many (query block, key block) pairs of
    the device's queries against every key block hold a live pair (some key at or
    before some query). int `[parts]`; max / mean is the imbalance."""
    L = len(order)
    if L % (block * parts):
        raise ValueError(f"block: {parts} devices x blocks of {block} do not divide {L}")
    blocks = np.asarray(order).reshape(L // block, block)
    live = blocks.min(axis=1)[None, :] <= blocks.max(axis=1)[:, None]
    return live.reshape(parts, -1, live.shape[1]).sum(axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
    """Where and how a model's sequences are split (static).

    Attributes:
      mesh: the device mesh.
      strategy: "all_gather" or "ring".
      axis: the mesh axis the sequence is split over.
      batch_axis: the mesh axis splitting the batch, or None.
      balance: permute causal sequences into the zig-zag order (`zigzag_order`).
      head_groups: the ring passes its key/value heads in this many groups, one
        after another (it must divide K): each step then sends 1 / head_groups of
        the blocks, and a device holds that much less in flight (the blocks
        visiting, their gradients and the receive buffers), for head_groups
        times the rounds of messages.
    """

    mesh: Mesh
    strategy: str = "all_gather"
    axis: str = "seq"
    batch_axis: str | None = "data"
    balance: bool = True
    head_groups: int = 1

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.head_groups, int) or self.head_groups < 1:
            raise ValueError(f"head_groups: expected a positive int, got {self.head_groups!r}")
        if self.axis not in self.mesh.axis_names:
            raise ValueError(
                f"axis: expected one of the mesh's axes {self.mesh.axis_names}, got {self.axis!r}"
            )

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    def padded(self, length: int, causal: bool) -> int:
        """`length` rounded up to whole shares of the split: of 2 x size zig-zag
        chunks for a causal sequence with balance, else of size."""
        unit = 2 * self.size if (causal and self.balance) else self.size
        return -(-length // unit) * unit

    def order(self, length: int, causal: bool) -> np.ndarray:
        """The layout of a row of `length` tokens, slot -> place: the zig-zag order
        for a causal row with balance, else the places in order."""
        if not (causal and self.balance):
            return np.arange(length, dtype=np.int32)
        return zigzag_order(length, self.size)

    def spec(self, batch: int) -> PartitionSpec:
        """`[B, L, ...]` split by batch (where the batch axis divides B) and sequence."""
        data = self.batch_axis
        if data not in self.mesh.axis_names or batch % self.mesh.shape[data]:
            data = None
        return PartitionSpec(data, self.axis)

    def constrain(self, x: Array) -> Array:
        """`x [B, L, ...]` laid out split by batch and sequence (under jit)."""
        spec = self.spec(x.shape[0])
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def _mask_mod(q_side: dict, k_side: dict, causal: bool) -> Callable:
    """The mask function of the sides: live keys, causal by place, same segment."""

    def mask(b, h, q_idx, kv_idx):
        ok = jnp.bool_(True)
        if "live" in k_side:
            ok = k_side["live"][b, kv_idx]
        if causal:
            ok = ok & (k_side["index"][b, kv_idx] <= q_side["index"][b, q_idx])
        if "segments" in q_side:
            ok = ok & (q_side["segments"][b, q_idx] == k_side["segments"][b, kv_idx])
        return ok

    return mask


def side_block_mask(q_side: dict, k_side: dict, causal: bool, T: int, S: int, blocks) -> BlockMask:
    """The block mask of the sides' mask function (`_mask_mod`) from per-block
    summaries (the least and greatest place and segment of each block, whether its
    keys are live), without evaluating any pair: O(B T S / (bq bk)) work, not O(B T S).
    A block whose summaries allow some live pair is partial (the kernel evaluates
    the mask function there), so the mask is exact; it is full only when every
    pair is live.

    Args:
      q_side, k_side: the sides, padded to at least T and S (`[B, >= T]`, `[B, >= S]`).
      T, S: the live lengths (later slots are padding: dead).
      blocks: (bq, bk).
    """
    bq, bk = blocks
    nq, nk = -(-T // bq), -(-S // bk)
    B = q_side["index"].shape[0]
    big = jnp.iinfo(jnp.int32).max

    def tiles(x, n, b, length, fill):  # [B, >= length] -> [B, n, b], fill past length
        x = x[:, :length]
        return jnp.pad(x, ((0, 0), (0, n * b - length)), constant_values=fill).reshape(B, n, b)

    q_valid = tiles(jnp.ones((B, T), bool), nq, bq, T, False)
    k_valid = tiles(jnp.ones((B, S), bool), nk, bk, S, False)
    live = k_side.get("live", jnp.ones((B, S), bool))
    k_live = tiles(live, nk, bk, S, False)
    some = jnp.any(q_valid, axis=2)[:, :, None] & jnp.any(k_live, axis=2)[:, None, :]
    every = jnp.all(k_live | ~k_valid, axis=2)[:, None, :]

    def spans(x, valid):  # least and greatest of x over each block's valid slots
        return jnp.min(jnp.where(valid, x, big), axis=2), jnp.max(jnp.where(valid, x, -big), axis=2)

    if causal:
        q_lo, q_hi = spans(tiles(q_side["index"], nq, bq, T, 0), q_valid)
        k_lo, k_hi = spans(tiles(k_side["index"], nk, bk, S, 0), k_valid)
        some = some & (k_lo[:, None, :] <= q_hi[:, :, None])
        every = every & (k_hi[:, None, :] <= q_lo[:, :, None])
    if "segments" in q_side:
        q_lo, q_hi = spans(tiles(q_side["segments"], nq, bq, T, 0), q_valid)
        k_lo, k_hi = spans(tiles(k_side["segments"], nk, bk, S, 0), k_valid)
        some = (
            some & (k_lo[:, None, :] <= q_hi[:, :, None]) & (q_lo[:, :, None] <= k_hi[:, None, :])
        )
        one_q, one_k = (q_lo == q_hi)[:, :, None], (k_lo == k_hi)[:, None, :]
        every = every & one_q & one_k & (q_lo[:, :, None] == k_lo[:, None, :])
    states = block_state(some, every)[:, None]  # [B, 1, nq, nk]
    return BlockMask(states, _mask_mod(q_side, k_side, causal), (B, None, T, S), (bq, bk))


def _mods(score_fn, mask_fn, q_side, k_side, extras, causal, T, S, blocks):
    """A call's score function (or None) and block mask: the sides' mask function and
    states from their summaries, and where `mask_fn` is given, its mask function ANDed
    in and its evaluated states combined with theirs."""
    score = (
        None if score_fn is None else score_fn(q_side["positions"], k_side["positions"], *extras)
    )
    side = side_block_mask(q_side, k_side, causal, T, S, blocks)
    if mask_fn is None:
        return score, side
    user = mask_fn(q_side, k_side)
    B = q_side["index"].shape[0]
    states = create_block_mask(user, B, None, T, S, block_size=blocks).states
    mask = and_masks(side.mask_mod, user)
    return score, BlockMask(combine_states(side.states, states), mask, side.shape, blocks)


def _check_sides(q_side: dict, k_side: dict, B: int, T: int, S: int, causal: bool) -> None:
    for name, side, length in (("q_side", q_side, T), ("k_side", k_side, S)):
        if not isinstance(side, dict):
            raise ValueError(f"{name}: expected a dict of [B, L] arrays, got {type(side).__name__}")
        unknown = sorted(set(side) - {"index", "positions", "segments", "live"})
        if unknown:
            raise ValueError(f"{name}: unknown entries {unknown}")
        for key, x in side.items():
            if x.shape != (B, length):
                raise ValueError(f"{name}[{key!r}]: expected shape {(B, length)}, got {x.shape}")
    if causal and not ("index" in q_side and "index" in k_side):
        raise ValueError("q_side: causal attention needs 'index' on both sides")
    if ("segments" in q_side) != ("segments" in k_side):
        raise ValueError("q_side: 'segments' must be on both sides or neither")


def split_attention(
    split: SequenceSplit,
    query: Array,
    key: Array,
    value: Array,
    *,
    q_side: dict[str, Array],
    k_side: dict[str, Array],
    causal: bool = False,
    score_fn: Callable | None = None,
    extras: tuple = (),
    mask_fn: Callable | None = None,
    scale: float | None = None,
) -> Array:
    """Attention of queries `[B, T, N, H]` to keys and values `[B, S, K, H]` whose
    sequence axes are split over `split.axis` (`jax.shard_map`).

    The mask is built from the sides (see the module docstring): key `live`,
    `index` for `causal`, equal `segments`. `score_fn(q_positions, k_positions,
    *extras) -> score_mod` (or None) gives the score function, on each device's
    local sides (its q_idx / kv_idx index them); `extras` are the arrays it
    learns (replicated; their gradients are summed over the devices).
    `mask_fn(q_side, k_side) -> mask_mod` (or None) adds a mask function on the
    local sides, ANDed with theirs (its block states evaluated per block row).

    Returns:
      `[B, T, N, H]` in query's dtype, split like it.

    Raises:
      ValueError: naming the argument: T or S not divisible by the axis's size,
        sides of the wrong shape or missing what the mask needs.
    """
    B, T, _, H = query.shape
    S = key.shape[1]
    P = split.size
    for name, length in (("query", T), ("key", S)):
        if length % P:
            raise ValueError(
                f"{name}: its length {length} must be divisible by the {P} devices of mesh "
                f"axis {split.axis!r}"
            )
    _check_sides(q_side, k_side, B, T, S, causal)
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    spec = split.spec(B)
    extras = tuple(extras)
    if split.strategy == "all_gather":
        body = functools.partial(_gathered, split.axis, causal, score_fn, mask_fn, scale)
    else:
        local = (T // P, S // P)
        blocks = (min(MASK_BLOCK, local[0]), min(MASK_BLOCK, local[1]))
        # The backward's key block at half its one-device default, as kit.ring_attention.
        bwd_k = min(256, default_block_sizes(*local, backward=True)[1])
        sizes = mask_blocks(BlockSizes(backward_block_k=bwd_k), *local, blocks)
        cfg = block_config(*local, scale, False, None, False, sizes)
        if key.shape[2] % split.head_groups:
            raise ValueError(
                f"head_groups: {split.head_groups} does not divide the key's {key.shape[2]} heads"
            )
        ring = _Ring(
            split.axis, P, causal, score_fn, mask_fn, cfg, blocks, local, split.head_groups
        )
        body = functools.partial(_ringed, ring)
    args = (query, key, value, q_side, k_side, extras)
    specs = (spec, spec, spec, spec, spec, PartitionSpec())
    mesh = split.mesh
    if AxisType.Explicit in mesh.axis_types:  # shard_map takes such arrays only as it splits them

        def laid_out(tree, s):
            return jax.tree.map(lambda a: jax.sharding.reshard(a, NamedSharding(mesh, s)), tree)

        args = tuple(laid_out(a, s) for a, s in zip(args, specs, strict=True))
    # check_vma=False: the kernel's loops start from constants that become varying.
    run = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)
    return run(*args)


def _gathered(axis, causal, score_fn, mask_fn, scale, q, k, v, q_side, k_side, extras):
    """One device's queries against all keys, gathered along `axis`."""

    def gather(x):
        return lax.all_gather(x, axis, axis=1, tiled=True)

    k, v = gather(k), gather(v)
    k_side = {name: gather(x) for name, x in k_side.items()}
    T, S = q.shape[1], k.shape[1]
    blocks = (min(MASK_BLOCK, T), min(MASK_BLOCK, S))
    score_mod, block_mask = _mods(score_fn, mask_fn, q_side, k_side, extras, causal, T, S, blocks)
    return flex_attention(q, k, v, score_mod, block_mask, scale=scale)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static options of one context ring."""

    axis: str
    size: int
    causal: bool
    score_fn: Callable | None
    mask_fn: Callable | None
    cfg: BlockConfig  # without a program: each step adds its own
    blocks: tuple[int, int]  # the block masks' (bq, bk)
    local: tuple[int, int]  # (T / P, S / P)
    head_groups: int

    def permute(self, x):
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return lax.ppermute(x, self.axis, perm)

    def step(self, q, q_side, k_side, extras, heads):
        """The kernel's config and program arrays for the key block whose side is
        `k_side`, and the score function's captures; `heads`: the global index of
        each of q's heads (what the score function's h is)."""
        score_mod, block_mask = _mods(
            self.score_fn, self.mask_fn, q_side, k_side, extras, self.causal, *self.local,
            self.blocks,
        )  # fmt: skip
        program, captures = make_program(score_mod, block_mask.mask_mod, stat_dtype(q.dtype))
        B, N = q.shape[0], q.shape[2]
        cfg = dataclasses.replace(self.cfg, program=program)
        arrays = program_arrays(cfg, B, N, captures, block_mask)
        return cfg, (*arrays[:3], heads), captures

    def lengths(self, q):
        B = q.shape[0]
        return (jnp.full((B,), self.local[0], jnp.int32), jnp.full((B,), self.local[1], jnp.int32))


def _ring_forward(ring: _Ring, q, k, v, q_side, k_side, extras, heads):
    """out `[B, Tp, N, H]` and lse `[B, K, Tp * G]` of the local queries against all keys."""
    B, _, N, _ = q.shape
    K = k.shape[2]
    q_len, kv_len = ring.lengths(q)
    stat = stat_dtype(q.dtype)

    def step(_, carry):
        k, v, k_side, out, lse = carry
        cfg, prog, _ = ring.step(q, q_side, k_side, extras, heads)
        out_b, lse_b = forward_all(cfg, q, k, v, None, None, q_len, kv_len, prog)
        new = jnp.logaddexp(lse, lse_b)
        w_a, w_b = (jnp.exp(by_row(x - new, N // K))[..., None] for x in (lse, lse_b))
        out = w_a * out + w_b * out_b.astype(stat)
        k, v, k_side = ring.permute((k, v, k_side))
        return k, v, k_side, out, new

    out = jnp.zeros(q.shape, stat)
    lse = jnp.full((B, K, q.shape[1] * (N // K)), MASK_VALUE, stat)
    *_, out, lse = lax.fori_loop(0, ring.size, step, (k, v, k_side, out, lse))
    return out.astype(q.dtype), lse


def _ring_backward(ring: _Ring, q, k, v, q_side, k_side, extras, heads, out, lse, d_out):
    B, Tp, N, H = q.shape
    K = k.shape[2]
    q_len, kv_len = ring.lengths(q)
    delta = row_delta(out, d_out, K)
    learned = [i for i, e in enumerate(extras) if differentiable(e)]

    def step(_, carry):
        k, v, k_side, dk, dv, dq_t, d_extras = carry
        cfg, prog, captures = ring.step(q, q_side, k_side, extras, heads)
        program = cfg.program
        wanted = []  # the extras among the score function's captures, in capture order
        if program.score is not None:
            grad = []
            for c in captures[: program.num_score]:
                match = [i for i in learned if c is extras[i]]
                grad.append(bool(match))
                wanted += match[:1]
            cfg = dataclasses.replace(cfg, program=dataclasses.replace(program, grad=tuple(grad)))
        dq_t, dk_b, dv_b, _, d_caps = backward_from_delta(
            cfg, q, k, v, None, None, q_len, kv_len, delta, lse, d_out, dq_t, prog
        )
        d_extras = list(d_extras)
        for i, d in zip(wanted, d_caps, strict=True):
            d_extras[i] = d_extras[i] + d.astype(d_extras[i].dtype)
        # dk and dv travel with their block: after the P-th step they are home.
        k, v, k_side, dk, dv = ring.permute((k, v, k_side, dk + dk_b, dv + dv_b))
        return k, v, k_side, dk, dv, dq_t, tuple(d_extras)

    stat = stat_dtype(q.dtype)
    zeros_kv = jnp.zeros(k.shape, stat)
    dq_t = jnp.zeros((B, K, H, Tp * (N // K)), stat)
    d_extras = tuple(jnp.zeros(e.shape, stat_dtype(e.dtype)) for e in extras)
    carry = (k, v, k_side, zeros_kv, zeros_kv, dq_t, d_extras)
    _, _, _, dk, dv, dq_t, d_extras = lax.fori_loop(0, ring.size, step, carry)
    dq = dq_from_transposed(dq_t, q.shape)
    d_extras = tuple(
        d.astype(e.dtype) if i in learned else None
        for i, (d, e) in enumerate(zip(d_extras, extras, strict=True))
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_extras


def _head_slice(x: Array, group: Array, size: int, axis: int) -> Array:
    return lax.dynamic_slice_in_dim(x, group * size, size, axis=axis)


def _groups_forward(ring: _Ring, q, k, v, q_side, k_side, extras):
    """`_ring_forward` over the head groups one after another (`lax.fori_loop`, so
    one group's blocks are in flight at a time): out `[B, Tp, N, H]`, lse `[B, K, Tp * G]`."""
    N, K = q.shape[2], k.shape[2]
    groups = ring.head_groups
    if groups == 1:
        return _ring_forward(ring, q, k, v, q_side, k_side, extras, jnp.arange(N, dtype=jnp.int32))
    Ng, Kg = N // groups, K // groups
    B, Tp = q.shape[:2]

    def group(i, carry):
        out, lse = carry
        # query head n belongs to key/value head n // G: a group's heads are contiguous
        q_i = _head_slice(q, i, Ng, 2)
        k_i, v_i = _head_slice(k, i, Kg, 2), _head_slice(v, i, Kg, 2)
        heads = i * Ng + jnp.arange(Ng, dtype=jnp.int32)
        out_i, lse_i = _ring_forward(ring, q_i, k_i, v_i, q_side, k_side, extras, heads)
        out = lax.dynamic_update_slice_in_dim(out, out_i, i * Ng, axis=2)
        return out, lax.dynamic_update_slice_in_dim(lse, lse_i, i * Kg, axis=1)

    stat = stat_dtype(q.dtype)
    carry = (jnp.zeros(q.shape, q.dtype), jnp.zeros((B, K, Tp * (N // K)), stat))
    return lax.fori_loop(0, groups, group, carry)


def _groups_backward(ring: _Ring, q, k, v, q_side, k_side, extras, out, lse, d_out):
    """`_ring_backward` over the head groups one after another."""
    N, K = q.shape[2], k.shape[2]
    groups = ring.head_groups
    if groups == 1:
        heads = jnp.arange(N, dtype=jnp.int32)
        return _ring_backward(ring, q, k, v, q_side, k_side, extras, heads, out, lse, d_out)
    Ng, Kg = N // groups, K // groups
    learned = [i for i, e in enumerate(extras) if differentiable(e)]

    def group(i, carry):
        dq, dk, dv, d_extras = carry
        q_i, out_i, d_out_i = (_head_slice(x, i, Ng, 2) for x in (q, out, d_out))
        k_i, v_i = _head_slice(k, i, Kg, 2), _head_slice(v, i, Kg, 2)
        lse_i = _head_slice(lse, i, Kg, 1)
        heads = i * Ng + jnp.arange(Ng, dtype=jnp.int32)
        dq_i, dk_i, dv_i, d_ext = _ring_backward(
            ring, q_i, k_i, v_i, q_side, k_side, extras, heads, out_i, lse_i, d_out_i
        )
        dq = lax.dynamic_update_slice_in_dim(dq, dq_i, i * Ng, axis=2)
        dk = lax.dynamic_update_slice_in_dim(dk, dk_i, i * Kg, axis=2)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_i, i * Kg, axis=2)
        d_extras = tuple(a + d_ext[j] for j, a in zip(learned, d_extras, strict=True))
        return dq, dk, dv, d_extras

    d_extras = tuple(jnp.zeros(extras[j].shape, extras[j].dtype) for j in learned)
    carry = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), d_extras)
    dq, dk, dv, d_extras = lax.fori_loop(0, groups, group, carry)
    by_index = dict(zip(learned, d_extras, strict=True))
    return dq, dk, dv, tuple(by_index.get(j) for j in range(len(extras)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_call(ring, q, k, v, q_side, k_side, extras):
    return _groups_forward(ring, q, k, v, q_side, k_side, extras)[0]


def _ring_call_fwd(ring, q, k, v, q_side, k_side, extras):
    out, lse = _groups_forward(ring, q, k, v, q_side, k_side, extras)
    return out, (q, k, v, q_side, k_side, extras, out, lse)


def _ring_call_bwd(ring, res, d_out):
    dq, dk, dv, d_extras = _groups_backward(ring, *res, d_out)
    q_side, k_side = res[3], res[4]
    no_grad = jax.tree.map(lambda _: None, (q_side, k_side))
    return dq, dk, dv, *no_grad, d_extras


_ring_call.defvjp(_ring_call_fwd, _ring_call_bwd)


def _ringed(ring: _Ring, q, k, v, q_side, k_side, extras):
    """One device's share of the ring: padded to whole blocks, then cut back."""
    Tp, Sp = ring.cfg.padded_lengths
    q = pad_axis(q, 1, Tp)
    k, v = pad_axis(k, 1, Sp), pad_axis(v, 1, Sp)
    q_side = {name: pad_axis(x, 1, Tp) for name, x in q_side.items()}
    k_side = {name: pad_axis(x, 1, Sp) for name, x in k_side.items()}
    return _ring_call(ring, q, k, v, q_side, k_side, extras)[:, : ring.local[0]]
