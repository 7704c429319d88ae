"""Block bookkeeping shared by the chunked kernel's forward and backward passes.

The kernel works on one example b at a time, with all its K key/value heads,
each with G = N // K query heads. It reads its blocks from the whole inputs in
their own layout, q `[B, Tp, N, H]` and k, v `[B, Sp, K, H]` (Tp, Sp: lengths
padded to whole blocks), and brings each block into head-major `[K, ...]`
layout, where a query's G heads are consecutive rows: a query block is
`[K, bq * G, H]` in (position, head) order. Bias and mask come per example,
`[K|1, G|1, Tp|1, Sp|1]`, and the lengths as scalars.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kit.attention.masks import stat_dtype

Array = jax.Array

# One example per loop step. On the 2-core AMD EPYC (2026-12-07, causal, N=8, H=64,
# experiments/bench_units.py), steps of 8 units (2-8 examples under lax.map's vmap) took
# 1.06-1.28x one example's time at B=4, T=2048 with K = 1, 2, 4 (the forward at K=4
# equal), and 1.19-1.89x at B=16, T=512 with K = 1, 2. One example a step also traces
# and compiles the kernel once, where a batch of examples is traced again by the vmap.
DEFAULT_UNITS_PER_STEP = 1


@dataclasses.dataclass(frozen=True)
class BlockConfig:
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
    # A score and/or mask function (`kit.attention.programs.Program`), or None.
    program: object = None

    @property
    def padded_lengths(self) -> tuple[int, int]:
        """(Tp, Sp): the query and key lengths padded to whole blocks."""
        return self.num_q_blocks * self.block_q, self.num_k_blocks * self.block_k

    def for_backward(self) -> BlockConfig:
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
    measured fastest with 512 x 256 and 8 units (one example of K=8), and the backward (whose
    blocks are `[block_k, block_q]`, keys as rows) with 256 x 512, for causal
    attention at B=4, T=2048, N=8, H=64 on a 2-core CPU. Lengths that are multiples of
    512 and all lengths above 768 take those sizes.

    Other lengths up to 768 are covered by one block where the pass keeps a block of
    that axis whole (the forward's queries, the backward's keys): the length rounded up
    to a multiple of 8 (up to 512) or of 128 (640 or 768), with the other axis in blocks
    of 256, 128 or the whole length, whichever divides it first. So both passes pad the
    length alike (the padded length is a multiple of every block size of its axis) and by
    less than 128. Before, a length's two passes could ask for blocks whose least common
    multiple was far longer: T = 384 was padded to 768 (forward blocks of 384 queries,
    backward blocks of 256), T = 300 to 4864, and every T from 513 to 1023 to 1024.
    One block of 1024 queries measured no faster than two of 512 (scratch runs at
    T = 1000 and 1024), so lengths from 769 on keep the fixed sizes
    (`experiments/bench_blocks.py`, docs/benchmarks.md).
    """

    def covered(length: int) -> int:
        """The padded length one block covers, or 0 where the fixed sizes apply."""
        if length <= 768 and length % 512:
            step = 8 if length <= 512 else 128
            return -(-length // step) * step
        return 0

    def split(padded: int) -> int:
        return next(size for size in (256, 128, padded) if padded % size == 0)

    q_cover, k_cover = covered(query_length), covered(key_length)
    if backward:
        return (split(q_cover) if q_cover else 256), (k_cover or 512)
    return (q_cover or 512), (split(k_cover) if k_cover else 256)


class PassDims(NamedTuple):
    """One example's pass, read from its arrays: q `[B, Tp, N, H]`, k `[B, Sp, K, H]`,
    G = N // K query heads per key/value head, the block sizes, the statistics'
    dtype (`masks.stat_dtype`) and the scale in it."""

    Tp: int
    N: int
    H: int
    K: int
    G: int
    bq: int
    bk: int
    stat: jnp.dtype
    scale: Array


def pass_dims(cfg, q: Array, k: Array) -> PassDims:
    """The sizes every pass of the chunked kernel starts from."""
    _, Tp, N, H = q.shape
    K = k.shape[2]
    stat = stat_dtype(q.dtype)
    return PassDims(
        Tp, N, H, K, N // K, cfg.block_q, cfg.block_k, stat, jnp.asarray(cfg.scale, stat)
    )


def slice_block(x: Array | None, start: Array, size: int, axis: int) -> Array | None:
    """The block [start, start + size) of `x` along `axis`, or `x` if it broadcasts there."""
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis, allow_negative_indices=False)


