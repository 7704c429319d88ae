"""Memory-efficient (flash-style) attention in pure JAX, with its own derivatives.

Queries and keys/values are processed in blocks with an online softmax
(running max m and sum l), so no `[T, S]` array is ever formed; the backward
pass recomputes each block's scores from the saved log-sum-exp, so the
residuals are O(T), not O(T * S). Blocks wholly outside a causal or window
mask, or wholly beyond the sequence lengths, are skipped by the loop bounds,
not computed and masked; where the causal structure is the only mask, a block
on the diagonal computes only its rows that can be live.

Semantics are those of `kit.dot_product_attention` (see `kit.attention.api`):
float32 scores and softmax statistics (float64 for float64 inputs), a finite
mask value, and exactly zero output with zero gradients for query rows with no
live key.

The kernel works on one example at a time (`lax.map` over the example
indices), with all its K key/value heads, each with G = N // K query heads,
together. It reads the inputs in their own `[B, T, N, H]` layout and writes
the outputs in it: each block is read straight from the whole input and
brought into the products' head-major layout on its own, so no transposed
copy of an example, let alone of a whole array, is made.

The passes over all examples are in `kit.attention.passes`. Under jit on a
device mesh (`kit.attention.partition`), each pass runs per device on the
examples and heads that device holds (`custom_partitioning`, which sees
the shardings XLA's propagation chose), so batch- and head-sharded inputs need
no communication. Heads are split only where the same mesh axes divide both
query's N and key's K heads; otherwise they are gathered (one all-gather) and
only the batch is split. A bias or mask broadcast over a split axis gets its
gradient summed over the devices (one all-reduce). On Explicit mesh axes,
where the sharding is in the types, a `shard_map` over the same split does
this instead; the tangent kernel (forward mode) is not partitioned.

References:
  Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory", 2021.
  Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
  IO-Awareness", 2022. Dao, "FlashAttention-2", 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from kit.attention import partition, passes
from kit.attention.blocks import (
    DEFAULT_UNITS_PER_STEP,
    BlockConfig,
    default_block_sizes,
    merge_states,
)
from kit.attention.inputs import Inputs, explicit_axes
from kit.attention.linear import linear_call
from kit.attention.masks import MASK_VALUE
from kit.attention.programs import grad_captures

Array = jax.Array

# Derivatives. One custom JVP serves forward and reverse mode: its tangent is the
# blockwise `tangent_all`, paired by `linear_call` with its transpose, the blockwise
# backward, so that jax.grad runs the hand-written backward (saving q, k, v, out and
# lse, O(T)) and jax.jvp the tangent kernel. Derivatives of the backward itself
# (second order) are not written; they raise an error that names the remedy.


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, mask, q_len, kv_len, prog):
    """out `[B, Tp, N, H]` and lse `[B, K, Tp * G]`; lse carries no derivative.
    `prog`: a programmed call's arrays (`program_arrays`) or None."""
    return partition.forward(cfg, q, k, v, bias, mask, q_len, kv_len, prog)


def _flash_jvp(cfg, primals, tangents):
    q, k, v, bias, mask, q_len, kv_len, prog = _first_order_only(primals)
    out, lse = partition.forward(cfg, q, k, v, bias, mask, q_len, kv_len, prog)
    # Only the tangents that are not symbolic zeros (inputs held constant) are
    # linear arguments: the transpose must be able to give each a cotangent.
    given = tuple(
        x is not None and not isinstance(t, SymbolicZero)
        for x, t in zip((q, k, v, bias), tangents[:4], strict=True)
    )
    linear = tuple(t for t, g in zip(tangents[:4], given, strict=True) if g)
    if prog is not None and cfg.program.score is not None:
        # The score function's floating captures with a tangent are linear too;
        # the kernel differentiates through just those (`Program.grad`).
        program = cfg.program
        cap_tangents = tangents[7][0][: program.num_score]
        wanted = tuple(
            g and not isinstance(t, SymbolicZero)
            for g, t in zip(program.grad, cap_tangents, strict=True)
        )
        cfg = dataclasses.replace(cfg, program=dataclasses.replace(program, grad=wanted))
        linear += tuple(t for t, w in zip(cap_tangents, wanted, strict=True) if w)
    # lse is a statistic with no derivative, as jax.nn's residual
    d_lse = jnp.zeros_like(lse)
    if not linear:
        return (out, lse), (jnp.zeros_like(out), d_lse)
    residuals = (q, k, v, bias, mask, q_len, kv_len, out, lse, prog)
    (d_out,) = linear_call(
        functools.partial(_tangent, cfg, given),
        functools.partial(_transpose, cfg, given),
        residuals,
        linear,
    )
    return (out, lse), (d_out, d_lse)


