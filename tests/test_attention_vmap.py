"""The chunked path's derivatives under jax.vmap, against jax's own transformations of
the attention formula written here.

jax.vmap of jax.vjp (the cases JAX's DotProductAttention tests run with use_vmap=True), of
jax.jvp, jax.grad and jax.linearize, for batched and unbatched q, k, v, bias and mask and
for grouped-query attention. The chunked path's derivatives are a custom JVP whose tangent
is paired with the blockwise backward by `linear_call`, which JAX cannot batch by itself
(kit/attention/linear.py): an unbatched tangent or cotangent reaches its broadcast branch.
Both orders run: vmap of the derivatives, and the derivatives of a vmapped function
(where the batched linear_call is itself transposed). The blocks are small (8 queries,
16 keys) so that T=21, S=37 spans several of each."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import normal, slow_beyond

import kit

V_SIZE = 3  # the vmapped axis
T, S, N, H = 21, 37, 4, 8
SCALE = 0.5


def chunked(q, k, v, bias, mask):
    """One example: q [T, N, H], k and v [S, K, H], bias and mask [N, T, S]."""
    return kit.chunked_attention(q, k, v, bias, mask, scale=SCALE, block_q=8, block_k=16)


def formula(q, k, v, bias, mask):
    """The same example from the definition: softmax(q·k * scale + bias, masked) · v,
    each query head reading key/value head n // (N // K)."""
    G = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, G, axis=1), jnp.repeat(v, G, axis=1)
    logits = jnp.einsum("tnh,snh->nts", q, k) * SCALE + bias
    logits = jnp.where(mask, logits, -jnp.inf)
    return jnp.einsum("nts,snh->tnh", jax.nn.softmax(logits, axis=-1), v)


def _inputs(K, axes, seed=0):
    """(q, k, v, bias, mask), each with a leading axis of V_SIZE where `axes` says 0.
    Every query row keeps a live key (column 0), so the formula has no dead row."""
    rng = np.random.default_rng(seed)
    shapes = [(T, N, H), (S, K, H), (S, K, H), (N, T, S)]
    keys = jax.random.split(jax.random.key(seed), 4)
    out = [
        normal(r, (V_SIZE, *shape) if a == 0 else shape)
        for r, shape, a in zip(keys, shapes, axes[:4], strict=True)
    ]
    mask_shape = (V_SIZE, N, T, S) if axes[4] == 0 else (N, T, S)
    mask = rng.random(mask_shape) < 0.6
    mask[..., 0] = True
    return (*out, jnp.asarray(mask))


def _five(f, primals, tangents, cotangent, every=True):
    """f's output, vjp's four cotangents, jvp's and linearize's tangent, and grad of a
    nonlinear loss, at `primals` (q, k, v, bias); without `every`, the first three
    (linearize and grad are made of the same two passes, the tangent and the backward)."""
    out, vjp = jax.vjp(f, *primals)
    _, d_out = jax.jvp(f, primals, tangents)
    if not every:
        return out, vjp(cotangent), d_out
    _, linear = jax.linearize(f, *primals)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a)) ** 2), argnums=(0, 1, 2, 3))
    return out, vjp(cotangent), d_out, linear(*tangents), grads(*primals)


def _derivatives_under_vmap(attention, axes, tangent_axes, primals, tangents, cotangent, every):
    """vmap of `_five` for each example."""

    def one(q, k, v, bias, mask, tangents, cotangent):
        f = lambda q, k, v, bias: attention(q, k, v, bias, mask)  # noqa: E731
        return _five(f, (q, k, v, bias), tangents, cotangent, every)

    in_axes = (*axes, tangent_axes, 0)
    return jax.jit(jax.vmap(one, in_axes=in_axes))(*primals, tangents, cotangent)


def _derivatives_of_vmap(attention, axes, tangent_axes, primals, tangents, cotangent, every):
    """`_five` of the vmapped function (JAX's tests: jax.vjp(jax.vmap(...))); an
    unbatched argument's cotangent is summed over the examples."""
    assert tangent_axes == axes[:4]  # tangents shaped as their primals

    def run(q, k, v, bias, mask, tangents, cotangent):
        f = lambda *a: jax.vmap(attention, in_axes=axes)(*a, mask)  # noqa: E731
        return _five(f, (q, k, v, bias), tangents, cotangent, every)

    return jax.jit(run)(*primals, tangents, cotangent)


