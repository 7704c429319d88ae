"""Reliability: killed runs resume exactly, non-finite steps, numerics under stress,
determinism, no unpickling, a property sweep of bad inputs, a sweep of config fields."""

import errno
import functools
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from crash_run import faults_at
from helpers import (
    ROOT,
    TOLERANCES,
    command_env,
    load_config,
    normal,
    reference_attention,
    slow_beyond,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kit
from kit import checkpoint, metrics, training
from kit.training import stopping

# optax's Adam is not strict-promotion clean: see tests/conftest.py.
pytestmark = pytest.mark.usefixtures("standard_promotion")


# Beyond configs/copy.py's tiny variant: 8 steps, checkpoints every 2, evaluations every 4.
RELIABLE = {"model.max_len": 16, "model.dropout_rate": 0.1, "train.steps": 8, "train.eval_every": 4}


def tiny_config(**overrides):
    return load_config("copy", **{**RELIABLE, **overrides})


def run(config, workdir):
    return training.train_and_evaluate(config, workdir, progress=False)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- kill and resume


def crash_run(point, workdir):
    """experiments/train.py in a fresh process, killed at `point` ("none": never)."""
    env = command_env()
    command = [
        sys.executable,
        os.path.join(ROOT, "tests", "crash_run.py"),
        point,
        f"--config={os.path.join(ROOT, 'configs', 'copy.py')}:tiny",
        *(f"--config.{k}={v}" for k, v in RELIABLE.items()),
        f"--workdir={workdir}",
        "--progress=false",
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def temporary_folders(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return [name for name in os.listdir(folder) if not name.isdigit()]


@pytest.fixture
def straight_run(tiny_run):
    """The workdir of the uninterrupted run that the resumed ones must equal (trained
    in the test process: a command's run must match it byte for byte)."""
    return tiny_run("copy", **RELIABLE)


def assert_same_run(straight, resumed):
    """Metrics byte for byte and the final checkpoint bit for bit."""
    assert read_bytes(os.path.join(straight, "metrics.jsonl")) == read_bytes(
        os.path.join(resumed, "metrics.jsonl")
    )
    _, _, a = training.load_checkpoint(straight)
    _, _, b = training.load_checkpoint(resumed)
    assert int(a["step"]) == int(b["step"]) == 8
    chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result_bit_for_bit(tmp_path, straight_run):
    """SIGKILL at 4 points in one workdir, the same command rerun each time (each rerun
    also shows that a killed run leaves no lock behind), then finished in the test's
    process. Determinism comes with it: the runs are separate processes of the same
    config and seed, so their metrics match byte for byte only if each process
    computes the same numbers."""
    resumed = str(tmp_path / "resumed")

    def latest():
        return checkpoint.Checkpointer(os.path.join(resumed, "checkpoints")).latest_step()

    # 1. Between checkpoints: before step 3 (checkpoint 2 is complete).
    killed = crash_run("batch:3", resumed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest() == 2
    # 2. During the save of checkpoint 4 (resumed from 2): written, not committed.
    killed = crash_run("save:4", resumed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # (Checked first: opening a Checkpointer, as latest() does, removes such folders.)
    assert temporary_folders(resumed), "the cut save should leave its temporary folder"
    assert latest() == 2
    # 3. In the middle of the metrics line of step 7 (resumed from 2, saved 4 and 6).
    killed = crash_run("metrics:7", resumed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest() == 6
    assert temporary_folders(resumed) == []  # the partial checkpoint was cleaned up
    assert not read_bytes(os.path.join(resumed, "metrics.jsonl")).endswith(b"\n")
    # 4. Right after the last checkpoint, before the command returns.
    killed = crash_run("after_save:8", resumed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest() == 8
    run(tiny_config(), resumed)  # the test's process finishes what four others began
    assert_same_run(straight_run, resumed)


# ---------------------------------------------------------------- Ctrl-C, SIGTERM, lock, disk


@pytest.mark.slow
def test_signals_stop_at_a_step_save_and_resume_bit_for_bit(tmp_path, straight_run):
    """SIGINT and SIGTERM at 5 points in one workdir (checkpoints every 2 steps,
    evaluations every 4), the same run repeated each time: in the test's process
    (crash_run.faults_at), but for one point where the command stops, as a shell sees
    it (the other command's Ctrl-C is the next test's). A run fetches its first batch
    while it compiles, so a signal there counts as one during start-up."""
    resumed = str(tmp_path / "resumed")
    steps = [
        # (faults, exit status, the line printed, latest checkpoint after)
        ("batch:3:INT", 130, "interrupted at step 3 (SIGINT): checkpoint saved", 3),
        ("eval:4:TERM", 143, "interrupted at step 4 (SIGTERM): checkpoint saved", 4),
        # a second Ctrl-C during a save: abandoned at once, checkpoint 4 kept
        (
            "batch:6:INT,in_save:6:INT",
            130,
            "interrupted at step 6 (SIGINT): second SIGINT during the save: abandoned; "
            "latest checkpoint step 4",
            4,
        ),
        ("init:0:TERM", 143, "interrupted at step 4 (SIGTERM): checkpoint saved", 4),
        ("in_save:6:INT", 130, "interrupted at step 6 (SIGINT): checkpoint saved", 6),
    ]
    through_the_command = "eval:4:TERM"
    for faults, status, line, latest in steps:
        line += "; run the same command to resume"
        if faults == through_the_command:
            stopped = crash_run(faults, resumed)
            assert stopped.returncode == status, (faults, stopped.stderr[-3000:])
            assert stopped.stdout.strip().splitlines()[-1] == line
            assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
        else:
            with faults_at(faults), pytest.raises(training.Interrupted) as stopped:
                run(tiny_config(), resumed)
            assert (str(stopped.value), stopped.value.exit_code) == (line, status)
        ckpt = checkpoint.Checkpointer(os.path.join(resumed, "checkpoints"))
        assert ckpt.latest_step() == latest, faults
    run(tiny_config(), resumed)
    assert_same_run(straight_run, resumed)


@pytest.mark.slow
def test_ctrl_c_from_outside_and_a_second_run_on_a_locked_workdir(tmp_path):
    """As a user does it: train.py (through crash_run.py with no fault, which handles
    SIGINT as a terminal's foreground process does) while it trains; a second run on
    its workdir is refused; then Ctrl-C from outside."""
    workdir = str(tmp_path / "run")
    env = command_env()
    command = [
        sys.executable,
        os.path.join(ROOT, "tests", "crash_run.py"),
        "none:0",
        f"--config={os.path.join(ROOT, 'configs', 'copy.py')}:tiny",
        "--config.train.steps=100000",
        "--config.train.log_every=1",
        f"--workdir={workdir}",
    ]
    first = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in first.stdout:  # wait until it trains
            if line.startswith("step "):
                break
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: workdir: {workdir} is in use by another run (process {first.pid}); "
            "wait for it to finish or use another --workdir"
        )
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"interrupted at step (\d+) \(SIGINT\): checkpoint saved; run the same command to resume",
        last,
    ), last
    assert "Traceback" not in err, err[-3000:]
    step = int(re.search(r"step (\d+)", last).group(1))
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == step


def test_lock_is_released_by_a_killed_holder_and_names_a_live_one(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from kit.training import stopping\n"
            "with stopping.lock_workdir(sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(600)",
            workdir,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        held = rf"in use by another run \(process {holder.pid}\)"
        with pytest.raises(ValueError, match=held), stopping.lock_workdir(workdir):
            pass
    finally:
        holder.kill()  # SIGKILL: no exit handler runs
        holder.wait()
    with stopping.lock_workdir(workdir):  # the system released it with the process
        pass


@pytest.mark.slow
def test_a_full_disk_stops_in_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, straight_run):
    config = tiny_config()
    workdir = str(tmp_path / "run")
    real_save, real_write = checkpoint.Checkpointer.save, metrics.MetricWriter.write

    def full_disk(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def save(self, step, state):
        if step == 4:
            raise full_disk(self.directory)
        real_save(self, step, state)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    with pytest.raises(training.WriteError, match=r"checkpoint: step 4 could not be written"):
        run(config, workdir)
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 2
    monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)

    def write(self, step, values):
        if step == 6 and "loss" in values:
            raise full_disk(self.path)
        real_write(self, step, values)

    monkeypatch.setattr(metrics.MetricWriter, "write", write)
    with pytest.raises(training.WriteError, match=r"metrics: step 6 could not be written to"):
        run(config, workdir)
    assert max(line["step"] for line in kit_metrics(workdir)) == 5  # written before 6
    monkeypatch.setattr(metrics.MetricWriter, "write", real_write)
    run(config, workdir)
    assert_same_run(straight_run, workdir)  # the same config, trained in one go


# ---------------------------------------------------------------- non-finite guard


def kit_metrics(workdir):
    return metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))


@pytest.mark.slow
def test_nonfinite_stops_naming_the_step_or_is_skipped_and_counted(tmp_path):
    overrides = {"train.learning_rate": 1e30, "train.checkpoint_every": 1}
    stopped, skipped = str(tmp_path / "stop"), str(tmp_path / "skip")
    with pytest.raises(training.NonFiniteError, match=r"step 3: the loss \(nan\) .* not finite"):
        run(tiny_config(**overrides), stopped)
    _, _, at_2 = training.load_checkpoint(stopped)  # the last good checkpoint loads
    assert int(at_2["step"]) == 2
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(at_2["params"]))
    assert max(line["step"] for line in kit_metrics(stopped)) == 2  # nothing logged after

    run(tiny_config(**overrides, **{"train.skip_nonfinite": True}), skipped)
    lines = [line for line in kit_metrics(skipped) if "loss" in line]
    assert [line["skipped"] for line in lines] == [0, 0, 1, 2, 3, 4, 5, 6]
    # Every update after step 2 was skipped: the parameters are still step 2's.
    _, _, at_8 = training.load_checkpoint(skipped)
    assert int(at_8["step"]) == 8
    chex.assert_trees_all_equal(jax.device_get(at_2["params"]), jax.device_get(at_8["params"]))


# ---------------------------------------------------------------- numerics under stress


def _stress_inputs(case, dtype):
    """q, k, v, options and the boolean mask they mean; B=2, N=4, K=2, H=16."""
    B, N, K, H = 2, 4, 2, 16
    T, S = (8, 4096) if case == "long_rows" else (16, 24)
    rq, rk, rv = jax.random.split(jax.random.key(7), 3)
    # Entries of q and k have std `spread`, so q.k has std 4 * spread**2 and the logits
    # scale * 4 * spread**2: about 100 (up to +-300) for the first three cases, so the
    # softmax is sharp but not one-hot, and the extreme scales meet extreme inputs.
    spread = {"logits_300": 5.0, "huge_scale": 0.05, "tiny_scale": 500.0}.get(case, 1.0)
    q = (normal(rq, (B, T, N, H)) * spread).astype(dtype)
    k = (normal(rk, (B, S, K, H)) * spread).astype(dtype)
    v = normal(rv, (B, S, K, H), dtype)
    scale = {"huge_scale": 1e4, "tiny_scale": 1e-6, "logits_300": 1.0}.get(case, H**-0.5)
    options = {"scale": scale}
    mask = np.ones((B, N, T, S), bool)
    if case in ("logits_300", "huge_scale", "tiny_scale"):
        options["is_causal"] = True
        mask &= np.tril(np.ones((T, S), bool))[None, None]
    if case == "masked_rows":  # example 0 has no key at all, example 1 five
        options["key_value_seq_lengths"] = jnp.array([0, 5], jnp.int32)
        mask[0] = False
        mask[1, :, :, 5:] = False
    return q, k, v, options, jnp.asarray(mask)


@pytest.mark.parametrize(
    "case, dtype, implementation",
    slow_beyond(
        [
            (case, dtype, implementation)
            for case in ("logits_300", "masked_rows", "long_rows", "huge_scale", "tiny_scale")
            for dtype in (jnp.bfloat16, jnp.float16)
            for implementation in ("xla", "chunked")
        ],
        [("masked_rows", jnp.bfloat16, "chunked")],
        several=True,
    ),
)
def test_low_precision_under_stress_is_finite_and_matches_float32(case, dtype, implementation):
    q, k, v, options, mask = _stress_inputs(case, dtype)

    def kit_fn(q, k, v):
        if implementation == "chunked":
            return kit.chunked_attention(q, k, v, block_q=8, block_k=64, **options)
        return kit.dot_product_attention(q, k, v, implementation="xla", **options)

    def ref_fn(q, k, v):  # the same rounded inputs, in float32
        return reference_attention(q, k, v, scale=options["scale"], mask=mask)

    d_out = normal(jax.random.key(3), q.shape)
    out, vjp = jax.vjp(jax.jit(kit_fn), q, k, v)
    grads = vjp(d_out.astype(dtype))
    ref_out, ref_vjp = jax.vjp(ref_fn, *(x.astype(jnp.float32) for x in (q, k, v)))
    ref_grads = ref_vjp(d_out)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    pairs = [("out", out, ref_out, fwd_tol)]
    pairs += [(f"d{n}", g, w, grad_tol) for n, g, w in zip("qkv", grads, ref_grads, strict=True)]
    for name, got, want, tol in pairs:
        got = np.asarray(got.astype(jnp.float32))
        assert np.all(np.isfinite(got)), name
        size = max(float(jnp.max(jnp.abs(want))), 1e-30)
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * size, err_msg=name)


# ---------------------------------------------------------------- no code from data


class _Payload:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_loading_never_unpickles(tmp_path, straight_run):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_run, workdir)
    marker = str(tmp_path / "executed")
    payload = pickle.dumps(_Payload(marker))
    step_dir = os.path.join(workdir, "checkpoints", "8")
    # Stray files where pickle-based formats keep their state: never read.
    for name in ("checkpoint", "state.pkl", "checkpoint.pkl"):
        with open(os.path.join(step_dir, name), "wb") as f:
            f.write(payload)
    _, _, state = training.load_checkpoint(workdir)
    assert int(state["step"]) == 8
    # The payload in place of files orbax does read (its legacy aggregate file, which it
    # parses as msgpack, and its JSON metadata): the load fails clearly.
    for name in ("checkpoint", "_METADATA"):
        path = os.path.join(step_dir, "default", name)
        original = read_bytes(path) if os.path.exists(path) else None
        with open(path, "wb") as f:
            f.write(payload)
        with pytest.raises(ValueError, match=r"checkpoint: step 8 under .* cannot be restored"):
            training.load_checkpoint(workdir)
        if original is None:
            os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(original)
    with open(os.path.join(workdir, "config.json"), "wb") as f:
        f.write(payload)
    with pytest.raises(ValueError, match=r"workdir: .*config.json is not a JSON config"):
        training.load_checkpoint(workdir)
    with pytest.raises(ValueError, match=r"workdir: .*config.json is not a JSON config"):
        run(tiny_config(), workdir)
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- property sweep