_flash.defjvp(_flash_jvp, symbolic_zeros=True)


def _tangent(cfg, given, residuals, linear):
    """d_out along the given tangents of (q, k, v, bias) and of the wanted
    captures (after them in `linear`); the others are zero."""
    linear = iter(linear)
    q, k, v, bias = residuals[:4]
    dq, dk, dv, dbias = (
        next(linear) if g else (None if x is None else jnp.zeros_like(x))
        for x, g in zip((q, k, v, bias), given, strict=True)
    )
    *arrays, prog = residuals
    d_out = passes.tangent_all(cfg, *arrays, dq, dk, dv, dbias, prog, tuple(linear))
    return (d_out,)


def _transpose(cfg, given, residuals, cotangents):
    """The backward: cotangents of the given tangents of (q, k, v, bias) and of
    the wanted captures, from d_out's."""
    (d_out,) = cotangents
    *arrays, prog = residuals
    if prog is None:
        grads, d_caps = partition.backward(cfg, *arrays, d_out, prog), ()
    else:
        *grads, d_caps = partition.backward(cfg, *arrays, d_out, prog)
        # Inside shard_map a capture the same on every device gets the sum of the
        # devices' cotangents (each device's covers its own examples and heads).
        wanted = grad_captures(cfg.program, prog[0])
        d_caps = tuple(_sum_over_devices(d, c) for d, c in zip(d_caps, wanted, strict=True))
    return tuple(d for d, g in zip(grads, given, strict=True) if g) + tuple(d_caps)


def _sum_over_devices(d: Array, like: Array) -> Array:
    """`d` summed over the manual mesh axes it varies over and `like` does not."""
    extra = jax.typeof(d).manual_axis_type.varying - jax.typeof(like).manual_axis_type.varying
    return lax.psum(d, tuple(sorted(extra))) if extra else d


_SECOND_ORDER = (
    "implementation: the 'chunked' path (which implementation=None picks on CPU from "
    "T x S >= 512 x 512) computes first derivatives only (jax.grad, jax.vjp, jax.jvp, "
    "jax.linearize); a second derivative (a gradient of a gradient, jax.hessian, a "
    "Hessian-vector product) needs implementation='xla', which materializes the "
    "[T, S] weights"
)


@jax.custom_jvp
def _first_order_only(primals):
    return primals


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise ValueError(_SECOND_ORDER)


def pad_axis(x: Array | None, axis: int, size: int, *, broadcast: bool = False) -> Array | None:
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
    return pad_axis(pad_axis(x, 3, T, broadcast=True), 4, S, broadcast=True)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """The chunked path's tuning knobs, as `kit.chunked_attention` documents them;
    None means chosen from the lengths (`default_block_sizes`)."""

    block_q: int | None = None
    block_k: int | None = None
    backward_block_q: int | None = None
    backward_block_k: int | None = None
    units_per_step: int | None = None

    def check(self) -> None:
        """Raises ValueError naming the first size that is not a positive int."""
        for field in dataclasses.fields(self):
            size = getattr(self, field.name)
            if size is not None and (
                not isinstance(size, int) or isinstance(size, bool) or size <= 0
            ):
                raise ValueError(f"{field.name}: expected a positive int, got {size!r}")


