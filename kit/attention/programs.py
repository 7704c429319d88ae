"""Programmable attention's machinery: score and mask functions turned into
explicit functions of their captured arrays, checked, and evaluated on a grid of
(example, head, query, key) indices in whatever layout a pass works in.

A score function `score_mod(score, b, h, q_idx, kv_idx) -> score` and a mask
function `mask_mod(b, h, q_idx, kv_idx) -> bool` are written for scalars, as in
PyTorch's FlexAttention. They are traced once on scalars (`convert`): that checks
their arity and what they return, and lifts every array they close over (a slope
table, segment ids, a traced value of an enclosing jit) into an explicit
argument, so that the chunked kernel can take the captured arrays as inputs and
give the floating ones gradients. On a block they are vectorized by nested
`jax.vmap`s over index vectors (`on_grid`), one per axis of the block, so any
jnp code that is right for scalars is right for the block, and an index used on
one axis alone (a per-head slope) is gathered once for that axis, not per pair.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

from kit.attention.blocks import (
    BLOCK_FULL,
    BLOCK_PARTIAL,
    builtin_states,
    merge_states,
    varying_like,
)

Array = jax.Array

SCORE_ARGS = "(score, b, h, q_idx, kv_idx)"
MASK_ARGS = "(b, h, q_idx, kv_idx)"


def _check_callable(name: str, fn, nargs: int, args: str) -> None:
    if not callable(fn):
        raise ValueError(f"{name}: expected a function {args}, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: its arity shows when it is traced
    try:
        signature.bind(*range(nargs))
    except TypeError:
        raise ValueError(
            f"{name}: expected a function of {nargs} positional arguments {args}, "
            f"got one with signature {signature}"
        ) from None


def trace(name: str, fn, nargs: int, args: str, score_dtype=None) -> tuple[Callable, tuple]:
    """`fn` traced on int32 (and `score_dtype`) scalars: an explicit function
    `run(*scalars, *captures)` and the captured arrays.

    Raises:
      ValueError: naming `name` for a function of the wrong arity, or one that
        does not return one scalar (a float for a score function, a bool for a
        mask function).
    """
    _check_callable(name, fn, nargs, args)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    scalars = ([jax.ShapeDtypeStruct((), score_dtype)] if score_dtype else []) + [index] * 4
    try:
        # Traced outside an Explicit mesh, so that the jaxpr carries no such mesh
        # into a pass that runs under shard_map (manual axes); inside a user's
        # shard_map, where the passes run too, its manual mesh stays.
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or not mesh.manual_axes:
            mesh = jax.sharding.AbstractMesh((), ())
        with jax.sharding.use_abstract_mesh(mesh):
            closed = jax.make_jaxpr(fn)(*scalars)
    except TypeError as error:
        raise ValueError(f"{name}: calling it as {args} with scalars failed: {error}") from error
    outs = closed.out_avals
    kind = "a float score" if score_dtype else "a bool"
    if len(outs) != 1 or outs[0].shape != ():
        shapes = [tuple(o.shape) for o in outs]
        raise ValueError(f"{name}: must return {kind} scalar, got output shapes {shapes}")
    dtype = outs[0].dtype
    if (score_dtype and not jnp.issubdtype(dtype, jnp.floating)) or (
        not score_dtype and dtype != jnp.bool_
    ):
        raise ValueError(f"{name}: must return {kind} scalar, got dtype {dtype}")
    jaxpr, captures = closed.jaxpr, tuple(closed.consts)

    def run(*scalars_and_captures):
        n = len(scalars_and_captures) - len(captures)
        args, consts = scalars_and_captures[:n], list(scalars_and_captures[n:])
        if _manual_axes(scalars_and_captures):
            return _eval_varying(jaxpr, consts, args)[0]
        return jaxpr_as_fun(ClosedJaxpr(jaxpr, consts))(*args)[0]

    return run, captures


def _manual_axes(values) -> set:
    axes = set()
    for x in jax.tree.leaves(values):
        axes |= jax.typeof(x).manual_axis_type.varying
    return axes


# Primitives that call a jaxpr given in a parameter: inlined by `_eval_varying`.
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}  # fmt: skip


def _eval_varying(jaxpr, consts, args) -> list:
    """Evaluates `jaxpr` inside shard_map: the inputs vary over different manual
    axes (the example index over the batch's, the head index over the heads'),
    and each primitive wants its operands alike, as jnp makes them when it
    traces; so every equation's operands are first cast to vary over all the
    axes any of them varies over. Calls (jit, custom derivatives) are inlined:
    their jaxprs were traced outside too. A function's custom derivative rule
    is not used here; its primal computation is differentiated."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        values = varying_like(values, *values)
        name = eqn.primitive.name
        if name in _CALLS and _CALLS[name] in eqn.params:
            inner = eqn.params[_CALLS[name]]
            inner_consts = getattr(inner, "consts", [])
            outs = _eval_varying(getattr(inner, "jaxpr", inner), inner_consts, values)
        else:
            outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def differentiable(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """The static part of a programmed call: the traced functions (hashed by
    identity, so one jit trace compiles one kernel).

    Attributes:
      score: `score(s, b, h, q, kv, *score_captures)` or None.
      mask: `mask(b, h, q, kv, *mask_captures)` or None.
      num_score: how many of the call's captures are the score function's (they
        come first); the rest are the mask function's, which get no gradient.
      grad: per score capture, whether the kernel differentiates through it: it
        is floating and, once the custom JVP has seen the tangents, has one.
    """

    score: Callable | None
    mask: Callable | None
    num_score: int
    grad: tuple[bool, ...]


def make_program(score_mod, mask_mod, score_dtype) -> tuple[Program | None, tuple]:
    """The Program and its captures (score's first) for a call; (None, ()) for neither."""
    if score_mod is None and mask_mod is None:
        return None, ()
    score, score_caps = (
        trace("score_mod", score_mod, 5, SCORE_ARGS, score_dtype)
        if score_mod is not None
        else (None, ())
    )
    mask, mask_caps = (
        trace("mask_mod", mask_mod, 4, MASK_ARGS) if mask_mod is not None else (None, ())
    )
    grad = tuple(differentiable(c) for c in score_caps)
    return Program(score, mask, len(score_caps), grad), score_caps + mask_caps


class Dynamic(NamedTuple):
    """A programmed call's arrays as one example's pass sees them.

    Attributes:
      captures: the score function's then the mask function's captured arrays.
      states: the block states of this example (`BLOCK_*`) at the block mask's
        granularity `[nq, nk]`, or None (no block mask).
      example: the example's index in the whole batch (int32 scalar).
      heads: the global index of each local query head `[N]`.
    """

    captures: tuple
    states: Array | None
    example: Array
    heads: Array


def on_grid(body: Callable, score: Array | None, vectors: list[Array]) -> Array:
    """`body(score_scalar, *index_scalars)` on the grid of `vectors` (one per axis
    of the result, outermost first) by nested vmaps; `score` has the grid's shape."""
    n = len(vectors)
    fn = body
    for level in reversed(range(n)):
        mapped = (0 if other == level else None for other in range(n))
        in_axes = (None if score is None else 0, *mapped)
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn(score, *vectors)


def block_call(
    program: Program,
    dyn: Dynamic,
    layout: str,
    starts: dict[str, Array],
    sizes: dict[str, int],
    score: Array | None = None,
    score_captures: tuple | None = None,
) -> Array:
    """The score function on `score` (or the mask function, if `score` is None) on
    one block whose axes are named by the letters of `layout`: u (key/value
    head), g (query head within its group), q (query position), k (key position).

    `starts` gives the first position of the q and k axes, `sizes` every axis's
    size; query head u * G + g is global head `dyn.heads[u * G + g]`. The score
    function reads `score_captures` if given (to differentiate through them),
    else its captures in `dyn`.
    """
    G = sizes["g"]
    vectors = []
    for axis in layout:
        start = starts.get(axis, jnp.int32(0))
        vectors.append(start + jnp.arange(sizes[axis], dtype=jnp.int32))
    n = program.num_score
    if score is None:
        caps = dyn.captures[n:]

        def body(_, *idx):
            at = dict(zip(layout, idx, strict=True))
            h = dyn.heads[at["u"] * G + at["g"]]
            return program.mask(dyn.example, h, at["q"], at["k"], *caps)

        return on_grid(body, None, vectors)
    caps = dyn.captures[:n] if score_captures is None else score_captures

    def score_body(s, *idx):
        at = dict(zip(layout, idx, strict=True))
        h = dyn.heads[at["u"] * G + at["g"]]
        return program.score(s, dyn.example, h, at["q"], at["k"], *caps).astype(s.dtype)

    return on_grid(score_body, score, vectors)


def grad_captures(program: Program, captures: tuple) -> tuple:
    """The score captures the kernel differentiates through (`Program.grad`)."""
    return tuple(c for c, g in zip(captures[: program.num_score], program.grad, strict=True) if g)


def with_grad_captures(program: Program, captures: tuple, grads: tuple) -> tuple:
    """The score captures with those of `grad_captures` replaced by `grads`, in order."""
    grads = iter(grads)
    n = program.num_score
    return tuple(next(grads) if g else c for c, g in zip(captures[:n], program.grad, strict=True))


def combine_states(*states: Array) -> Array:
    """The states of the AND of masks: the least of their states."""
    out = states[0]
    for s in states[1:]:
        out = jnp.minimum(out, s)
    return out


def coarsen(states: Array, rows: int, cols: int) -> Array:
    """Block states `[..., nq * rows, nk * cols]` -> `[..., nq, nk]` (`merge_states`)."""
    *lead, nq, nk = states.shape
    return merge_states(states.reshape(*lead, nq // rows, rows, nk // cols, cols), (-3, -1))


def block_lists(states: Array) -> tuple[Array, Array, Array, Array]:
    """Per row of block states `[rows, cols]`: the full blocks' column indices (in
    order, first), their count, and likewise the partial blocks'."""
    cols = states.shape[-1]
    index = jnp.arange(cols, dtype=jnp.int32)

    def listed(which):
        order = jnp.argsort(jnp.where(states == which, index, cols + index), axis=-1)
        return order.astype(jnp.int32), jnp.sum(states == which, axis=-1, dtype=jnp.int32)

    return (*listed(BLOCK_FULL), *listed(BLOCK_PARTIAL))


def kernel_lists(cfg, dyn: Dynamic | None, q_len, kv_len, *, transpose: bool = False):
    """The block lists (`block_lists`) of one example at the kernel's block sizes
    (`cfg`), from its block mask's states (`dyn.states`, padded to the kernel's
    padded lengths) and the causal, window and length masks; one row per query
    block, or per key block with `transpose`. None without block states."""
    if dyn is None or dyn.states is None:
        return None
    Tp, Sp = cfg.padded_lengths
    nq, nk = dyn.states.shape
    rows, cols = cfg.block_q * nq // Tp, cfg.block_k * nk // Sp
    states = combine_states(coarsen(dyn.states, rows, cols), builtin_states(cfg, q_len, kv_len))
    return block_lists(states.T if transpose else states)


def visit_lists(step: Callable, lists: tuple, carry):
    """`step(j, carry, masked=...)` over one row's block lists (`block_lists`): its
    full blocks without the mask, then its partial ones with it."""
    full, num_full, partial, num_partial = lists
    carry = jax.lax.fori_loop(0, num_full, lambda t, c: step(full[t], c, masked=False), carry)
    return jax.lax.fori_loop(0, num_partial, lambda t, c: step(partial[t], c, masked=True), carry)


def score_grid(score_mod: Callable, B: int, N: int, T: int, S: int, base=None) -> Array:
    """`score_mod` evaluated on every (example, head, query, key): `[B, N, T, S]` float32,
    from scores `base` (default 0: for an additive score function, its bias).
    For inspection (the viewer's logit decomposition), not for computing attention."""
    base = jnp.zeros((B, N, T, S), jnp.float32) if base is None else base
    grid = [jnp.arange(n, dtype=jnp.int32) for n in (B, N, T, S)]
    return on_grid(lambda s, *idx: score_mod(s, *idx).astype(s.dtype), base, grid)
