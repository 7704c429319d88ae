"""Programmable attention: `flex_attention` with score and mask functions, and block masks.

The model is PyTorch's FlexAttention (Guessous, He, Hörhold, Liang, Zhang et al.,
"FlexAttention: A Programming Model for Generating Optimized Attention
Kernels", 2024), in the kit's layout (q `[B, T, N, H]`, k/v `[B, S, K, H]`):

- `score_mod(score, b, h, q_idx, kv_idx) -> score` changes a scaled logit;
- `mask_mod(b, h, q_idx, kv_idx) -> bool` says whether a pair may attend;
- `create_block_mask(mask_mod, B, N, T, S)` evaluates the mask function once
  and records, per block of `block_size` queries x keys, whether no pair, some
  or every pair is live (`BlockMask`), so the kernel never visits a dead block
  and skips the mask in a full one.

Both are written for scalars and may close over arrays (a slope table, segment
ids, learned parameters); the kit vectorizes them (`kit.attention.programs`)
and differentiates through what the score function captures.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from kit.attention.blocks import BLOCK_DEAD, block_state
from kit.attention.chunked import BlockSizes, chunked_from_inputs
from kit.attention.core import attention_dropout, masked_logsumexp, masked_softmax
from kit.attention.inputs import Inputs, check_bool, check_inputs
from kit.attention.masks import stat_dtype
from kit.attention.programs import (
    MASK_ARGS,
    make_program,
    on_grid,
    trace,
)

Array = jax.Array

_CHUNKED_MIN_PAIRS = 512 * 512


@dataclasses.dataclass(frozen=True)
class BlockMask:
    """A mask function with its block states (a pytree: `states` is its array).

    Attributes:
      states: int8 `[B|1, N|1, ceil(T / bq), ceil(S / bk)]`: per block of `bq`
        queries x `bk` keys, 0 if no pair may attend, 2 if every pair may, 1 if
        some may (the kernel evaluates `mask_mod` there).
      mask_mod: the mask function `(b, h, q_idx, kv_idx) -> bool`.
      shape: `(B, N, T, S)` as given to `create_block_mask` (B or N None: the
        same for every example or head).
      block_size: `(bq, bk)`.
    """

    states: Array
    mask_mod: Callable = dataclasses.field(metadata={"static": True})
    shape: tuple = dataclasses.field(metadata={"static": True})
    block_size: tuple[int, int] = dataclasses.field(metadata={"static": True})

    def sparsity(self) -> float:
        """The fraction of blocks that are dead (never visited)."""
        return float(jnp.mean(self.states == BLOCK_DEAD))


jax.tree_util.register_dataclass(
    BlockMask, data_fields=["states"], meta_fields=["mask_mod", "shape", "block_size"]
)


def _check_size(name: str, value, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    N: int | None,
    T: int,
    S: int,
    *,
    block_size: int | tuple[int, int] = 128,
) -> BlockMask:
    """Evaluates `mask_mod` on every (example, head, query, key) and keeps its block states.

    The mask is evaluated one block row at a time (`[bq, S]` pairs), so no
    `[T, S]` array is formed; it works under `jit`, where the arrays the mask
    function closes over (segment ids, say) may be traced.

    Args:
      mask_mod: `(b, h, q_idx, kv_idx) -> bool` for scalars.
      B: the batch size, or None if the mask is the same for every example
        (it is then evaluated with b = 0).
      N: the number of query heads, or None if the same for every head (h = 0).
      T: the query length.
      S: the key length.
      block_size: `bq` for both, or `(bq, bk)`; the chunked kernel's blocks are
        whole multiples of it.

    Returns:
      The `BlockMask`.

    Raises:
      ValueError: naming the argument, for a mask function of the wrong arity
        or that does not return a bool scalar, or a size that is not a positive int.
    """
    run, captures = trace("mask_mod", mask_mod, 4, MASK_ARGS)
    _check_size("B", B, True)
    _check_size("N", N, True)
    _check_size("T", T, False)
    _check_size("S", S, False)
    sizes = (block_size, block_size) if isinstance(block_size, numbers.Integral) else block_size
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 2:
        raise ValueError(f"block_size: expected an int or a (bq, bk) pair, got {block_size!r}")
    for size in sizes:
        _check_size("block_size", size, False)
    bq, bk = int(sizes[0]), int(sizes[1])
    nq, nk = -(-T // bq), -(-S // bk)
    nb, nh = B or 1, N or 1

    def row_states(index):  # one (example, head, query block): int8 [nk]
        b, rest = jnp.divmod(index, nh * nq)
        h, i = jnp.divmod(rest, nq)
        q_idx = i * bq + jnp.arange(bq, dtype=jnp.int32)
        kv_idx = jnp.arange(nk * bk, dtype=jnp.int32)
        live = on_grid(lambda _, q, kv: run(b, h, q, kv, *captures), None, [q_idx, kv_idx])
        valid = (q_idx < T)[:, None] & (kv_idx < S)[None, :]
        some = jnp.any((live & valid).reshape(bq, nk, bk), axis=(0, 2))
        every = jnp.all((live | ~valid).reshape(bq, nk, bk), axis=(0, 2))
        return block_state(some, every)

    # A few block rows at a time (lax.map's batch), each at most a few million pairs.
    per_row = bq * nk * bk
    batch = max(1, min(nb * nh * nq, (1 << 22) // per_row))
    states = lax.map(row_states, jnp.arange(nb * nh * nq, dtype=jnp.int32), batch_size=batch)
    return BlockMask(states.reshape(nb, nh, nq, nk), mask_mod, (B, N, T, S), (bq, bk))


def and_masks(*mask_mods: Callable) -> Callable:
    """The mask function that lets a pair attend iff every one of `mask_mods` does."""
    return _combine("and_masks", mask_mods, jnp.logical_and)


def or_masks(*mask_mods: Callable) -> Callable:
    """The mask function that lets a pair attend iff any one of `mask_mods` does."""
    return _combine("or_masks", mask_mods, jnp.logical_or)


def _combine(name: str, mask_mods, op) -> Callable:
    if not mask_mods:
        raise ValueError(f"{name}: expected at least one mask function")
    for i, fn in enumerate(mask_mods):
        if not callable(fn):
            raise ValueError(f"{name}: argument {i} is not a function: {fn!r}")

    def combined(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for fn in mask_mods[1:]:
            out = op(out, fn(b, h, q_idx, kv_idx))
        return out

    return combined


def _check_block_mask(block_mask, x: Inputs) -> None:
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise ValueError(
            f"block_mask: expected a kit.BlockMask (kit.create_block_mask), got "
            f"{type(block_mask).__name__}"
        )
    B, T, N = x.query.shape[:3]
    S = x.key.shape[1]
    mB, mN, mT, mS = block_mask.shape
    if (mT, mS) != (T, S) or mB not in (None, 1, B) or mN not in (None, 1, N):
        raise ValueError(
            f"block_mask: built for (B, N, T, S) = {block_mask.shape}, but the call has "
            f"B={B}, N={N}, T={T}, S={S} (B and N may be None or 1)"
        )


def flex_attention(
    query: Array,
    key: Array,
    value: Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    *,
    scale: float | None = None,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    implementation: str | None = None,
    kernel_options: dict | None = None,
    return_residual: bool = False,
):
    """Attention with a score function and a block mask (PyTorch's FlexAttention in JAX).

    softmax over the live keys of score_mod(scale * q.k, b, h, q_idx, kv_idx), where a
    pair is live if `block_mask.mask_mod` allows it (and within the lengths);
    rows with no live key return exactly zero.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key: `[B, S, K, H]`; K divides N (grouped-query attention).
      value: `[B, S, K, H]`.
      score_mod: `(score, b, h, q_idx, kv_idx) -> score` for scalars, or None.
        Arrays it closes over get gradients (a learned table, slopes, sinks).
      block_mask: from `create_block_mask` for these B, N, T, S, or None (all live).
      scale: the logit scale; default 1 / sqrt(H).
      query_seq_lengths: int `[B]` or None, as in `kit.dot_product_attention`
        (padding without a block mask).
      key_value_seq_lengths: int `[B]` or None, as in
        `kit.dot_product_attention` (padding without a block mask).
      implementation: None (chunked from T x S >= 512 x 512, else xla), "xla"
        (materializes the `[B, N, T, S]` scores: the reference) or "chunked"
        (block-sparse, O(T) memory, its own derivatives).
      kernel_options: the chunked path's block sizes, as `kit.chunked_attention`
        takes them (block_q, block_k, backward_block_q, backward_block_k,
        units_per_step); rounded up to whole multiples of the block mask's.
      return_residual: also return the log-sum-exp of each row `[B, T, N]`
        (-inf for rows with no live key; no gradient), as `dot_product_attention`.

    Returns:
      out `[B, T, N, H]` (or `(out, residual)`).

    Raises:
      ValueError: naming the argument, for bad arrays, a score or mask
        function of the wrong arity or that returns the wrong shape or dtype, a
        block mask built for other sizes, or an unknown implementation.
    """
    x = check_inputs(
        query,
        key,
        value,
        scale=scale,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
    )
    check_bool("return_residual", return_residual)
    out, _, lse = flex_attend(
        x,
        score_mod,
        block_mask,
        implementation=implementation,
        sizes=_kernel_options(kernel_options),
        return_residual=bool(return_residual),
    )
    return (out, lse) if return_residual else out


def flex_attend(
    x: Inputs,
    score_mod: Callable | None,
    block_mask: BlockMask | None,
    *,
    implementation: str | None = None,
    sizes: BlockSizes | None = None,
    return_weights: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_residual: bool = False,
    tap: Callable | None = None,
):
    """`flex_attention` on checked inputs (which may also carry the causal, window
    and length masks), for the kit's own layers: with `return_weights`, attention
    dropout or a `tap` it runs the materialized path, which gives the weights
    `[B, N, T, S]`. `tap(name, array) -> array` (a `kit.hooks.Tap`) sees and may
    change the float32 "scores" (before the mask) and "weights" (before dropout).

    Returns:
      out, the weights or None, the residual or None (no batch axis for unbatched input).
    """
    x, score_mod, block_mask = with_dense(x, score_mod, block_mask)
    _check_block_mask(block_mask, x)
    if implementation not in (None, "xla", "chunked"):
        raise ValueError(
            f"implementation: expected None, 'xla' or 'chunked', got {implementation!r}"
        )
    mask_mod = None if block_mask is None else block_mask.mask_mod
    program, captures = make_program(score_mod, mask_mod, stat_dtype(x.query.dtype))
    if implementation is None:
        big = x.query.shape[1] * x.key.shape[1] >= _CHUNKED_MIN_PAIRS
        implementation = "chunked" if big and isinstance(x.scale, float) else "xla"
    if return_weights or dropout_rate > 0.0 or tap is not None:
        implementation = "xla"
    if implementation == "chunked":
        out, lse = chunked_from_inputs(
            x,
            sizes or BlockSizes(),
            return_residual=return_residual,
            program=program,
            captures=captures,
            block_mask=block_mask,
        )
        return out, None, lse
    return _xla(
        x, program, captures, return_residual, return_weights, dropout_rate, dropout_rng, tap
    )


def with_dense(x: Inputs, score_mod, block_mask):
    """`x`'s dense bias and mask (`[B|1, N|1, T|1, S|1]`) folded into the score
    function and the block mask, for layers that take both (a padding mask of the
    keys beside positions as a score function): returns (inputs without them,
    score_mod, block_mask). Indexing a broadcast axis reads its one entry."""
    if x.bias is None and x.mask is None:
        return x, score_mod, block_mask

    def at(array, b, h, t, s):
        index = [i if n > 1 else 0 for i, n in zip((b, h, t, s), array.shape, strict=True)]
        return array[tuple(index)]

    bias, mask = x.bias, x.mask
    if bias is not None:
        inner = score_mod

        def score_mod(score, b, h, t, s):
            score = score if inner is None else inner(score, b, h, t, s)
            return score + at(bias, b, h, t, s).astype(score.dtype)

    if mask is not None:
        B, T, N = x.query.shape[:3]
        S = x.key.shape[1]
        masks = [lambda b, h, t, s: at(mask, b, h, t, s)]
        if block_mask is not None:
            masks.insert(0, block_mask.mask_mod)
        per = (B if mask.shape[0] > 1 else None, N if mask.shape[1] > 1 else None)
        if block_mask is not None:
            per = tuple(p or m for p, m in zip(per, block_mask.shape[:2], strict=True))
        block_mask = create_block_mask(and_masks(*masks), *per, T, S)
    return dataclasses.replace(x, bias=None, mask=None), score_mod, block_mask


def _kernel_options(options) -> BlockSizes:
    if options is None:
        return BlockSizes()
    names = [f.name for f in dataclasses.fields(BlockSizes)]
    if not isinstance(options, dict) or set(options) - set(names):
        raise ValueError(f"kernel_options: expected a dict with keys from {names}, got {options!r}")
    sizes = BlockSizes(**options)
    sizes.check()
    return sizes


def _xla(x: Inputs, program, captures, return_residual, return_weights, rate, rng, tap=None):
    """The materialized reference: `[B, N, T, S]` scores, score function, mask, softmax."""
    q, k, v = x.query, x.key, x.value
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    stat = stat_dtype(q.dtype)
    grouped = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", grouped, k, preferred_element_type=stat)
    logits = logits.reshape(B, N, T, S) * jnp.asarray(x.scale, stat)
    grid = [jnp.arange(n, dtype=jnp.int32) for n in (B, N, T, S)]
    mask = x.full_mask()
    if program is not None:
        n = program.num_score
        if program.score is not None:

            def score(s, b, h, t, u):
                return program.score(s, b, h, t, u, *captures[:n]).astype(s.dtype)

            logits = on_grid(score, logits, grid)
        if program.mask is not None:
            live = on_grid(lambda _, *idx: program.mask(*idx, *captures[n:]), None, grid)
            mask = live if mask is None else mask & live
    if tap is not None:
        logits = tap("scores", logits)
    weights = masked_softmax(logits, mask)
    if tap is not None:
        weights = tap("weights", weights)
    kept = attention_dropout(weights, rate, rng) if rate > 0.0 else weights
    out = jnp.einsum(
        "bkgts,bskh->btkgh",
        kept.reshape(B, K, N // K, T, S).astype(v.dtype),
        v,
        preferred_element_type=stat,
    )
    out = x.unbatch(out.reshape(B, T, N, H).astype(q.dtype))
    weights = x.unbatch(weights) if return_weights else None
    if not return_residual:
        return out, weights, None
    lse = masked_logsumexp(logits, mask)  # [B, N, T]
    return out, weights, x.unbatch(jnp.swapaxes(lse, 1, 2).astype(q.dtype))