SWEEP_EXAMPLES = 12


@st.composite
def attention_calls(draw):
    """A call to kit.dot_product_attention, the mask it means if valid, and its defects:
    {argument name: what is wrong} by the contract, empty for a valid call."""
    B, T, S = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    K = draw(st.sampled_from([1, 2, 3]))
    N = K * draw(st.sampled_from([1, 2, 3])) + draw(st.sampled_from([0] * 7 + [1]))  # 1: invalid
    defects = {}
    if N % K:
        defects["key"] = "K does not divide N"
    H = draw(st.sampled_from([4, 8]))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
    seed = draw(st.integers(0, 2**16))
    rq, rk, rv, rb = jax.random.split(jax.random.key(seed), 4)
    q = normal(rq, (B, T, N, H), dtype)
    k_shape = (B, S, K, draw(st.sampled_from([H] * 7 + [H + 1])))  # H + 1: invalid
    k = normal(rk, k_shape, draw(st.sampled_from([dtype] * 7 + [jnp.float32])))
    if k.shape[-1] != H:
        defects["key"] = "head dim"
    if k.dtype != dtype:
        defects["key"] = "dtype"
    v = normal(rv, (B, S, K, H), dtype)
    kwargs = {"implementation": draw(st.sampled_from(["xla", "chunked", None] * 2 + ["flash"]))}
    if kwargs["implementation"] == "flash":
        defects["implementation"] = "unknown"
    live = np.ones((B, N, T, S), bool)
    if draw(st.booleans()):
        kwargs["is_causal"] = True
        live &= np.tril(np.ones((T, S), bool))[None, None]
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(B, N, T, S), (1, 1, T, S), (B, 1, 1, S), (B, T, S)]))
        kwargs["bias"] = normal(rb, shape, dtype)
        if len(shape) == 3 and B not in (1, N):  # [B, T, S] reads as [1, B, T, S]
            defects["bias"] = "does not broadcast"
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(B, N, T, S), (B, 1, T, S), (1, 1, 1, S), (B, N, S, T)]))
        density = draw(st.sampled_from([0.3, 0.8]))
        mask = np.random.default_rng(seed).random(shape) < density
        kwargs["mask"] = jnp.asarray(mask)
        try:  # a mask that broadcasts is valid
            live &= np.broadcast_to(mask, live.shape)
        except ValueError:
            defects["mask"] = "does not broadcast"
    for name, length in (("query_seq_lengths", T), ("key_value_seq_lengths", S)):
        if draw(st.booleans()):
            n = draw(st.sampled_from([B, B, B, B + 1]))  # B + 1: invalid
            lengths = np.array([draw(st.integers(0, length)) for _ in range(n)], np.int32)
            kwargs[name] = jnp.asarray(lengths)
            if n != B:
                defects[name] = "not one per example"
            else:
                pos = np.arange(length)[None, :] < lengths[:, None]  # [B, T|S]
                live &= pos[:, None, :, None] if name.startswith("query") else pos[:, None, None]
    if draw(st.booleans()):
        window = draw(st.sampled_from([0, 2, (1, 3), (-1, 2), (3,)]))
        kwargs["local_window_size"] = window
        if isinstance(window, int) or (len(window) == 2 and min(window) >= 0):
            left, right = (window, window) if isinstance(window, int) else window
            t, s = np.arange(T)[:, None], np.arange(S)[None, :]
            live &= (s >= t - left) & (s <= t + right)
        else:
            defects["local_window_size"] = "negative or not a pair"
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.sampled_from([0.5, 2.0, float("nan")]))
        if math.isnan(kwargs["scale"]):
            defects["scale"] = "not finite"
    return q, k, v, kwargs, live, defects