def block_config(
    T: int,
    S: int,
    scale: float | Array,
    is_causal: bool,
    window: tuple[int, int] | None,
    unmasked: bool,
    sizes: BlockSizes = BlockSizes(),
    *,
    padded_rows_live: bool = False,
) -> BlockConfig:
    """The kernel's static configuration for T queries and S keys, from the
    given block sizes (others chosen from the lengths); `unmasked`: no mask,
    lengths or window, only the causal structure (if any). `padded_rows_live`: the
    caller gives the kernel the padded lengths (Tp, Sp) where `padding_is_unseen`, so
    that such a config keeps the structural path (`chunked_from_inputs` does; ring
    attention, which gives its own lengths, does not).

    Raises:
      ValueError: for a non-positive block size or a traced scale, naming it.
    """
    sizes.check()
    if not isinstance(scale, float):
        raise ValueError(
            f"scale: the chunked path needs a Python number, got a {type(scale).__name__}"
        )
    block_q, block_k = sizes.block_q, sizes.block_k
    # Unset backward sizes follow the forward ones where those were given.
    auto_q, auto_k = default_block_sizes(T, S)
    auto_bq, auto_bk = default_block_sizes(T, S, backward=True)
    bwd_q = sizes.backward_block_q or block_q or auto_bq
    bwd_k = sizes.backward_block_k or block_k or auto_bk
    block_q, block_k = block_q or auto_q, block_k or auto_k
    # Padded lengths: multiples of the forward and the backward block sizes.
    step_q, step_k = math.lcm(block_q, bwd_q), math.lcm(block_k, bwd_k)
    Tp, Sp = -(-T // step_q) * step_q, -(-S // step_k) * step_k
    return BlockConfig(
        scale,
        is_causal,
        window,
        block_q,
        block_k,
        Tp // block_q,
        Sp // block_k,
        unmasked
        and ((Tp, Sp) == (T, S) or (padded_rows_live and padding_is_unseen(is_causal, T, S))),
        sizes.units_per_step or DEFAULT_UNITS_PER_STEP,
        (bwd_q, bwd_k),
    )


def padding_is_unseen(is_causal: bool, T: int, S: int) -> bool:
    """Whether padding the queries and keys at the end changes no live query's result:
    causal with T == S, where query t < T sees only keys s <= t < T. The padded problem
    is then causal attention on the padded inputs (padded queries see keys, padded or
    not, up to their own position, and are sliced off; their output cotangents are zero),
    so the kernel keeps its structural path: full blocks without a mask, the trimmed
    diagonal, loop bounds free of the lengths."""
    return is_causal and T == S


def mask_blocks(sizes: BlockSizes, T: int, S: int, mask_block: tuple[int, int]) -> BlockSizes:
    """Block sizes that are whole multiples of a block mask's (`mask_block`)."""
    mq, mk = mask_block
    auto_q, auto_k = default_block_sizes(T, S)
    auto_bq, auto_bk = default_block_sizes(T, S, backward=True)

    def whole(size, auto, m):
        return m * max(1, -(-(size or auto) // m))

    return BlockSizes(
        whole(sizes.block_q, auto_q, mq),
        whole(sizes.block_k, auto_k, mk),
        whole(sizes.backward_block_q or sizes.block_q, auto_bq, mq),
        whole(sizes.backward_block_k or sizes.block_k, auto_bk, mk),
        sizes.units_per_step,
    )


def program_arrays(cfg, B, N, captures, block_mask) -> tuple:
    """A programmed call's arrays for the kernel: (captures, block states
    `[B|1, Tp / mq, Sp / mk]` int8 or None, example indices `[B]`, head indices `[N]`).

    A block mask's states `[B|1, N|1, nq, nk]` become one state per example and
    block for all heads (the kernel computes all heads of a block together):
    dead if dead for every head, full if full for every head."""
    states = None
    if block_mask is not None:
        Tp, Sp = cfg.padded_lengths
        mq, mk = block_mask.block_size
        states = merge_states(block_mask.states, axis=1)
        states = pad_axis(pad_axis(states, 1, Tp // mq), 2, Sp // mk)
    examples = jnp.arange(B, dtype=jnp.int32)
    return (tuple(captures), states, examples, jnp.arange(N, dtype=jnp.int32))


def chunked_from_inputs(
    x: Inputs,
    sizes: BlockSizes = BlockSizes(),
    *,
    return_residual: bool = False,
    program=None,
    captures: tuple = (),
    block_mask=None,
) -> tuple[Array, Array | None]:
    """Runs the chunked kernel on checked inputs (`x.value` must be given).

    With a `program` (`kit.attention.programs.Program`) and its `captures`, the
    kernel applies its score and mask functions; with a `block_mask`
    (`kit.attention.flex.BlockMask`) it visits only the blocks that mask leaves
    live, and evaluates the mask function only in the partial ones.

    Returns:
      out `[B, T, N, H]` and, with `return_residual`, the log-sum-exp of each
      row `[B, T, N]` in the inputs' dtype (-inf for rows with no live key, no
      gradient), else None; without the batch axis for unbatched input.

    Raises:
      ValueError: for a non-positive block size or a traced scale, naming it.
    """
    query, key, value = x.query, x.key, x.value
    B, T, N = query.shape[:3]
    S, K = key.shape[1], key.shape[2]
    G = N // K
    masked_program = program is not None and program.mask is not None
    unmasked = x.mask is None and not x.lengths_given and x.window is None and not masked_program
    if block_mask is not None:
        sizes = mask_blocks(sizes, T, S, block_mask.block_size)
    cfg = block_config(T, S, x.scale, x.is_causal, x.window, unmasked, sizes, padded_rows_live=True)
    cfg = dataclasses.replace(cfg, program=program)
    Tp, Sp = cfg.padded_lengths

    q = pad_axis(query, 1, Tp)
    k, v = pad_axis(key, 1, Sp), pad_axis(value, 1, Sp)
    bias = _per_head_group(x.bias, K, G, Tp, Sp)
    mask = _per_head_group(x.mask, K, G, Tp, Sp)
    # Padding rows and columns are dead through the lengths, which always exist here,
    # except where the padding is unseen (`padding_is_unseen`): there the kernel runs the
    # padded problem, every padded row seeing its causal keys like any other. A padded
    # row left without a live key (lse = MASK_VALUE) would overflow exp(s - lse) in a
    # backward block below the diagonal, which the structural path runs unmasked.
    q_len = jnp.full((B,), Tp if cfg.structural_only else T, jnp.int32)
    kv_len = jnp.full((B,), Sp if cfg.structural_only else S, jnp.int32)
    if x.query_seq_lengths is not None:
        q_len = jnp.minimum(x.query_seq_lengths, T)
    if x.key_value_seq_lengths is not None:
        kv_len = jnp.minimum(x.key_value_seq_lengths, S)

    args = (q, k, v, bias, mask, q_len, kv_len)
    prog = None
    if program is not None:
        prog = program_arrays(cfg, B, N, captures, block_mask)
    if explicit_axes(*args):
        out, lse = partition.explicit_split(functools.partial(_flash, cfg), *args, prog)
    else:
        out, lse = _flash(cfg, *args, prog)
    out = x.unbatch(out[:, :T])  # [B, T, N, H]
    if not return_residual:
        return out, None
    # [B, K, Tp * G] -> [B, Tp, K, G] -> [B, T, N]; the kernel's MASK_VALUE rows -> -inf
    lse = jnp.swapaxes(lse.reshape(B, K, Tp, G), 1, 2).reshape(B, Tp, N)[:, :T]
    lse = jnp.where(lse == MASK_VALUE, -jnp.inf, lax.stop_gradient(lse))
    return out, x.unbatch(lse.astype(query.dtype))
