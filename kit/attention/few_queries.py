"""A few queries against a long cache (a decode step): products in the cache's own layout.

With T = 1 query per head (or a handful) and a long key/value cache, the work is
reading the cache: B S K H elements of K and of V, a few multiplies each. The per-head
route of the xla path (`kit.attention.core`) reads the cache badly there: each head's
keys sit interleaved with the other heads' (`[S, K, H]`), so XLA copies them out per
head for a `[T, H] x [H, S]` product, and the materialized path took 14-25x the time to
read the cache once (experiments/bench_decode.py, in docs/benchmarks.md#a-decode-step).

Here the cache is read as the `[S, K * H]` matrix it already is. All query heads go into
one block-diagonal matrix `[K * H, T * N]` (query head (k, g) of query t in the rows of
its key/value head k, zeros elsewhere), so one product gives every head's logits, `[S,
T * N]`; the softmax is the xla path's (`masked_softmax` over S, with the same masks,
bias and dead-row zeros); one product of the weights with the `[S, K * H]` values gives
`[T * N, K * H]`, whose diagonal blocks are the outputs. The products do K times the
multiplies needed, cheap beside reading the cache when T is small. The zeros outside a
head's block add exactly zero for finite keys; a non-finite key reaches every head's
logit at its position (the per-head paths keep it to its own head).

`attend` picks this path for `implementation=None` on a CPU (`few_queries_fit`). It is
plain jax.numpy, so its derivatives of every order, vmap and jvp are jax's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kit.attention import cpu_kernels
from kit.attention.core import masked_logsumexp, masked_softmax
from kit.attention.inputs import Inputs, explicit_axes
from kit.attention.masks import stat_dtype

Array = jax.Array

# At most this many queries per example, and at least this many keys. Against the xla
# path's time (B = 8, N = 8, H = 64, K = 1 or 8, 2-core AMD EPYC): at S = 1024 0.17-0.56x
# at T = 1 and 0.45-0.89x at T = 8; at S = 512 0.37-0.79x but 1.41x at T = 1, K = 1; at
# S = 256 0.74-1.00x. At S = 4096-32768, T = 1: 0.13-0.54x (experiments/bench_decode.py).
FEW_QUERIES = 8
MIN_KEYS = 1024
# Where the compiled kernel serves the call (`cpu_kernels.fits`), from this many keys. It
# took 0.13-0.61x the xla path's time at S = 128-1024, T = 1 and 8, K = 1 and 8 (B = 8,
# N = 8, H = 64, medians of 21, alternating; a scratch script, 2026-12-07).
KERNEL_MIN_KEYS = 128


def few_queries_fit(x: Inputs, dropout_rate: float) -> bool:
    """Whether `implementation=None` takes this path: a CPU, at most FEW_QUERIES queries
    against at least MIN_KEYS keys (KERNEL_MIN_KEYS where the compiled kernel serves the
    call), float32 or float64, values given, no dropout, and no Explicit mesh axis on the
    inputs (a product across heads would gather heads split over devices).

    bfloat16 and float16 keep the xla path: XLA's CPU simplifier turns this path's
    products into bfloat16 x bfloat16 = float32 dots that its runtime then refuses
    ("Unsupported element type for DotThunk", jax 0.10.2), and converting the cache
    to float32 first would read and write it twice.
    """
    return (
        jax.default_backend() == "cpu"
        and x.query.dtype in (jnp.float32, jnp.float64)
        and x.query.shape[1] <= FEW_QUERIES
        and x.value is not None
        and dropout_rate == 0.0
        and not explicit_axes(x.query, x.key, x.value, x.bias, x.mask)
        and (
            x.key.shape[1] >= MIN_KEYS
            or (x.key.shape[1] >= KERNEL_MIN_KEYS and cpu_kernels.fits(x))
        )
    )


def _keys_second(x: Array | None) -> Array | None:
    """`[B|1, N|1, T|1, S|1]` -> `[B|1, S|1, T|1, N|1]`, the logits' layout here."""
    return None if x is None else jnp.transpose(x, (0, 3, 2, 1))


def few_query_attention(x: Inputs, *, return_residual: bool = False) -> tuple[Array, Array | None]:
    """Attention over checked inputs (batched) with the products in the cache's layout.

    Returns:
      out `[B, T, N, H]` in the query's dtype, and with `return_residual` the
      log-sum-exp of each row's logits `[B, T, N]` (-inf where a row has no live key,
      in the query's dtype), else None; as the xla path gives them.
    """
    if cpu_kernels.fits(x):
        return cpu_kernels.decode_attention(x, products, return_residual=return_residual)
    return products(x, return_residual=return_residual)


def products(x: Inputs, *, return_residual: bool = False) -> tuple[Array, Array | None]:
    """`few_query_attention` in jax.numpy: the products in the cache's layout."""
    q, k, v = x.query, x.key, x.value
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    stat = stat_dtype(q.dtype)
    same_head = jnp.eye(K, dtype=bool)[None, None, :, None, :, None]  # [1, 1, K, 1, K', 1]
    # [B, T, K, G, 1, H] -> block-diagonal [B, K, H, T, K', G] -> [B, K * H, T * N]
    spread = jnp.where(same_head, q.reshape(B, T, K, G, 1, H), jnp.zeros((), q.dtype))
    q_blocks = spread.transpose(0, 2, 5, 1, 4, 3).reshape(B, K * H, T * N)
    # einsum letters: c = K * H (the cache's columns), r = T * N (the query rows).
    logits = jnp.einsum(  # [B, S, K * H] x [B, K * H, T * N] -> [B, S, T * N]
        "bsc,bcr->bsr", k.reshape(B, S, K * H), q_blocks, preferred_element_type=stat
    )
    # The softmax runs over S where the product left it (axis 1): moving S last for
    # the kit's usual `[B, T, N, S]` made the step 2.8x slower (a copy of the logits
    # and a transposed product after it).
    logits = logits.reshape(B, S, T, N) * jnp.asarray(x.scale, stat)
    bias, mask = _keys_second(x.bias), _keys_second(x.full_mask())
    if bias is not None:
        logits = logits + bias.astype(stat)
    weights = masked_softmax(logits, mask, axis=1)  # [B, S, T, N]
    out = jnp.einsum(  # [B, S, T * N] x [B, S, K * H] -> [B, T * N, K * H]
        "bsr,bsc->brc", weights.astype(v.dtype).reshape(B, S, T * N), v.reshape(B, S, K * H)
    )
    # The diagonal blocks: query head (k, g) with value head k.
    out = jnp.diagonal(out.reshape(B, T, K, G, K, H), axis1=2, axis2=4)  # [B, T, G, H, K]
    out = jnp.moveaxis(out, 4, 2).reshape(B, T, N, H).astype(q.dtype)
    lse = None
    if return_residual:
        lse = masked_logsumexp(logits, mask, axis=1).astype(q.dtype)  # [B, T, N]
    return out, lse