@pytest.fixture(scope="module")
def sweep_counts():
    """Counts the sweep's valid and invalid calls; at the end it must have seen both."""
    counts = {"accepted": 0, "rejected": 0}
    yield counts
    print(f"property sweep: {counts}")
    assert counts["accepted"] > 3 and counts["rejected"] > 3, counts


@pytest.mark.slow
@settings(
    max_examples=SWEEP_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(call=attention_calls())
def test_property_sweep_right_answer_or_a_named_value_error(sweep_counts, call):
    q, k, v, kwargs, live, defects = call
    arrays = {name: x for name, x in kwargs.items() if isinstance(x, jax.Array)}
    options = {name: x for name, x in kwargs.items() if name not in arrays}
    attention = jax.jit(
        lambda q, k, v, arrays: kit.dot_product_attention(q, k, v, **arrays, **options)
    )
    if defects:  # refused, naming an argument that is wrong
        sweep_counts["rejected"] += 1
        with pytest.raises(ValueError) as error:
            attention(q, k, v, arrays)
        name = re.match(r"(\w+)", str(error.value)).group(1)
        assert name in defects, (defects, str(error.value))
        return
    sweep_counts["accepted"] += 1
    out = attention(q, k, v, arrays)  # a valid call: any error fails the test
    assert out.shape == q.shape and out.dtype == q.dtype
    got = np.asarray(out.astype(jnp.float32))
    assert np.all(np.isfinite(got))
    scale = kwargs.get("scale", q.shape[-1] ** -0.5)
    reference = jax.jit(functools.partial(reference_attention, scale=scale))
    want = reference(q, k, v, mask=jnp.asarray(live), bias=kwargs.get("bias"))
    tol = TOLERANCES[q.dtype.type][0]
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(jnp.max(want))))