ORDERS = {"vmap_of": _derivatives_under_vmap, "of_vmap": _derivatives_of_vmap}


def _check(K, axes, tangent_axes=None, order="of_vmap", every=True):
    """Both attentions' derivatives under (or of) vmap with `axes` for (q, k, v, bias,
    mask) and `tangent_axes` (default: the primals') for the four tangents."""
    tangent_axes = axes[:4] if tangent_axes is None else tangent_axes
    primals = _inputs(K, axes)
    tangents = _inputs(K, (*tangent_axes, None), seed=1)[:4]
    cotangent = normal(jax.random.key(9), (V_SIZE, T, N, H))
    derivatives = ORDERS[order]
    got = derivatives(chunked, axes, tangent_axes, primals, tangents, cotangent, every)
    want = derivatives(formula, axes, tangent_axes, primals, tangents, cotangent, every)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


# (q, k, v, bias, mask) in_axes, all five derivatives: JAX's use_vmap case (q, k, v
# batched, bias and mask not) and the keys' side batched, the queries not.
@pytest.mark.parametrize(
    "order, axes, K",
    slow_beyond(
        [("of_vmap", (0, 0, 0, None, None), 2), ("vmap_of", (None, 0, 0, 0, None), 4)],
        [("of_vmap", (0, 0, 0, None, None), 2)],
        several=True,
    ),
)
def test_derivatives_and_vmap(order, axes, K):
    _check(K, axes, order=order)


# Every pair of arguments in all four of its batched/unbatched states (a covering
# array of 6 of the 31 batchings; the batching rule treats each argument on its own), in
# both orders, vjp and jvp (the batched linear_call both ways), the head groupings taking
# turns. All 31 batchings in both orders passed when this was written (a run of
# _check over itertools.product, 2026-12-06); each costs 1.5-2 s of the suite.
PAIRWISE = [
    (0, 0, 0, 0, 0),
    (0, 0, 0, 0, None),
    (0, None, None, None, 0),
    (None, 0, None, None, 0),
    (None, None, 0, None, None),
    (None, None, None, 0, None),
]
SWEEP = [
    (a, order, (4, 1, 2)[(2 * i + j) % 3])
    for i, a in enumerate(PAIRWISE)
    for j, order in enumerate(("of_vmap", "vmap_of"))
]


def test_the_sweep_covers_every_pair_of_arguments():
    pairs = {(i, j, a[i], a[j]) for a in PAIRWISE for i, j in itertools.combinations(range(5), 2)}
    assert len(pairs) == 10 * 4


@pytest.mark.slow
@pytest.mark.parametrize("axes, order, K", SWEEP)
def test_derivatives_and_vmap_every_batching(axes, order, K):
    _check(K, axes, order=order, every=False)


@pytest.mark.parametrize(
    "K, axes, tangent_axes",
    slow_beyond(
        [(2, (0, 0, 0, 0, 0), (None,) * 4), (4, (0, None, 0, None, 0), (0, None, None, None))],
        [(2, (0, 0, 0, 0, 0), (None,) * 4)],
        several=True,
    ),
)
def test_unbatched_tangents_of_batched_primals(K, axes, tangent_axes):
    # vmap(jvp) with the tangents the same for every example: the linear arguments
    # of the batched linear_call are unbatched (its broadcast branch).
    _check(K, axes, tangent_axes, order="vmap_of", every=False)


def test_vmap_of_grad_of_an_unbatched_argument():
    # The gradient of k, which vmap does not batch, is still one per example: the
    # broadcast branch's transpose must not sum over the examples.
    q, k, v, bias, mask = _inputs(2, (0, None, None, None, None))

    def run(attention):
        def loss(q, k):
            return jnp.sum(jnp.cos(attention(q, k, v, bias, mask)))

        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(q, k)

    dq, dk = run(chunked)
    assert dk.shape == (V_SIZE, *k.shape)
    chex.assert_trees_all_close((dq, dk), run(formula), atol=2e-5, rtol=2e-5)
    # and each example's dk is its own: not equal across the examples
    assert not np.allclose(dk[0], dk[1], atol=1e-3)
