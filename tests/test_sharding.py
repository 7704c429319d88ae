"""Sharded training on 8 simulated CPU devices, two processes through jax.distributed."""

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, command_env, load_config, make_qkv, slow_beyond
from jax.sharding import NamedSharding, PartitionSpec

import kit
from kit import sharding, training

# optax's Adam is not strict-promotion clean: see tests/conftest.py.
pytestmark = pytest.mark.usefixtures("standard_promotion")


# Four heads and d_ff 64 so that a model axis of 2 or 4 divides them.
SHARDED = {
    "task.length": 6,
    "task.eval_size": 16,
    "model.num_heads": 4,
    "model.d_model": 32,
    "model.d_ff": 64,
    "model.max_len": 16,
    "train.steps": 5,
    "train.batch_size": 16,
    "train.eval_every": 5,
    "train.checkpoint_every": 5,
    "train.eval_batch_size": 16,
}


def tiny_config(**mesh):
    return load_config("copy", **SHARDED, **{f"mesh.{k}": v for k, v in mesh.items()})


# Adam scales each element's update by its own gradient's size, so an element whose gradient is
# near zero turns float32 rounding of a reordered reduction into a difference of up to about
# 1e-6 after five steps (6e-7 seen on an AVX2-only EPYC, where XLA sums in another order). A
# wrong reduction or a lost shard moves parameters by about one update, 3e-3 at this rate.
PARAM_ATOL = 2e-6


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([r["loss"] for r in map(json.loads, f) if "loss" in r])


def final_params(workdir):
    _, _, state = training.load_checkpoint(workdir)
    return jax.device_get(state["params"])


@pytest.fixture
def single_device_run(tiny_run):
    workdir = tiny_run("copy", **SHARDED, **{"mesh.data": 1, "mesh.model": 1})
    return losses(workdir), final_params(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("data,model", [(8, 1), (2, 4)])  # data only; both axes
def test_mesh_matches_one_device(tmp_path, single_device_run, data, model):
    workdir = str(tmp_path)
    training.train_and_evaluate(tiny_config(data=data, model=model), workdir, progress=False)
    want_losses, want_params = single_device_run
    np.testing.assert_allclose(losses(workdir), want_losses, rtol=1e-5)
    assert len(want_losses) == 5
    chex.assert_trees_all_close(final_params(workdir), want_params, rtol=1e-5, atol=PARAM_ATOL)


def test_state_is_sharded_as_documented():
    s = training.setup(tiny_config(data=2, model=4))
    params = s.state_shardings["params"]
    attn = params["encoder"]["layers"][0]["self_attention"]
    assert attn["query"]["kernel"].get_value().spec == PartitionSpec(None, "model", None)
    assert attn["out"]["kernel"].get_value().spec == PartitionSpec("model", None, None)
    ff = params["encoder"]["layers"][0]["feed_forward"]
    assert ff["up"]["kernel"].get_value().spec == PartitionSpec(None, "model")
    assert ff["down"]["kernel"].get_value().spec == PartitionSpec("model", None)
    assert params["embed"]["tokens"].get_value().spec == PartitionSpec()
    # Adam's moments follow their parameters; the step count is replicated.
    adam = s.state_shardings["opt_state"].inner_state[1][0]  # apply_if_finite(chain(clip, adamw))
    assert adam.mu["encoder"]["layers"][0]["self_attention"]["query"][
        "kernel"
    ].get_value().spec == PartitionSpec(None, "model", None)
    assert adam.count.spec == PartitionSpec()


def _sharded_attention(implementation, *, grad=False, K=4):
    mesh = sharding.make_mesh(2, 4)
    q, k, v = make_qkv(B=4, T=32, S=32, N=8, K=K, H=16)
    heads = NamedSharding(mesh, PartitionSpec("data", None, "model", None))
    # Key/value heads go on "model" where it divides them, else they are replicated.
    kv_heads = heads if K % 4 == 0 else NamedSharding(mesh, PartitionSpec("data"))
    lengths = jnp.array([32, 20, 7, 32], jnp.int32)

    def f(q, k, v, lengths):
        return kit.dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation=implementation
        )

    if grad:
        attention = f

        def f(q, k, v, lengths):
            def loss(q, k, v):
                return jnp.sum(jnp.sin(attention(q, k, v, lengths)))

            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    args = (q, k, v, lengths)
    in_shardings = (heads, kv_heads, kv_heads, NamedSharding(mesh, PartitionSpec("data")))
    sharded = jax.jit(f, in_shardings=in_shardings)
    chex.assert_trees_all_close(sharded(*args), jax.jit(f)(*args), rtol=1e-5, atol=1e-6)
    return sharded.lower(*args).compile().as_text()


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def test_attention_runs_sharded_without_communication(optimized):
    """Batch on "data", heads on "model": the unchanged vmapped function needs no collective."""
    hlo = _sharded_attention("xla")
    assert [c for c in COLLECTIVES if c in hlo] == []


