"""kit.train: smoke runs per task and model, exact resume, config errors, one compile."""

import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from kit import checkpoint, metrics, tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def standard_promotion():
    # optax's Adam bias correction (decay ** int count) is not strict-promotion clean;
    # kit's own model code is checked under strict promotion in test_decode.py.
    with jax.numpy_dtype_promotion("standard"):
        yield


def tiny_config(task="copy", kind="encoder_decoder", **train_overrides):
    config = train.default_config()
    config.task.name = task
    config.task.length = 5
    config.task.num_symbols = 6
    config.task.eval_size = 12
    config.model.kind = kind
    config.model.d_model = 16
    config.model.num_heads = 2
    config.model.num_layers = 1
    config.model.num_decoder_layers = 1
    config.model.d_ff = 32
    config.model.max_len = 48
    config.model.dropout_rate = 0.1
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.warmup_steps = 1
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.train.eval_batch_size = 8
    config.train.update(train_overrides)
    config.mesh.update({"data": 1, "model": 1})
    config.lock()
    return config


def run(config, workdir, **kwargs):
    """train_and_evaluate on one device (tests/test_sharding.py covers meshes)."""
    return train.train_and_evaluate(config, workdir, devices=jax.devices()[:1], **kwargs)


@pytest.mark.parametrize(
    "task, kind",
    [
        ("copy", "encoder_decoder"),
        ("sort", "decoder_only"),
        ("reverse", "encoder_only"),
        ("dates", "encoder_decoder"),
        ("dates", "decoder_only"),
    ],
)
def test_smoke_train_and_evaluate(tmp_path, task, kind):
    result = run(tiny_config(task, kind), str(tmp_path), progress=False)
    assert result["step"] == 4
    for name in ("eval/loss", "eval/token_accuracy", "eval/exact_match"):
        assert np.isfinite(result[name])
    assert 0.0 <= result["eval/token_accuracy"] <= 1.0
    lines = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    assert {"loss", "learning_rate", "accuracy"} <= set(lines[0])
    assert [line["step"] for line in lines if "eval/exact_match" in line] == [2, 4]
    assert (tmp_path / "config.json").exists()
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4


def _final_params(workdir, config):
    _, mcfg = train.check_config(config)
    graphdef, params = train.init_model(mcfg, jax.random.key(0, impl="rbg"))
    trainer = train.Trainer(graphdef, train.make_optimizer(config.train), 0.0, True)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    return ckpt.restore(ckpt.latest_step(), trainer.init_state(params))


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    config = tiny_config(steps=6, eval_every=6)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(config, straight, progress=False)

    real_batch = tasks.train_batch

    def crash_at_step_5(task, seed, step, batch_size):
        if step == 5:
            raise RuntimeError("simulated crash")
        return real_batch(task, seed, step, batch_size)

    monkeypatch.setattr(tasks, "train_batch", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(config, resumed, progress=False)
    monkeypatch.setattr(tasks, "train_batch", real_batch)
    assert checkpoint.Checkpointer(os.path.join(resumed, "checkpoints")).latest_step() == 4
    run(config, resumed, progress=False)

    a, b = _final_params(straight, config), _final_params(resumed, config)
    assert int(a["step"]) == int(b["step"]) == 6
    chex.assert_trees_all_equal(a, b)
    assert metrics.read_metrics(os.path.join(straight, "metrics.jsonl")) == metrics.read_metrics(
        os.path.join(resumed, "metrics.jsonl")
    )


BAD_CONFIGS = {
    "model.d_model": (lambda c: c.model.update(d_model=18, num_heads=4), "divisible by"),
    "model.num_kv_heads": (lambda c: c.model.update(num_kv_heads=3), "positive divisor"),
    "train.steps": (lambda c: c.train.update(steps=0), "positive int"),
    "train.batch_size": (lambda c: c.train.update(batch_size=-1), "positive int"),
    "task.name": (lambda c: c.task.update(name="parse"), "expected one of"),
    "model.kind": (lambda c: c.model.update(kind="rnn"), "expected one of"),
    "model.max_len": (lambda c: c.model.update(max_len=4), "needs positions up to"),
    "model.positions": (lambda c: c.model.update(positions="none"), "expected one of"),
    "train.learning_rate": (lambda c: c.train.update(learning_rate=0.0), "expected > 0"),
}


@pytest.mark.parametrize("field", list(BAD_CONFIGS))
def test_invalid_config_fails_naming_the_field_and_writes_nothing(tmp_path, field):
    config = tiny_config().unlock()
    change, message = BAD_CONFIGS[field]
    change(config)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"config\.{field}: .*{message}"):
        run(config, str(workdir), progress=False)
    assert not workdir.exists()


def test_encoder_only_refuses_a_task_of_other_length(tmp_path):
    with pytest.raises(ValueError, match=r"config.model.kind: 'encoder_only' predicts one output"):
        run(tiny_config("dates", "encoder_only"), str(tmp_path / "r"))


def test_incompatible_checkpoint_stops_and_overwrites_nothing(tmp_path):
    run(tiny_config(steps=2), str(tmp_path), progress=False)
    before = {p: (tmp_path / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
    config = tiny_config(steps=2).unlock()
    config.model.d_model = 32
    with pytest.raises(ValueError, match=r"workdir: .* incompatible config \(model.d_model"):
        run(config, str(tmp_path), progress=False)
    assert before == {p: (tmp_path / p).read_bytes() for p in before}


def test_train_step_compiles_once():
    config = tiny_config()
    task, mcfg = train.check_config(config)
    graphdef, params = train.init_model(mcfg, jax.random.key(0, impl="rbg"))
    trainer = train.Trainer(graphdef, train.make_optimizer(config.train), 0.1, True)
    step = jax.jit(chex.assert_max_traces(trainer.train_step, n=1))
    state = trainer.init_state(params)
    for i in range(3):
        mb = train.model_batch(mcfg.kind, tasks.train_batch(task, 0, i, 8))
        state, _ = step(state, mb, jax.random.key(1, impl="rbg"))
    assert int(state["step"]) == 3


def test_command_line_rejects_a_mistyped_key(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "train.py"),
            f"--config={os.path.join(ROOT, 'configs', 'copy.py')}",
            f"--workdir={tmp_path / 'run'}",
            "--config.train.stepz=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert "stepz" in result.stderr
    assert not (tmp_path / "run").exists()