def swap01(x: Array) -> Array:
    """Swaps the two leading axes, as a transpose with no size-1 axes: XLA:CPU
    transposes with size-1 axes (G = 1, say) several times slower."""
    a, b, *rest = x.shape
    if a == 1 or b == 1:
        return x.reshape(b, a, *rest)
    n = math.prod(rest)
    return jnp.swapaxes(x.reshape(a, b, n) if n > 1 else x.reshape(a, b), 0, 1).reshape(b, a, *rest)


def head_major(x: Array, K: int) -> Array:
    """`[T, K * G, H]` -> `[K, T * G, H]`."""
    T, N, H = x.shape
    return swap01(x.reshape(T, K, N // K * H)).reshape(K, -1, H)


def position_major(x: Array, T: int) -> Array:
    """`[K, T * G, H]` -> `[T, K * G, H]`, the inverse of `head_major`."""
    K, _, H = x.shape
    return swap01(x.reshape(K, T, -1)).reshape(T, -1, H)


def block_live(cfg, t0, num_t, s0, num_s, q_len, kv_len, *, keys_first=False) -> Array:
    """bool `[num_t, num_s]`, or `[num_s, num_t]` with `keys_first`: may query
    t0 + a attend to key s0 + b? The one rule for both passes and both layouts."""
    t, s = positions(t0, num_t), positions(s0, num_s)
    if keys_first:
        return _pair_live(cfg, t[None, :], s[:, None], q_len, kv_len)
    return _pair_live(cfg, t[:, None], s[None, :], q_len, kv_len)


def block_band(cfg, outer: Array, q_len, kv_len, *, keys_first=False) -> tuple[Array, Array]:
    """`[lo, hi)`: the key blocks that query block `outer` meets, or with `keys_first`
    the query blocks that key block `outer` meets, under the causal, window and length
    rules (the lengths are left out where `cfg.structural_only`). The one loop-range
    rule for both passes: query t meets key s for t - left <= s <= t + right, with
    right at most 0 when causal, so key s meets queries s - right <= t <= s + left."""
    left, right = cfg.window if cfg.window is not None else (None, None)
    if cfg.is_causal:
        right = 0 if right is None else min(right, 0)
    own, other, count = cfg.block_q, cfg.block_k, cfg.num_k_blocks
    own_len, other_len, before, after = q_len, kv_len, left, right
    if keys_first:
        own, other, count = cfg.block_k, cfg.block_q, cfg.num_q_blocks
        own_len, other_len, before, after = kv_len, q_len, right, left
    first = outer * own
    lo, hi = jnp.int32(0), jnp.int32(count)
    if before is not None:
        lo = jnp.maximum(lo, (first - before) // other)
    if after is not None:
        hi = jnp.minimum(hi, (first + own - 1 + after) // other + 1)
    if cfg.structural_only:
        return lo, hi
    hi = jnp.minimum(hi, -(-other_len // other))
    return lo, jnp.maximum(jnp.where(first < own_len, hi, lo), lo)  # padding rows meet none


# Block states, one per (query block, key block): no pair live, some, all.
BLOCK_DEAD, BLOCK_PARTIAL, BLOCK_FULL = 0, 1, 2


def block_state(some: Array, every: Array) -> Array:
    """int8 block states from whether some and whether every pair of a block is live."""
    return jnp.where(some, jnp.where(every, BLOCK_FULL, BLOCK_PARTIAL), BLOCK_DEAD).astype(jnp.int8)


def merge_states(states: Array, axis) -> Array:
    """The state of blocks taken together along `axis`: dead if all are, full if
    all are, else partial (a coarser block, or one block for several heads)."""
    some = jnp.max(states, axis=axis) != BLOCK_DEAD
    every = jnp.min(states, axis=axis) == BLOCK_FULL
    return block_state(some, every)


def builtin_states(cfg, q_len, kv_len) -> Array:
    """int8 `[num_q_blocks, num_k_blocks]`: the state (`BLOCK_*`: dead,
    partial, full) of each block under the causal, window and length masks.

    With the window `(left, right)` (causal: right = 0; none: unbounded), the
    pairs of a block live without lengths form a band, so a block has a live
    pair iff the band's key range over its live queries meets its live keys,
    and is full iff its corners lie inside the band and within the lengths.
    """
    big = 2**30
    left, right = cfg.window if cfg.window is not None else (big, big)
    if cfg.is_causal:
        right = min(right, 0)
    t0 = positions(0, cfg.num_q_blocks)[:, None] * cfg.block_q
    s0 = positions(0, cfg.num_k_blocks)[None, :] * cfg.block_k
    t1, s1 = t0 + cfg.block_q - 1, s0 + cfg.block_k - 1
    t1_live, s1_live = jnp.minimum(t1, q_len - 1), jnp.minimum(s1, kv_len - 1)
    some = (t0 <= t1_live) & (s0 <= s1_live) & (s0 <= t1_live + right) & (s1_live >= t0 - left)
    every = (t1 < q_len) & (s1 < kv_len) & (s1 <= t0 + right) & (s0 >= t1 - left)
    return block_state(some, every)


def _pair_live(cfg, t: Array, s: Array, q_len, kv_len) -> Array:
    """bool: may query position t attend to key position s (broadcasting)?"""
    live = (t < q_len) & (s < kv_len)
    if cfg.is_causal:
        live = live & (s <= t)
    if cfg.window is not None:
        left, right = cfg.window
        live = live & (s >= t - left) & (s <= t + right)
    return live


def varying_like(x, *refs):
    """`x` (a pytree) typed as varying over every manual mesh axis that one of `refs`
    varies over. Inside a user's `jax.shard_map`, the inputs vary over its axes while a
    loop carry made by `jnp.zeros` does not, and a loop refuses a carry whose type
    changes; outside one there is nothing to do."""
    axes = set()
    for ref in refs:
        if ref is not None:
            axes |= jax.typeof(ref).manual_axis_type.varying

    def cast(leaf):
        missing = axes - jax.typeof(leaf).manual_axis_type.varying
        return lax.pcast(leaf, tuple(sorted(missing)), to="varying") if missing else leaf

    return jax.tree.map(cast, x) if axes else x


def positions(start: Array, size: int) -> Array:
    return start + jnp.arange(size, dtype=jnp.int32)


def example_rows(x: Array, b: Array, start: Array, size: int) -> Array:
    """`x[b, start:start + size]`: one block of positions of example b, read in place."""
    # Every index int32: with x64 on, a Python 0 would be int64, which dynamic_slice
    # refuses beside the int32 ones.
    index = (b, start) + (jnp.int32(0),) * (x.ndim - 2)
    return lax.dynamic_slice(x, index, (1, size, *x.shape[2:]), allow_negative_indices=False)[0]


def add_block(full: Array, block: Array, starts: dict[int, Array]) -> Array:
    index = [starts.get(axis, jnp.int32(0)) for axis in range(full.ndim)]
    current = lax.dynamic_slice(full, index, block.shape, allow_negative_indices=False)
    return lax.dynamic_update_slice(full, current + block, index, allow_negative_indices=False)