# ---------------------------------------------------------------- config sweep

# One invalid value of the right type for every field of default_config().
INVALID = {
    "seed": -1,
    "task.name": "parse",
    "task.length": 0,
    "task.num_symbols": 1,
    "task.eval_size": 0,
    "task.split": "random",
    "task.pack_span": 0,
    "model.kind": "rnn",
    "model.d_model": 17,
    "model.num_heads": 0,
    "model.num_kv_heads": 3,
    "model.num_layers": 0,
    "model.num_decoder_layers": 0,
    "model.d_ff": -4,
    "model.max_len": 2,
    "model.dropout_rate": 1.0,
    "model.positions": "relative",
    "model.random_positions": -1,
    "model.patch_size": 0,
    "model.dtype": "float8",
    "model.context_strategy": "ulysses",
    "model.context_head_groups": 0,
    "train.steps": 0,
    "train.batch_size": -1,
    "train.learning_rate": float("nan"),
    "train.warmup_steps": -1,
    "train.weight_decay": -0.1,
    "train.grad_clip": 0.0,
    "train.label_smoothing": 1.0,
    "train.log_every": 0,
    "train.eval_every": 0,
    "train.checkpoint_every": 0,
    "train.keep_checkpoints": 0,
    "train.eval_batch_size": 0,
    "mesh.data": 3,
    "mesh.seq": 0,
    "mesh.model": 0,
}
# A bool field has no invalid value of its type; ml_collections refuses other types.
BOOL_FIELDS = (
    "train.skip_nonfinite",
    "task.augment",
    "task.pack",
    "task.validation",
    "model.feed_forward",
    "model.share_layers",
    "model.context_balance",
)


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_config_sweep_covers_every_field():
    assert set(_leaves(training.default_config())) == set(INVALID) | set(BOOL_FIELDS)
    config = training.default_config()
    for field in BOOL_FIELDS:
        section, name = field.split(".")
        with pytest.raises(TypeError):
            setattr(config[section], name, "yes")


@pytest.mark.parametrize("field", list(INVALID))
def test_every_invalid_config_field_fails_at_start_naming_it(tmp_path, field):
    config = tiny_config(**{field: INVALID[field]})
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^config\.{re.escape(field)}: "):
        run(config, str(workdir))
    assert not workdir.exists()