@pytest.mark.parametrize("grad", slow_beyond([False, True], [False]), ids=["fwd", "fwd+bwd"])
def test_chunked_attention_runs_sharded_without_communication(optimized, grad):
    """The chunked kernel runs per device on its own examples and heads (custom_partitioning)."""
    hlo = _sharded_attention("chunked", grad=grad)
    assert [c for c in COLLECTIVES if c in hlo] == []


@pytest.mark.slow
def test_chunked_attention_gathers_heads_that_do_not_split(optimized):
    """K = 2 key/value heads on a model axis of 4: still correct; query heads are gathered
    (the documented fallback), the batch stays split."""
    hlo = _sharded_attention("chunked", grad=True, K=2)
    assert [c for c in COLLECTIVES if c in hlo] == ["all-gather"]


@pytest.mark.parametrize(
    "mesh, field",
    [
        ({"data": 16, "model": 1}, r"config\.mesh\.data: .*16 x 1 x 1 = 16 needs more than the 8"),
        ({"data": -1, "model": 3}, r"config\.mesh\.model: 3 does not divide the 8 devices"),
        ({"data": 1, "model": 8}, r"config\.mesh\.model: 8 does not divide model\.num_heads = 4"),
        ({"data": -1, "model": -1}, r"config\.mesh\.data: at most one"),
        ({"data": 0, "model": 1}, r"config\.mesh\.data: expected a positive int or -1"),
    ],
)
def test_bad_mesh_fails_at_start_naming_the_field(tmp_path, mesh, field):
    with pytest.raises(ValueError, match=field):
        training.train_and_evaluate(tiny_config(**mesh), str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_mesh_must_divide_the_batch(tmp_path):
    config = tiny_config(data=8, model=1)
    config.train.batch_size = 12
    with pytest.raises(ValueError, match=r"config\.mesh\.data: 8 does not divide train\.batch"):
        training.train_and_evaluate(config, str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_initialize_needs_all_three_values(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize() is False
    with pytest.raises(ValueError, match=r"num_processes, process_id: needed"):
        sharding.initialize("127.0.0.1:1")
    with pytest.raises(ValueError, match=r"process_id: expected in \[0, 2\), got 2"):
        sharding.initialize("127.0.0.1:1", 2, 2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, single_device_run):
    """Two processes x 2 CPU devices each (gloo collectives) train like one device."""
    workdir = str(tmp_path / "run")
    overrides = [f"--config.{k}={v}" for k, v in SHARDED.items()]
    address = f"127.0.0.1:{free_port()}"
    env = command_env(devices=2)
    procs = []
    try:
        for pid in range(2):
            command = [
                sys.executable,
                os.path.join(ROOT, "experiments", "train.py"),
                f"--config={os.path.join(ROOT, 'configs', 'copy.py')}:tiny",
                *overrides,
                "--config.mesh.data=2",
                "--config.mesh.model=2",
                f"--workdir={workdir}",
                "--progress=false",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={pid}",
            ]
            procs.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert '"step": 5' in outputs[0]
    assert '"step"' not in outputs[1]  # only process 0 prints and writes metrics
    want_losses, want_params = single_device_run
    np.testing.assert_allclose(losses(workdir), want_losses, rtol=1e-5)
    chex.assert_trees_all_close(final_params(workdir), want_params, rtol=1e-5, atol=PARAM_ATOL)
