"""A linear function paired with its transpose, under `jax.vmap` too.

`jax.custom_derivatives.linear_call(fun, fun_transpose, residuals, linear)`
calls `fun`, a function linear in `linear`, and makes `fun_transpose` its
transpose: the chunked path uses it to pair its blockwise tangent (forward
mode) with its blockwise backward (reverse mode), so that one `custom_jvp`
serves `jax.jvp` and `jax.grad` alike. JAX (0.10) has no batching rule for the
primitive, so `jax.vmap` of such a function fails; `linear_call` here registers
one (only where JAX has none): both functions are vmapped, every linear
argument and cotangent batched along axis 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core
from jax._src.custom_derivatives import linear_call_p
from jax._src.interpreters import batching
from jax.custom_derivatives import linear_call

__all__ = ["linear_call"]


def _batch_linear_call(args, dims, *, callee, transpose_thunk, num_callee_consts, num_res):
    # dims: each argument's batched axis, None where it is not batched
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    # Everything a tuple: vmap's in_axes must match its arguments' containers.
    args, axes = tuple(args), tuple(dims)
    split = num_callee_consts + num_res
    consts, residuals, linear = (
        args[:num_callee_consts],
        args[num_callee_consts:split],
        args[split:],
    )
    const_axes, res_axes = axes[:num_callee_consts], axes[num_callee_consts:split]
    # A linear argument that is not batched becomes so: the transpose then returns
    # one cotangent per example, which vmap's own broadcast transposes into a sum.
    linear = tuple(
        jnp.broadcast_to(x[None], (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
        for x, d in zip(linear, axes[split:], strict=True)
    )
    t_jaxpr, t_consts = transpose_thunk()
    callee_fn, transpose_fn = core.jaxpr_as_fun(callee), core.jaxpr_as_fun(t_jaxpr)

    def fun(residuals, linear):
        def one(consts, residuals, linear):
            return callee_fn(*consts, *residuals, *linear)

        return jax.vmap(one, in_axes=(const_axes, res_axes, 0))(consts, residuals, linear)

    def transpose(residuals, cotangents):
        def one(residuals, cotangents):
            return transpose_fn(*t_consts, *residuals, *cotangents)

        # jaxpr_as_fun returns a list; linear_call wants the transpose's output in
        # the linear arguments' own container (a tuple), or it raises a TypeError.
        return tuple(jax.vmap(one, in_axes=(res_axes, 0))(residuals, tuple(cotangents)))

    out = linear_call(fun, transpose, residuals, linear)
    return out, [0] * len(out)


if linear_call_p not in batching.fancy_primitive_batchers:
    batching.primitive_batchers[linear_call_p] = _batch_linear_call
