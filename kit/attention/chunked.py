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

Under jit on a device mesh, each pass runs per device on the examples and
heads that device holds (`jax.experimental.custom_partitioning`, which sees
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
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from kit.attention.blocks import (
    DEFAULT_UNITS_PER_STEP,
    BlockConfig,
    default_block_sizes,
)
from kit.attention.flash_backward import example_backward
from kit.attention.flash_forward import example_forward
from kit.attention.flash_tangent import example_tangent
from kit.attention.inputs import Inputs, explicit_axes
from kit.attention.linear import linear_call
from kit.attention.masks import MASK_VALUE, stat_dtype

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


def forward_all(cfg, q, k, v, bias, mask, q_len, kv_len):
    """The kernel's forward over all (local) examples: out `[B, Tp, N, H]` and
    lse `[B, K, Tp * G]` (float32; MASK_VALUE for rows with no live key)."""

    def example(b, bias, mask):
        return example_forward(cfg, b, q, k, v, bias, mask, q_len[b], kv_len[b])

    return _map_examples(cfg, example, q.shape[0], k.shape[2], (bias, mask))


def tangent_all(cfg, q, k, v, bias, mask, q_len, kv_len, out, lse, dq, dk, dv, dbias):
    """The kernel's tangent over all (local) examples: d_out `[B, Tp, N, H]` along
    (dq, dk, dv, dbias) (`flash_tangent`; dbias None without a bias)."""

    def example(b, bias, mask, dbias):
        return example_tangent(
            cfg, b, q, k, v, bias, mask, q_len[b], kv_len[b], out, lse, dq, dk, dv, dbias
        )

    return _map_examples(cfg, example, q.shape[0], k.shape[2], (bias, mask, dbias))


def backward_all(cfg, q, k, v, bias, mask, q_len, kv_len, out, lse, d_out):
    """The kernel's backward over all (local) examples, `cfg` being the forward's.

    Returns:
      dq, dk, dv in the shapes and dtypes of q, k, v, and dbias in the shape
      and dtype of bias (summed over the examples where bias broadcasts) or None.
    """
    delta = row_delta(out, d_out, k.shape[2])
    return backward_from_delta(cfg, q, k, v, bias, mask, q_len, kv_len, delta, lse, d_out)


def row_delta(out: Array, d_out: Array, K: int) -> Array:
    """delta_t = sum_h dO_th O_th = sum_s P_ts dP_ts, the softmax backward's row term:
    float32 `[B, K, Tp * G]` (lse's layout) from out and d_out `[B, Tp, N, H]`."""
    B, Tp, N, _ = out.shape
    stat = stat_dtype(out.dtype)
    delta = jnp.sum(d_out.astype(stat) * out.astype(stat), axis=-1)  # [B, Tp, N]
    return jnp.swapaxes(delta.reshape(B, Tp, K, N // K), 1, 2).reshape(B, K, -1)


def backward_from_delta(cfg, q, k, v, bias, mask, q_len, kv_len, delta, lse, d_out, dq_t=None):
    """`backward_all` given delta (`row_delta`) instead of out.

    Given `dq_t` (float32 `[B, K, H, Tp * G]`), dq, dk and dv are returned in
    float32 and dq as dq^T added to `dq_t`, for a caller that sums the
    gradients of several key blocks (`dq_from_transposed` turns the sum into
    dq); such a caller computes delta once, and keeps no out for it.
    """
    bcfg = cfg.for_backward()
    summing = dq_t is not None

    def example(b, bias, mask, dq_t):
        return example_backward(
            bcfg, b, q, k, v, bias, mask, q_len[b], kv_len[b], lse, delta, d_out, dq_t
        )

    dq, dk, dv, dbias = _map_examples(cfg, example, q.shape[0], k.shape[2], (bias, mask), dq_t)
    if dbias is not None:
        if bias.shape[0] == 1:
            dbias = jnp.sum(dbias, axis=0, keepdims=True)
        dbias = dbias.astype(bias.dtype)
    if summing:
        return dq, dk, dv, dbias
    dq = dq_from_transposed(dq, q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


def dq_from_transposed(dq_t: Array, shape: tuple[int, ...]) -> Array:
    """dq^T `[B, K, H, Tp * G]` -> dq `[B, Tp, N, H]` (`shape`)."""
    B, Tp, N, _ = shape
    K = dq_t.shape[1]
    # [B, K, H, Tp * G] -> [B, Tp, K, G, H] (with no size-1 G axis: see swap01)
    if N == K:
        return jnp.transpose(dq_t, (0, 3, 1, 2))
    return jnp.transpose(dq_t.reshape(B, K, -1, Tp, N // K), (0, 3, 1, 4, 2)).reshape(shape)


# Under jit on a mesh, the two passes are split over the devices by the batch
# and head axes of the inputs as XLA's sharding propagation chose them: each
# device runs the kernel on its own examples and heads, with no communication.
# (A loop over example indices would otherwise make XLA gather every input;
# the shardings of values traced under jit on a mesh of Auto axes are known
# only after propagation, hence custom_partitioning rather than shard_map.)


def _rule_names(shape, batch, heads, prefix):
    """Shardy factor names of a bias or mask `[B|1, K|1, G|1, Tp|1, Sp|1]`."""
    b = "b" if shape[0] == batch else f"{prefix}b"
    k = "k" if shape[1] == heads else f"{prefix}k"
    return [b, k, f"{prefix}g", f"{prefix}t", f"{prefix}s"]


def _sharding_rule(cfg, present, backward, mesh, operand_types, result_types):
    """The passes' Shardy rule: the batch (b) factor is shared by every operand;
    query (n) and key/value (k) heads are factors of their own, so that
    propagation never splits a head axis over part of a mesh axis (as it would
    K = 2 heads over 4 devices if they were one compound factor with N); the
    partition then splits them alike where it can. Everything else stays whole
    on each device."""
    del cfg, mesh, result_types
    B, K = operand_types[0].shape[0], operand_types[1].shape[2]
    qh, kh = "b t n h", "b s k h"
    names = [n for n, given in zip(("bias", "mask"), present, strict=True) if given]
    extra = [_rule_names(operand_types[3 + i].shape, B, K, n) for i, n in enumerate(names)]
    operands = [qh, kh, kh, *(" ".join(x) for x in extra), "b", "b"]
    if backward:
        operands += [qh, "b k x", qh]
        results = [qh, kh, kh] + ([" ".join(extra[0])] if present[0] else [])
    else:
        results = [qh, "b k x"]
    replicated = {"t", "s", "h", "x"} | {n for names in extra for n in names if n not in ("b", "k")}
    rule = ", ".join(operands) + " -> " + ", ".join(results)
    # Shardy wants the special factors in the order in which the rule first names them.
    factors = dict.fromkeys(rule.replace(",", " ").split())
    return rule, {"need_replication_factors": tuple(f for f in factors if f in replicated)}


def _split_axes(mesh, q, k, q_spec=None, k_spec=None):
    """The mesh axes to split the batch and the heads over: the batch's from
    query (or key), the heads' from query (or key) where they divide both
    query's N and key's K heads; else the heads stay whole. The specs are
    q's and k's shardings' unless given."""
    q_spec, k_spec = (
        tuple(x.sharding.spec if spec is None else spec) + (None,) * 4
        for x, spec in ((q, q_spec), (k, k_spec))
    )

    def size(axes):
        return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))

    N, K = q.shape[2], k.shape[2]
    heads = [a for a in (q_spec[2], k_spec[2]) if a is not None and N % size(a) == K % size(a) == 0]
    return q_spec[0] if q_spec[0] is not None else k_spec[0], heads[0] if heads else None


def _partition(cfg, present, backward, mesh, arg_shapes, result_shape):
    del result_shape
    q, k, _, bias, mask, *_ = arg_shapes
    batch, heads = _split_axes(mesh, q, k)

    def named(*spec):
        return NamedSharding(mesh, PartitionSpec(*spec))

    def extra(x):  # bias or mask: split where it is not broadcast
        if x is None:
            return None
        return named(batch if x.shape[0] != 1 else None, heads if x.shape[1] != 1 else None)

    qs, lse, lengths = named(batch, None, heads), named(batch, heads), named(batch)
    args = [qs, qs, qs, extra(bias), extra(mask), lengths, lengths]
    if not backward:
        return mesh, functools.partial(forward_all, cfg), (qs, lse), tuple(args)

    def lower(*a):
        dq, dk, dv, dbias = backward_all(cfg, *a)
        if dbias is not None:  # summed over the devices where bias is broadcast
            axes = [ax for ax, d in ((batch, 0), (heads, 1)) if ax and bias.shape[d] == 1]
            axes = tuple(n for ax in axes for n in (ax if isinstance(ax, tuple) else (ax,)))
            if axes:
                dbias = lax.psum(dbias, axes)
        return dq, dk, dv, dbias

    return mesh, lower, (qs, qs, qs, extra(bias)), (*args, qs, lse, qs)


def _partitioned(fn, backward):
    partitioned = custom_partitioning(lambda static, *a: fn(static[0], *a), static_argnums=(0,))
    partitioned.def_partition(
        partition=lambda static, *a: _partition(*static, backward, *a),
        sharding_rule=lambda static, *a: _sharding_rule(*static, backward, *a),
    )

    def call(cfg, *args):
        # custom_partitioning has no batching rule: under jax.vmap the kernel
        # runs as it would without a mesh (vmapped over the loop, unpartitioned).
        static = (cfg, (args[3] is not None, args[4] is not None))

        @custom_vmap
        def run(args):
            return partitioned(static, *args)

        @run.def_vmap
        def run_vmapped(axis_size, in_batched, args):
            del axis_size
            axes = jax.tree.map(lambda batched: 0 if batched else None, in_batched[0])
            out = jax.vmap(functools.partial(fn, cfg), in_axes=axes)(*args)
            return out, jax.tree.map(lambda _: True, out)

        return run(args)

    return call


_forward = _partitioned(forward_all, backward=False)
_backward = _partitioned(backward_all, backward=True)


def _split_explicit(run, q, k, v, bias, mask, q_len, kv_len):
    """`run(q, k, v, bias, mask, q_len, kv_len) -> (out, lse)` on each device's
    examples and heads, for inputs sharded over Explicit mesh axes.

    On such axes the sharding is part of each array's type, so it is known at
    trace time and `jax.shard_map` splits the work directly (custom_partitioning
    serves the Auto axes, whose shardings are chosen after tracing). The batch
    and heads keep their split as `_split_axes` chooses it; anything else
    sharded (a sequence or head-dim axis) is gathered first, as on Auto meshes.
    """
    mesh = jax.typeof(q).sharding.mesh
    batch, heads = _split_axes(mesh, q, k, jax.typeof(q).sharding.spec, jax.typeof(k).sharding.spec)

    def extra(x):  # bias or mask [B|1, K|1, G|1, Tp|1, Sp|1]: split where not broadcast
        if x is None:
            return None
        return PartitionSpec(batch if x.shape[0] != 1 else None, heads if x.shape[1] != 1 else None)

    qs, lengths = PartitionSpec(batch, None, heads), PartitionSpec(batch)
    specs = (qs, qs, qs, extra(bias), extra(mask), lengths, lengths)
    args = [
        None if x is None else jax.sharding.reshard(x, spec)
        for x, spec in zip((q, k, v, bias, mask, q_len, kv_len), specs, strict=True)
    ]
    split = jax.shard_map(
        run, mesh=mesh, in_specs=specs, out_specs=(qs, PartitionSpec(batch, heads))
    )
    return split(*args)


# Derivatives. One custom JVP serves forward and reverse mode: its tangent is the
# blockwise `tangent_all`, paired by `linear_call` with its transpose, the blockwise
# backward, so that jax.grad runs the hand-written backward (saving q, k, v, out and
# lse, O(T)) and jax.jvp the tangent kernel. Derivatives of the backward itself
# (second order) are not written; they raise an error that names the remedy.


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, mask, q_len, kv_len):
    """out `[B, Tp, N, H]` and lse `[B, K, Tp * G]`; lse carries no derivative."""
    return _forward(cfg, q, k, v, bias, mask, q_len, kv_len)


def _flash_jvp(cfg, primals, tangents):
    q, k, v, bias, mask, q_len, kv_len = _first_order_only(primals)
    out, lse = _forward(cfg, q, k, v, bias, mask, q_len, kv_len)
    # Only the tangents that are not symbolic zeros (inputs held constant) are
    # linear arguments: the transpose must be able to give each a cotangent.
    given = tuple(
        x is not None and not isinstance(t, SymbolicZero)
        for x, t in zip((q, k, v, bias), tangents[:4], strict=True)
    )
    linear = tuple(t for t, g in zip(tangents[:4], given, strict=True) if g)
    # lse is a statistic with no derivative, as jax.nn's residual
    d_lse = jnp.zeros_like(lse)
    if not linear:
        return (out, lse), (jnp.zeros_like(out), d_lse)
    residuals = (q, k, v, bias, mask, q_len, kv_len, out, lse)
    (d_out,) = linear_call(
        functools.partial(_tangent, cfg, given),
        functools.partial(_transpose, cfg, given),
        residuals,
        linear,
    )
    return (out, lse), (d_out, d_lse)


_flash.defjvp(_flash_jvp, symbolic_zeros=True)


def _tangent(cfg, given, residuals, linear):
    """d_out along the given tangents of (q, k, v, bias); the others are zero."""
    linear = iter(linear)
    q, k, v, bias = residuals[:4]
    dq, dk, dv, dbias = (
        next(linear) if g else (None if x is None else jnp.zeros_like(x))
        for x, g in zip((q, k, v, bias), given, strict=True)
    )
    return (tangent_all(cfg, *residuals, dq, dk, dv, dbias),)


def _transpose(cfg, given, residuals, cotangents):
    """The backward: cotangents of the given tangents of (q, k, v, bias) from d_out's."""
    (d_out,) = cotangents
    grads = _backward(cfg, *residuals, d_out)
    return tuple(d for d, g in zip(grads, given, strict=True) if g)


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
) -> BlockConfig:
    """The kernel's static configuration for T queries and S keys, from the
    given block sizes (others chosen from the lengths); `unmasked`: no mask,
    lengths or window, only the causal structure (if any).

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
        unmasked and (Tp, Sp) == (T, S),
        sizes.units_per_step or DEFAULT_UNITS_PER_STEP,
        (bwd_q, bwd_k),
    )


def chunked_from_inputs(
    x: Inputs, sizes: BlockSizes = BlockSizes(), *, return_residual: bool = False
) -> tuple[Array, Array | None]:
    """Runs the chunked kernel on checked inputs (`x.value` must be given).

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
    unmasked = x.mask is None and not x.lengths_given and x.window is None
    cfg = block_config(T, S, x.scale, x.is_causal, x.window, unmasked, sizes)
    Tp, Sp = cfg.padded_lengths

    q = pad_axis(query, 1, Tp)
    k, v = pad_axis(key, 1, Sp), pad_axis(value, 1, Sp)
    bias = _per_head_group(x.bias, K, G, Tp, Sp)
    mask = _per_head_group(x.mask, K, G, Tp, Sp)
    # Padding rows and columns are dead through the lengths, which always exist here.
    q_len = jnp.full((B,), T, jnp.int32)
    kv_len = jnp.full((B,), S, jnp.int32)
    if x.query_seq_lengths is not None:
        q_len = jnp.minimum(x.query_seq_lengths, T)
    if x.key_value_seq_lengths is not None:
        kv_len = jnp.minimum(x.key_value_seq_lengths, S)

    args = (q, k, v, bias, mask, q_len, kv_len)
    if explicit_axes(*args):
        out, lse = _split_explicit(functools.partial(_flash, cfg), *args)
    else:
        out, lse = _flash(cfg, *args)
    out = x.unbatch(out[:, :T])  # [B, T, N, H]
    if not return_residual:
        return out, None
    # [B, K, Tp * G] -> [B, Tp, K, G] -> [B, T, N]; the kernel's MASK_VALUE rows -> -inf
    lse = jnp.swapaxes(lse.reshape(B, K, Tp, G), 1, 2).reshape(B, Tp, N)[:, :T]
    lse = jnp.where(lse == MASK_VALUE, -jnp.inf, lax.stop_gradient(lse))
    return out, x.unbatch(lse.astype(query.dtype))
