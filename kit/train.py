"""Training and evaluation: train_step, eval_step, train_and_evaluate(config, workdir).

The train state is a pytree `{"step", "params", "opt_state"}`; `train_step` is a
pure function of (state, batch, rng), jit-compiled once, with dropout keys
`fold_in(rng, step)`. Data batches are a pure function of (seed, step), so a
run resumed from a checkpoint ends with exactly the parameters of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from kit import checkpoint, decode, metrics, models, sharding, tasks

Array = jax.Array


# --------------------------------------------------------------------------
# Config: every key, with defaults; configs/<name>.py override them.


def default_config() -> ml_collections.ConfigDict:
    """The full set of keys with defaults (configs/*.py start from this)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = ml_collections.ConfigDict(
        {"name": "copy", "length": 16, "num_symbols": 10, "eval_size": 1000}
    )
    config.model = ml_collections.ConfigDict(
        {
            "kind": "encoder_decoder",
            "d_model": 64,
            "num_heads": 4,
            "num_kv_heads": ml_collections.FieldReference(None, field_type=int),
            "num_layers": 2,
            "num_decoder_layers": 2,
            "d_ff": 128,
            "max_len": 64,
            "dropout_rate": 0.0,
            "positions": "sinusoidal",
        }
    )
    config.train = ml_collections.ConfigDict(
        {
            "steps": 1000,
            "batch_size": 128,
            "learning_rate": 1e-3,
            "warmup_steps": 100,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "label_smoothing": 0.0,
            "log_every": 50,
            "eval_every": 500,
            "checkpoint_every": 500,
            "keep_checkpoints": 3,
            "eval_batch_size": 1000,
            # False: a non-finite loss or gradient stops training with an error naming
            # the step. True: such updates are skipped and counted (metric "skipped").
            "skip_nonfinite": False,
        }
    )
    # Device mesh ("data", "model"); -1 fills the remaining devices. See kit/sharding.py.
    config.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
    return config


# --------------------------------------------------------------------------
# Config checks: every one names its field and runs before any compilation.


def _positive_int(config: ml_collections.ConfigDict, path: str) -> None:
    value = _get(config, path)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.{path}: expected a positive int, got {value!r}")


def _number(
    config: ml_collections.ConfigDict,
    path: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """A finite real number in the interval; raises ValueError naming config.<path>."""
    value = _get(config, path)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"config.{path}: expected a finite number in {interval}, got {value!r}")
    return float(value)


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def model_config(config: ml_collections.ConfigDict, task: tasks.Task) -> models.ModelConfig:
    """Validates `config.model` against the task and builds the frozen ModelConfig."""
    m = config.model
    if m.kind not in models.KINDS:
        raise ValueError(f"config.model.kind: expected one of {models.KINDS}, got {m.kind!r}")
    if m.positions not in models.POSITIONS:
        raise ValueError(
            f"config.model.positions: expected one of {models.POSITIONS}, got {m.positions!r}"
        )
    for name in ("d_model", "num_heads", "num_layers", "num_decoder_layers", "d_ff", "max_len"):
        _positive_int(config, f"model.{name}")
    if m.d_model % m.num_heads:
        raise ValueError(
            f"config.model.d_model: must be divisible by model.num_heads = {m.num_heads}, "
            f"got {m.d_model}"
        )
    kv = m.num_kv_heads
    if kv is not None and (not isinstance(kv, int) or kv <= 0 or m.num_heads % kv):
        raise ValueError(
            f"config.model.num_kv_heads: must be a positive divisor of model.num_heads = "
            f"{m.num_heads}, got {kv!r}"
        )
    _number(config, "model.dropout_rate", 0.0, 1.0)
    if m.positions == "rope" and (m.d_model // m.num_heads) % 2:
        raise ValueError(
            "config.model.positions: 'rope' needs an even head dim d_model / num_heads"
        )
    if m.positions == "sinusoidal" and m.d_model % 2:
        raise ValueError(
            f"config.model.d_model: sinusoidal positions need it even, got {m.d_model}"
        )
    if m.kind == "encoder_only" and not task.aligned:
        raise ValueError(
            f"config.model.kind: 'encoder_only' predicts one output per input position, "
            f"but task {task.name!r} has targets of another length"
        )
    needed = {
        "encoder_decoder": max(task.src_len, task.tgt_len + 1),
        "decoder_only": task.src_len + task.tgt_len + 1,
        "encoder_only": task.src_len,
    }[m.kind]
    if m.max_len < needed:
        raise ValueError(
            f"config.model.max_len: the {m.kind} model needs positions up to {needed} "
            f"for task {task.name!r}, got {m.max_len}"
        )
    return models.ModelConfig(
        kind=m.kind,
        vocab_size=task.vocab_size,
        d_model=m.d_model,
        num_heads=m.num_heads,
        num_kv_heads=kv,
        num_layers=m.num_layers,
        num_decoder_layers=m.get("num_decoder_layers", 1),
        d_ff=m.d_ff,
        max_len=m.max_len,
        dropout_rate=float(m.dropout_rate),
        positions=m.positions,
    )


def check_config(config: ml_collections.ConfigDict) -> tuple[tasks.Task, models.ModelConfig]:
    """All start-up checks; returns the task and the model config."""
    seed = config.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"config.seed: expected an int in [0, 2**31), got {seed!r}")
    try:
        task = tasks.make_task(
            config.task.name, length=config.task.length, num_symbols=config.task.num_symbols
        )
    except ValueError as error:  # its messages name task.<field>
        raise ValueError(f"config.{error}") from None
    _positive_int(config, "task.eval_size")
    for name in (
        "steps",
        "batch_size",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_batch_size",
    ):
        _positive_int(config, f"train.{name}")
    t = config.train
    _number(config, "train.learning_rate", 0.0, math.inf, low_open=True)
    if (
        not isinstance(t.warmup_steps, int)
        or isinstance(t.warmup_steps, bool)
        or t.warmup_steps < 0
    ):
        raise ValueError(f"config.train.warmup_steps: expected an int >= 0, got {t.warmup_steps!r}")
    _number(config, "train.label_smoothing", 0.0, 1.0)
    _number(config, "train.grad_clip", 0.0, math.inf, low_open=True)
    _number(config, "train.weight_decay", 0.0, math.inf)
    if not isinstance(t.skip_nonfinite, bool):
        raise ValueError(f"config.train.skip_nonfinite: expected a bool, got {t.skip_nonfinite!r}")
    return task, model_config(config, task)


# --------------------------------------------------------------------------
# Model inputs per model kind.


def model_batch(kind: str, batch: dict[str, np.ndarray]) -> dict[str, Array]:
    """Task arrays -> what the model of `kind` reads, with targets and loss weights.

    encoder_only: targets aligned with src. encoder_decoder: the decoder reads
    [BOS, tgt] and predicts [tgt, EOS]. decoder_only: the model reads
    [src (padded), SEP, tgt] and predicts [tgt, EOS] from the SEP on.
    """
    src, src_len = batch["src"], batch["src_lengths"]
    tgt, tgt_len = batch["tgt"], batch["tgt_lengths"]
    B, Lt = tgt.shape
    if kind == "encoder_only":
        weights = np.arange(Lt)[None, :] < tgt_len[:, None]
        return {"src": src, "src_lengths": src_len, "targets": tgt, "weights": weights}
    out = np.concatenate([tgt, np.full((B, 1), tasks.PAD, np.int32)], axis=1)
    out[np.arange(B), tgt_len] = tasks.EOS
    weights = np.arange(Lt + 1)[None, :] <= tgt_len[:, None]
    start = tasks.BOS if kind == "encoder_decoder" else tasks.SEP
    tgt_in = np.concatenate([np.full((B, 1), start, np.int32), tgt], axis=1)
    mb = {"src": src, "src_lengths": src_len, "tgt_in": tgt_in, "targets": out, "weights": weights}
    if kind == "decoder_only":
        src_mask = np.arange(src.shape[1])[None, :] < src_len[:, None]
        mb["key_mask"] = np.concatenate([src_mask, np.ones((B, Lt + 1), bool)], axis=1)
    return mb


def forward(model: nnx.Module, mb: dict[str, Array], *, dropout_rng=None, return_weights=False):
    """Teacher-forced logits aligned with mb["targets"], and aux."""
    kind = model.cfg.kind
    if kind == "encoder_only":
        return model(
            mb["src"], mb["src_lengths"], dropout_rng=dropout_rng, return_weights=return_weights
        )
    if kind == "encoder_decoder":
        return model(
            mb["src"],
            mb["src_lengths"],
            mb["tgt_in"],
            dropout_rng=dropout_rng,
            return_weights=return_weights,
        )
    tokens = jnp.concatenate([mb["src"], mb["tgt_in"]], axis=1)
    logits, aux = model(
        tokens, mb["key_mask"], dropout_rng=dropout_rng, return_weights=return_weights
    )
    return logits[:, mb["src"].shape[1] :], aux


def predict(model: nnx.Module, mb: dict[str, Array]) -> Array:
    """Greedy predictions aligned with mb["targets"] (argmax per position for encoder_only)."""
    kind, length = model.cfg.kind, mb["targets"].shape[1]
    if kind == "encoder_only":
        logits, _ = model(mb["src"], mb["src_lengths"])
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if kind == "encoder_decoder":
        return decode.greedy_encoder_decoder(
            model, mb["src"], mb["src_lengths"], bos=tasks.BOS, length=length
        )
    Ls = mb["src"].shape[1]
    prompt = jnp.concatenate([mb["src"], mb["tgt_in"][:, :1]], axis=1)
    return decode.greedy_decoder_only(model, prompt, mb["key_mask"][:, : Ls + 1], length=length)


def loss_fn(logits: Array, targets: Array, weights: Array, label_smoothing: float = 0.0):
    """Weighted mean cross-entropy (optionally label-smoothed) and token accuracy."""
    vocab = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    w = weights.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(w), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * w) / total, jnp.sum(correct * w) / total


# --------------------------------------------------------------------------
# Steps.


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The static parts of training: model graph, optimizer, options. Steps are pure."""

    graphdef: Any
    tx: optax.GradientTransformation
    label_smoothing: float
    dropout: bool

    def init_state(self, params: Any) -> dict[str, Any]:
        return {"step": jnp.int32(0), "params": params, "opt_state": self.tx.init(params)}

    def train_step(self, state: dict[str, Any], mb: dict[str, Array], rng: Array):
        """One optimizer update: (state, batch, rng) -> (new state, metrics)."""
        dropout_rng = jax.random.fold_in(rng, state["step"]) if self.dropout else None

        def objective(params):
            model = nnx.merge(self.graphdef, params)
            logits, _ = forward(model, mb, dropout_rng=dropout_rng)
            return loss_fn(logits, mb["targets"], mb["weights"], self.label_smoothing)

        (loss, accuracy), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }
        grad_norm = optax.tree.norm(grads)
        return new_state, {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": grad_norm,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
            "skipped": opt_state.total_notfinite,
        }

    def eval_step(self, params: Any, mb: dict[str, Array]) -> dict[str, Array]:
        """Sums over one eval batch: loss, correct tokens, tokens, exact sequences."""
        model = nnx.merge(self.graphdef, params)
        logits, _ = forward(model, mb)
        loss, _ = loss_fn(logits, mb["targets"], mb["weights"])
        prediction = predict(model, mb)
        w = mb["weights"]
        hit = prediction == mb["targets"]
        tokens = jnp.sum(w.astype(jnp.float32))
        return {
            "loss_sum": loss * tokens,
            "correct": jnp.sum((hit & w).astype(jnp.float32)),
            "tokens": tokens,
            "exact": jnp.sum(jnp.all(hit | ~w, axis=1).astype(jnp.float32)),
            "sequences": jnp.float32(prediction.shape[0]),
        }


def init_model(mcfg: models.ModelConfig, rng: Array, shardings: Any = None) -> tuple[Any, Any]:
    """(graphdef, params) of a fresh model; initialized under jit (one compile, not one per op).

    `shardings` (a pytree of shardings like the params) places each parameter
    directly where it lives: no process ever holds a full copy first.
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.build(mcfg, rng)))
    init = jax.jit(lambda r: nnx.split(models.build(mcfg, r))[1], out_shardings=shardings)
    return graphdef, init(rng)


def make_mesh(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, devices=None):
    """The device mesh of `config.mesh`, checked against the devices, batch and heads.

    Raises:
      ValueError: naming config.mesh.data or config.mesh.model.
    """
    devices = jax.devices() if devices is None else devices
    try:
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.model, devices=devices)
        data, model = mesh.shape["data"], mesh.shape["model"]
        sharding.check_divides("data", data, {"train.batch_size": config.train.batch_size})
        sharding.check_divides(
            "model",
            model,
            {
                "model.num_heads": mcfg.num_heads,
                "model.num_kv_heads": mcfg.num_kv_heads or mcfg.num_heads,
                "model.d_ff": mcfg.d_ff,
            },
        )
    except ValueError as error:
        raise ValueError(f"config.{error}") from None
    return mesh


def make_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to train.learning_rate, then cosine decay to 1% of it."""
    return optax.warmup_cosine_decay_schedule(
        0.0,
        t.learning_rate,
        max(t.warmup_steps, 1),
        max(t.steps, t.warmup_steps + 1),
        end_value=t.learning_rate * 0.01,
    )


# optax.apply_if_finite applies a non-finite update after this many in a row; never, here.
_NEVER = 2**30


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW on the schedule, after global-norm clipping; non-finite gradients skip the update.

    optax.apply_if_finite leaves parameters and moments untouched on a step whose
    gradients are not all finite and counts it (`opt_state.total_notfinite`).
    Whether training then stops or goes on is `train.skip_nonfinite`.
    """
    return optax.apply_if_finite(
        optax.chain(
            optax.clip_by_global_norm(t.grad_clip),
            optax.adamw(make_schedule(t), weight_decay=t.weight_decay),
        ),
        max_consecutive_errors=_NEVER,
    )


def evaluate(eval_step, params: Any, batches: list[tuple[dict, int]]) -> dict[str, float]:
    """eval/loss, eval/token_accuracy and eval/exact_match over the held-out batches."""
    totals: dict[str, float] = {}
    for mb, pad in batches:
        for name, value in eval_step(params, mb).items():
            totals[name] = totals.get(name, 0.0) + float(value)
        # A padding row has no weighted token, so it counted as one exact sequence.
        totals["sequences"] -= pad
        totals["exact"] -= pad
    return {
        "eval/loss": totals["loss_sum"] / totals["tokens"],
        "eval/token_accuracy": totals["correct"] / totals["tokens"],
        "eval/exact_match": totals["exact"] / totals["sequences"],
    }


def eval_batches(task: tasks.Task, kind: str, config, multiple: int = 1) -> list[tuple[dict, int]]:
    """The held-out set as (model batch, number of padding rows), all of one shape.

    The batch size is rounded up to a multiple of `multiple` (the mesh's data axis).
    """
    data = tasks.eval_set(task, config.seed, config.task.eval_size)
    size = min(config.train.eval_batch_size, config.task.eval_size)
    size = -(-size // multiple) * multiple
    out = []
    for start in range(0, config.task.eval_size, size):
        mb = model_batch(kind, {k: v[start : start + size] for k, v in data.items()})
        pad = size - len(mb["src"])
        if pad:  # one shape, one compile; padding rows weigh nothing
            mb = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in mb.items()}
            mb["weights"][-pad:] = False
        out.append((mb, pad))
    return out


# --------------------------------------------------------------------------
# The main job.


def _check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir whose checkpoint came from another task or model."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    saved = _read_json(path)
    current = json.loads(config.to_json_best_effort())
    diffs = [
        f"{section}.{key}: saved {saved.get(section, {}).get(key)!r}, now {value!r}"
        for section in ("task", "model")
        for key, value in current[section].items()
        if saved.get(section, {}).get(key) != value
    ]
    if saved.get("seed") != current["seed"]:
        diffs.append(f"seed: saved {saved.get('seed')!r}, now {current['seed']!r}")
    has_checkpoint = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints"))
    )
    if diffs and has_checkpoint:
        raise ValueError(
            f"workdir: {workdir} holds a checkpoint of an incompatible config ("
            + "; ".join(diffs)
            + "); use another --workdir"
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything built from a config before training: task, model, optimizer, placement."""

    task: tasks.Task
    mcfg: models.ModelConfig
    trainer: Trainer
    mesh: Any
    abstract_state: dict[str, Any]
    state_shardings: dict[str, Any]
    batch_sharding: Any
    replicated: Any


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
    """Checks the config and builds the trainer and the shardings; compiles nothing.

    Raises:
      ValueError: for an invalid config, naming the field.
    """
    task, mcfg = check_config(config)
    mesh = make_mesh(config, mcfg, devices)
    graphdef, abstract_params = nnx.split(
        nnx.eval_shape(lambda: models.build(mcfg, jax.random.key(0, impl="rbg")))
    )
    t = config.train
    trainer = Trainer(graphdef, make_optimizer(t), float(t.label_smoothing), mcfg.dropout_rate > 0)
    abstract_state = jax.eval_shape(trainer.init_state, abstract_params)
    return Setup(
        task=task,
        mcfg=mcfg,
        trainer=trainer,
        mesh=mesh,
        abstract_state=abstract_state,
        state_shardings=sharding.state_shardings(trainer.tx, abstract_state, mesh),
        batch_sharding=sharding.batch_sharding(mesh),
        replicated=sharding.replicated(mesh),
    )


def _rngs(seed: int, replicated) -> tuple[Array, Array]:
    """(init, dropout) keys, replicated over the mesh.

    RBG keys compile several times faster than threefry on CPU (seconds at start-up).
    """
    return jax.jit(
        lambda: tuple(jax.random.split(jax.random.key(seed, impl="rbg"))),
        out_shardings=(replicated, replicated),
    )()


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, devices=None
):
    """Trains the configured model on its task; resumes from workdir's latest checkpoint.

    Writes workdir/config.json, workdir/metrics.jsonl and
    workdir/checkpoints/<step>/. With several processes (kit.sharding.initialize)
    every process runs this with the same arguments; only process 0 writes
    config.json, metrics and the progress bar, and all take part in checkpoints.

    Args:
      config: the experiment config (see default_config).
      workdir: where outputs go; an existing run there is resumed.
      progress: show a progress bar.
      devices: the devices of the mesh (default: all devices of all processes).

    Returns:
      The final evaluation metrics with "step" and "train_seconds".

    Raises:
      ValueError: for an invalid config (naming the field) or a workdir whose
        checkpoint came from an incompatible config; nothing is written then.
    """
    s = setup(config, devices)
    task, mcfg, trainer = s.task, s.mcfg, s.trainer
    _check_workdir(workdir, config)
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    t = config.train
    init_rng, dropout_rng = _rngs(config.seed, s.replicated)
    _, params = init_model(mcfg, init_rng, s.state_shardings["params"])
    state = jax.jit(trainer.init_state, out_shardings=s.state_shardings)(params)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, state)
    writer = metrics.MetricWriter(
        os.path.join(workdir, "metrics.jsonl"), resume_step=start, enabled=lead
    )
    train_step = jax.jit(
        trainer.train_step,
        in_shardings=(s.state_shardings, s.batch_sharding, s.replicated),
        out_shardings=(s.state_shardings, s.replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        trainer.eval_step,
        in_shardings=(s.state_shardings["params"], s.batch_sharding),
        out_shardings=s.replicated,
    )
    batches = [
        (sharding.put_batch(mb, s.batch_sharding), pad)
        for mb, pad in eval_batches(task, mcfg.kind, config, s.mesh.shape["data"])
    ]
    schedule = make_schedule(t)

    step = int(state["step"])
    result: dict[str, Any] = {}
    began = time.perf_counter()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn(
            "loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} {task.fields[rate]} steps/s"
        ),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not (progress and lead)) as bar:
        job = bar.add_task(
            task.name, total=t.steps, completed=step, loss=float("nan"), acc=0.0, rate="-"
        )
        window_start, window_steps = time.perf_counter(), 0
        unchecked: list[tuple[int, dict]] = []  # read at the next log/eval/save, not every step
        while step < t.steps:
            mb = model_batch(mcfg.kind, tasks.train_batch(task, config.seed, step, t.batch_size))
            state, m = train_step(state, sharding.put_batch(mb, s.batch_sharding), dropout_rng)
            step += 1
            window_steps += 1
            if not t.skip_nonfinite:
                unchecked.append((step, m))
            if step == t.steps or any(
                step % every == 0 for every in (t.log_every, t.eval_every, t.checkpoint_every)
            ):
                _stop_if_nonfinite(unchecked, ckpt)
                unchecked = []
            if step % t.log_every == 0 or step == t.steps:
                record = {name: float(value) for name, value in m.items() if name != "finite"}
                record["learning_rate"] = float(schedule(step - 1))
                writer.write(step, record)
                rate = window_steps / (time.perf_counter() - window_start)
                bar.update(
                    job,
                    completed=step,
                    loss=record["loss"],
                    acc=record["accuracy"],
                    rate=f"{rate:.0f}",
                )
                window_start, window_steps = time.perf_counter(), 0
            if step % t.eval_every == 0 or step == t.steps:
                result = evaluate(eval_step, state["params"], batches)
                writer.write(step, result)
            if step % t.checkpoint_every == 0 or step == t.steps:
                ckpt.save(step, state)
    if not result:  # resumed at the end: evaluate what was restored
        result = evaluate(eval_step, state["params"], batches)
    ckpt.close()
    return {**result, "step": step, "train_seconds": time.perf_counter() - began}


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient (train.skip_nonfinite is False)."""


def _stop_if_nonfinite(steps: list[tuple[int, dict]], ckpt: checkpoint.Checkpointer) -> None:
    """Raises NonFiniteError naming the first step whose loss or gradients were not finite.

    That step's update was skipped (make_optimizer), and no checkpoint was saved
    after it, so the latest checkpoint holds finite parameters.
    """
    for step, m in steps:
        if not bool(m["finite"]):
            last = ckpt.latest_step()
            ckpt.close()
            raise NonFiniteError(
                f"step {step}: the loss ({float(m['loss'])}) or the gradient norm "
                f"({float(m['grad_norm'])}) is not finite; stopped. The latest checkpoint "
                f"({'none' if last is None else f'step {last}'}) is intact. Lower "
                f"config.train.learning_rate, or set config.train.skip_nonfinite=True to skip "
                f"such updates."
            )


def load_checkpoint(workdir: str, *, step: int | None = None, device=None):
    """The config and train state saved in `workdir` (its latest checkpoint by default).

    The state is restored onto one device (`device`, default the first), whatever
    mesh trained it: orbax reads each array's shards into the new placement.

    Returns:
      (config, setup, state): the ConfigDict from workdir/config.json, its Setup,
      and the state {"step", "params", "opt_state"}; `nnx.merge(setup.trainer.graphdef,
      state["params"])` is the model.

    Raises:
      ValueError: if the workdir has no config.json or no checkpoint.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"workdir: no config.json in {workdir!r}; train there first")
    config = default_config()
    try:
        config.lock().update(_read_json(path))  # nested dicts merge; unknown keys raise
    except (KeyError, TypeError) as error:
        raise ValueError(f"workdir: {path} does not fit this version's config ({error})") from None
    one_device = config.copy_and_resolve_references()
    one_device.mesh.update({"data": 1, "model": 1})
    s = setup(one_device, [jax.devices()[0] if device is None else device])
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1 << 30)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ValueError(
            f"workdir: no complete checkpoint in {os.path.join(workdir, 'checkpoints')!r}"
        )
    abstract = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        s.abstract_state,
        s.state_shardings,
    )
    state = ckpt.restore(step, abstract)
    ckpt.close()
    return config, s, state


def _read_json(path: str) -> dict[str, Any]:
    """A workdir's config.json; plain JSON only (nothing in a workdir is unpickled)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"workdir: {path} is not a JSON config ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"workdir: {path} is not a JSON config (top level is not an object)")
    return data
