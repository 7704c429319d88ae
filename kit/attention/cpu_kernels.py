"""The kit's compiled CPU kernels, XLA FFI custom calls: a decode step (a few queries
against a long key/value cache, `kit/attention/cpu/decode.cc`), and the chunked path's
forward and backward passes (`kit/attention/cpu/flash.cc`, at the end of this module).

The decode kernel reads the cache once, in its own layout `[B, S, K, H]`: each task (an example
and a chunk of up to 512 KiB of keys) takes every query row's logits with the chunk's
keys, their softmax statistics and the weighted sum of the chunk's values; the chunks'
partial results are merged by log-sum-exp. Tasks run on XLA's
intra-op thread pool. The jax.numpy products it replaces (`kit.attention.few_queries`)
do K times the multiplies needed and leave the logits and weights in memory between
XLA's operations; `experiments/bench_decode.py` times both
(docs/benchmarks.md#a-decode-step), beside `cache_read`, the same cache read once on the
kernel's threads.

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

The flash kernel serves the chunked path's passes (`kit.attention.passes`) on a CPU where
`flash_fits`: float32, a head dim that is a multiple of 16, causal or not, with sequence
lengths, and no bias, mask, window or programmed score/mask (those keep the jax.numpy
kernel). It gives the same results as the jax.numpy kernel (out, the log-sum-exp with
MASK_VALUE for a dead row, dq, dk, dv) to float32 rounding, so the chunked path's custom
JVP, its tangent kernel and its partitioning over meshes are unchanged around it (each
device runs it on its shard). Under vmap its inputs are broadcast to the vmapped axis
(`vmap_method="broadcast_all"`). `jax.export` refuses a program holding it (a custom
call with no compatibility guarantee): trace the program to export under
`flash_disabled()`, which gives the jax.numpy kernel. Its own buffers (head-major copies of
the inputs, O(T)) are allocated by the kernel, outside XLA's memory plan.
`experiments/bench_torch.py` times it beside the
jax.numpy kernel and PyTorch's SDPA (docs/benchmarks.md, "A compiled flash kernel").
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from kit.attention.blocks import varying_like
from kit.attention.inputs import Inputs
from kit.attention.masks import MASK_VALUE

Array = jax.Array

TARGET = "kit_decode_f32"
FLASH_FORWARD = "kit_flash_forward_f32"
FLASH_BACKWARD = "kit_flash_backward_f32"
READ = "kit_read_f32"
_HANDLERS = {
    TARGET: "KitDecodeF32",
    FLASH_FORWARD: "KitFlashForwardF32",
    FLASH_BACKWARD: "KitFlashBackwardF32",
    READ: "KitReadF32",
}


@functools.cache
def available() -> bool:
    """Whether the compiled kernels (decode, flash forward and backward, the read of a
    cache) were built, loaded and registered with XLA."""
    spec = importlib.util.find_spec("kit.attention._decode_cpu")
    if spec is None or spec.origin is None:
        return False
    try:
        library = ctypes.cdll.LoadLibrary(spec.origin)
        handlers = {target: getattr(library, name) for target, name in _HANDLERS.items()}
    except (OSError, AttributeError):
        return False
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
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


def _require_built(what: str) -> None:
    """Raises, naming `what` needed them, where the compiled kernels are not built or do not
    load (`available()` also registers their targets with XLA, once)."""
    if not available():
        raise RuntimeError(
            f"{what} needs kit's compiled CPU kernels, which are not built or do not load "
            "(kit/attention/cpu; setup.py builds them at install)"
        )


def _kernel(q: Array, k: Array, v: Array, lengths: Array, scale: float) -> tuple[Array, Array]:
    _require_built("the decode kernel")
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


def cache_read(k: Array, v: Array) -> Array:
    """The float32 sum of every element of k and v, each read once from memory on the
    decode kernel's threads (tasks of 1 MiB, four running sums each): the time a decode
    step's cache takes to read, which `experiments/bench_decode.py` times beside the step.
    Not differentiable (a benchmark's reference)."""
    _require_built("cache_read")
    for name, x in (("k", k), ("v", v)):
        if jnp.result_type(x) != jnp.float32:
            raise ValueError(f"cache_read: {name} must be float32, got {jnp.result_type(x)}")
    return jax.ffi.ffi_call(READ, jax.ShapeDtypeStruct((), jnp.float32))(k, v)


# The flash kernel (kit/attention/cpu/flash.cc): the chunked path's forward and backward
# passes (`kit.attention.passes`) on a CPU, where `flash_fits`.

_flash_enabled = True


@contextlib.contextmanager
def flash_disabled():
    """Within it, the chunked path traces its jax.numpy kernel even where the compiled one
    fits (for comparisons: benchmarks, tests). The choice is made when a program is traced,
    so JAX's caches of traced programs are cleared on entry and on exit: a function jitted
    inside traces anew, and traces anew again after."""
    global _flash_enabled
    before, _flash_enabled = _flash_enabled, False
    jax.clear_caches()
    try:
        yield
    finally:
        _flash_enabled = before
        jax.clear_caches()


def flash_fits(cfg, q: Array, k: Array, v: Array, bias, mask, prog) -> bool:
    """Whether the compiled flash kernel serves a chunked pass: on a CPU, float32 q, k, v,
    a head dim that is a multiple of 16, and no bias, mask, window or programmed score or
    mask (causal and the sequence lengths are the kernel's own)."""
    return (
        _flash_enabled
        and bias is None
        and mask is None
        and prog is None
        and cfg.program is None
        and cfg.window is None
        and q.dtype == k.dtype == v.dtype == jnp.float32
        and q.shape[-1] % 16 == 0
        and jax.default_backend() == "cpu"
        and available()
    )


def _flash_attrs(cfg) -> dict:
    return {
        "scale": np.float32(cfg.scale),
        "causal": bool(cfg.is_causal),
        "mask_value": np.float32(MASK_VALUE),
    }


def flash_forward(cfg, q: Array, k: Array, v: Array, q_len: Array, kv_len: Array):
    """The chunked forward pass (`passes.forward_all`'s results): out `[B, T, N, H]` and
    lse `[B, K, T G]`, from q `[B, T, N, H]`, k and v `[B, S, K, H]` and the live lengths."""
    B, T, N, _ = q.shape
    K = k.shape[2]
    call = jax.ffi.ffi_call(
        FLASH_FORWARD,
        (
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct((B, K, T * (N // K)), jnp.float32),
        ),
        vmap_method="broadcast_all",
    )
    q_len, kv_len = q_len.astype(jnp.int32), kv_len.astype(jnp.int32)
    out = call(q, k, v, q_len, kv_len, **_flash_attrs(cfg))
    # Inside a shard_map the call's results vary over the mesh axes its inputs vary over.
    return varying_like(out, q, k, v, q_len, kv_len)


def flash_backward(cfg, q, k, v, q_len, kv_len, lse, delta, d_out):
    """The chunked backward pass: dq, dk, dv from the forward's lse and the rows' delta
    (`passes.row_delta`), both `[B, K, T G]`."""
    call = jax.ffi.ffi_call(
        FLASH_BACKWARD,
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
        vmap_method="broadcast_all",
    )
    args = (q, k, v, q_len.astype(jnp.int32), kv_len.astype(jnp.int32))
    args += tuple(x.astype(jnp.float32) for x in (lse, delta, d_out))
    return varying_like(call(*args, **_flash_attrs(cfg)), *args)
