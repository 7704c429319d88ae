"""The kit's compiled CPU kernel: a decode step (a few queries against a long key/value
cache) as one XLA FFI custom call, `kit/attention/cpu/decode.cc`.

The kernel reads the cache once, in its own layout `[B, S, K, H]`: each task (an example
and a chunk of up to 512 KiB of keys) takes every query row's logits with the chunk's
keys, their softmax statistics and the weighted sum of the chunk's values; the chunks'
partial results are merged by log-sum-exp. Tasks run on XLA's
intra-op thread pool. The jax.numpy products it replaces (`kit.attention.few_queries`)
do K times the multiplies needed and leave the logits and weights in memory between
XLA's operations; `experiments/bench_decode.py` times both
(docs/benchmarks.md#a-decode-step).

`decode_attention` is exact to float32 rounding (its exponential is a degree-7
polynomial after range reduction, within 1.2 ulp of exp) and differentiable to every
order: the primal runs the kernel; its JVP is the JVP of the jax.numpy path, so
gradients, Hessians and jvp are jax's own. Under vmap, an unbatched operand is not
copied (`vmap_method="expand_dims"`: the kernel broadcasts leading dims).

The kernel is built at install time (setup.py) and optional: `available()` is False
where it was not built or does not load, and `implementation=None` then keeps the
jax.numpy path. It takes float32, a head dim that is a multiple of 8, and no mask
other than `key_value_seq_lengths` (`fits`). A program holding it can't be serialized
by `jax.export` (custom calls have no compatibility guarantee): pass
`implementation="xla"` to export a decode step. With inputs sharded over an Auto mesh
axis, XLA gathers them for the call (the result is right, the cache crosses devices);
under `shard_map` each device runs the kernel on its own shard.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from kit.attention.inputs import Inputs

Array = jax.Array

TARGET = "kit_decode_f32"


@functools.cache
def available() -> bool:
    """Whether the compiled decode kernel was built, loaded and registered with XLA."""
    spec = importlib.util.find_spec("kit.attention._decode_cpu")
    if spec is None or spec.origin is None:
        return False
    try:
        library = ctypes.cdll.LoadLibrary(spec.origin)
        handler = library.KitDecodeF32
    except (OSError, AttributeError):
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def fits(x: Inputs) -> bool:
    """Whether the kernel serves these checked inputs (on the few-queries path): float32
    q, k, v, a head dim that is a multiple of 8, and no bias, mask, causal mask, window
    or query lengths (key/value lengths are the kernel's own)."""
    return (
        x.query.dtype == jnp.float32
        and x.key.dtype == jnp.float32
        and x.value is not None
        and x.value.dtype == jnp.float32
        and x.query.shape[-1] % 8 == 0
        and x.bias is None
        and x.mask is None
        and not x.is_causal
        and x.window is None
        and x.query_seq_lengths is None
        and available()
    )


def _kernel(q: Array, k: Array, v: Array, lengths: Array, scale: float) -> tuple[Array, Array]:
    if not available():  # also registers the target with XLA, once
        raise RuntimeError(
            "kit's compiled CPU decode kernel is not built or does not load "
            "(kit/attention/cpu/decode.cc; setup.py builds it at install)"
        )
    B, T, N, _ = q.shape
    call = jax.ffi.ffi_call(
        TARGET,
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, T, N), jnp.float32)),
        vmap_method="expand_dims",
    )
    return call(q, k, v, lengths, scale=np.float32(scale))


def decode_attention(
    x: Inputs, reference, *, return_residual: bool = False
) -> tuple[Array, Array | None]:
    """The kernel's out `[B, T, N, H]` and, with `return_residual`, lse `[B, T, N]` (-inf
    for a row with no live key), for inputs `fits` accepts; `reference(x)` is the
    jax.numpy path giving (out, lse) for the same inputs, whose JVP is the kernel's."""
    q, k, v = x.query, x.key, x.value
    B, S = k.shape[0], k.shape[1]
    lengths = x.key_value_seq_lengths
    lengths = jnp.full((B,), S, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    # A traced scale goes into the queries; a Python float is the kernel's attribute.
    static = isinstance(x.scale, float)
    scale = x.scale if static else 1.0

    @jax.custom_jvp
    def attend(q, k, v, lengths, scale_array):
        if not static:
            q = q * scale_array.astype(q.dtype)
        return _kernel(q, k, v, lengths, scale)

    @attend.defjvp
    def attend_jvp(primals, tangents):
        out, lse = attend(*primals)

        def plain(q, k, v, lengths, scale_array):
            y = dataclasses.replace(
                x,
                query=q,
                key=k,
                value=v,
                key_value_seq_lengths=None if x.key_value_seq_lengths is None else lengths,
                scale=x.scale if static else scale_array,
            )
            return reference(y)[0]

        _, d_out = jax.jvp(plain, primals, tangents)
        # The residual carries no gradient (as on every path).
        return (out, lse), (d_out, jnp.zeros_like(lse))

    scale_array = jnp.asarray(1.0 if static else x.scale, jnp.float32)
    out, lse = attend(q, k, v, lengths, scale_array)
    return out, (lse if return_residual else None)
