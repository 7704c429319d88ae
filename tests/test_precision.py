"""bfloat16 compute (config.model.dtype="bfloat16") against float32 on the same parameters:
a model's outputs, gradients and a short training run's loss curve agree within bfloat16's
precision, and the parts that must stay float32 (softmax statistics, LayerNorm's
statistics, the loss) are float32 in the program that runs.

bfloat16 keeps 8 significant bits (a relative step of 2^-8 = 0.39%); through the copy
model's 1 + 1 layers the logits measured 1.0% of their largest magnitude off float32's and
the gradients 2.1% (relative L2, the worst leaf) on 2026-12-06; the tolerances below are
about three times those."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import load_config

import kit
from kit import models, training

# Standard promotion: flax's LayerNorm promotes bfloat16 to float32 for its statistics
# implicitly, and optax's Adam is not strict-promotion clean (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("standard_promotion")


def _setup(dtype: str, **overrides):
    config = load_config("copy", **{"model.dtype": dtype, **overrides})
    task, mcfg = training.check_config(config)
    graphdef, params = training.init_model(mcfg, jax.random.key(0, impl="rbg"))
    return config, task, mcfg, graphdef, params


def _objective(graphdef, mb, implementation=None):
    def objective(params):
        model = nnx.merge(graphdef, params)
        if implementation is not None:  # the copy task's lengths pick xla by default
            for _, module in nnx.iter_modules(model):
                if isinstance(module, kit.nn.MultiHeadAttention):
                    module.implementation = implementation
        logits, _ = model.teacher_forced(mb)
        return training.loss_fn(logits, mb["targets"], mb["weights"])[0], logits

    return objective


def _batch(task, mcfg, step=0, size=16):
    return training.model_batch(models.MODELS[mcfg.kind], task.train_batch(0, step, size))


def test_bfloat16_forward_and_gradients_match_float32():
    _, task, mcfg, graphdef32, params = _setup("float32")
    _, _, _, graphdef16, params16 = _setup("bfloat16")
    chex.assert_trees_all_equal(params, params16)  # the dtype changes the compute only
    mb = _batch(task, mcfg)

    def run(graphdef):
        f = jax.value_and_grad(_objective(graphdef, mb), has_aux=True)
        return jax.jit(f)(params)

    (loss32, logits32), grads32 = run(graphdef32)
    (loss16, logits16), grads16 = run(graphdef16)
    assert logits16.dtype == jnp.bfloat16 and logits32.dtype == jnp.float32
    assert loss16.dtype == jnp.float32  # the loss is computed in float32
    scale = float(jnp.max(jnp.abs(logits32)))
    error = float(jnp.max(jnp.abs(logits16.astype(jnp.float32) - logits32)))
    assert 0 < error <= 0.03 * scale  # not equal: bfloat16 really ran
    assert abs(float(loss16) - float(loss32)) <= 0.01
    for (path, g32), g16 in zip(
        jax.tree.leaves_with_path(grads32), jax.tree.leaves(grads16), strict=True
    ):
        assert g16.dtype == jnp.float32  # gradients of float32 parameters
        g16, g32 = np.asarray(g16, np.float64), np.asarray(g32, np.float64)
        relative = float(np.linalg.norm(g16 - g32) / np.linalg.norm(g32))
        assert relative <= 0.06, (jax.tree_util.keystr(path), relative)


def _primitive_dtypes(jaxpr) -> collections.Counter:
    """(primitive name, output dtype) -> count, over a jaxpr and every jaxpr inside it."""
    seen = collections.Counter()

    def walk(j):
        for eqn in j.eqns:
            for out in eqn.outvars:
                seen[(eqn.primitive.name, str(out.aval.dtype))] += 1
            for value in eqn.params.values():
                for x in value if isinstance(value, (list, tuple)) else [value]:
                    inner = getattr(x, "jaxpr", x)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr.jaxpr)
    return seen


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_bfloat16_keeps_softmax_layernorm_and_loss_statistics_in_float32(implementation):
    # The products run in bfloat16; every exponential (softmax, log-sum-exp), row
    # maximum (softmax statistics), reciprocal square root (LayerNorm) and logarithm
    # (the loss) runs in float32.
    _, task, mcfg, graphdef, params = _setup("bfloat16")
    objective = _objective(graphdef, _batch(task, mcfg), implementation)
    seen = _primitive_dtypes(jax.make_jaxpr(jax.grad(lambda p: objective(p)[0]))(params))
    assert seen[("dot_general", "bfloat16")] > 0
    for name in ("exp", "reduce_max", "rsqrt", "log"):
        dtypes = {dtype for (n, dtype) in seen if n == name}
        assert dtypes == {"float32"}, (name, dtypes)


@pytest.mark.slow
def test_bfloat16_training_loss_curve_follows_float32():
    """40 steps of the copy task from the same parameters and batches: bfloat16's loss
    stays within 0.05 + 5% of float32's at every step, and float32's falls."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        config, task, mcfg, graphdef, params = _setup(dtype, **{"train.learning_rate": 1e-2})
        trainer = training.Trainer(graphdef, training.make_optimizer(config.train), 0.0, False)
        step = jax.jit(trainer.train_step)
        state, losses = trainer.init_state(params), []
        for i in range(40):
            mb = _batch(task, mcfg, i, size=32)
            state, metrics = step(state, mb, jax.random.key(1, impl="rbg"))
            losses.append(float(metrics["loss"]))
        curves[dtype] = np.array(losses)
    low, high = curves["bfloat16"], curves["float32"]
    assert np.mean(high[-5:]) < 0.85 * high[0]  # it learns: the curve has a shape to follow
    np.testing.assert_array_less(np.abs(low - high), 0.05 + 0.05 * high)
