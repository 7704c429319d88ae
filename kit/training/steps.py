"""The pure parts of training: loss, optimizer, train and eval steps, evaluation.

The train state is a pytree `{"step", "params", "opt_state"}`; `Trainer.train_step`
is a pure function of (state, batch, rng), jit-compiled once, with dropout keys
`fold_in(rng, step)`. A model kind is read only through its `batch`,
`teacher_forced` and `predict` (kit.models).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from kit import models, tasks
from kit.models import packing

Array = jax.Array


def check_kind(kind: Any) -> type[models.TaskModel]:
    """`kind` if it is a model kind's class; raises ValueError naming `kind` otherwise
    (for a kind's name, saying where its class is)."""
    if isinstance(kind, type) and issubclass(kind, models.TaskModel):
        return kind
    named = isinstance(kind, str) and kind in models.MODELS
    hint = f"models.MODELS[{kind!r}] or a Setup's .kind" if named else "one"
    raise ValueError(f"kind: expected a model kind's class ({hint}), got {kind!r}")


def model_batch(kind: type[models.TaskModel], batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Task arrays -> what a model of `kind` (its class) reads, with targets and loss weights."""
    return check_kind(kind).batch(batch)


def train_model_batch(
    task, kind: type[models.TaskModel], seed: int, step: int, batch_size: int, span: int = 0
):
    """Training batch `step` as the model reads it; with `span`, packed
    (`kit.models.packing`): 2 * batch_size examples drawn and packed in order, as
    many as fit, into batch_size / span rows that hold about `span` examples each
    (`pack_widths`), so about batch_size examples per step either way."""
    if not span:
        return model_batch(kind, task.train_batch(seed, step, batch_size))
    examples = model_batch(kind, task.train_batch(seed, step, 2 * batch_size))
    widths = pack_widths(task, kind, seed, span)
    return kind.pack(examples, batch_size // span, widths)


@functools.cache
def pack_widths(task, kind: type[models.TaskModel], seed: int, span: int) -> tuple[int, ...]:
    """The packed rows' widths of a run: from the mean lengths of 4,096 examples
    drawn once (the same for every step, so the train step compiles once)."""
    sample = model_batch(kind, task.train_batch(seed, 0, 4096))
    return packing.row_widths(sample, kind.PACKED, span)


def token_losses(logits: Array, targets: Array, label_smoothing: float = 0.0) -> Array:
    """Cross-entropy (optionally label-smoothed) per target token `[B, T]`."""
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def loss_fn(logits: Array, targets: Array, weights: Array, label_smoothing: float = 0.0):
    """Weighted mean cross-entropy (optionally label-smoothed) and token accuracy."""
    losses = token_losses(logits, targets, label_smoothing)
    w = weights.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(w), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * w) / total, jnp.sum(correct * w) / total


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The static parts of training: model graph, optimizer, options. Steps are pure."""

    graphdef: Any
    tx: optax.GradientTransformation
    label_smoothing: float
    dropout: bool
    # Evaluation also decodes to each row's true length with end-of-sequence
    # forbidden (an encoder-decoder on SCAN's length splits): eval/exact_match_oracle_length.
    oracle_length: bool = False
    # Context parallelism: training's sequences split over devices
    # (`kit.attention.context.SequenceSplit`), or None. Evaluation runs whole sequences.
    split: Any = None

    def init_state(self, params: Any) -> dict[str, Any]:
        return {"step": jnp.int32(0), "params": params, "opt_state": self.tx.init(params)}

    def train_step(self, state: dict[str, Any], mb: dict[str, Array], rng: Array):
        """One optimizer update: (state, batch, rng) -> (new state, metrics)."""
        dropout_rng = jax.random.fold_in(rng, state["step"]) if self.dropout else None

        def objective(params):
            model = nnx.merge(self.graphdef, params)
            if self.split is None:
                batch = mb
                logits, _ = model.teacher_forced(mb, dropout_rng=dropout_rng)
            else:  # the loss is a mean over tokens: any order of them gives it
                batch = type(model).split_batch(mb, self.split)
                logits, _ = model.teacher_forced(batch, dropout_rng=dropout_rng, split=self.split)
            return loss_fn(logits, batch["targets"], batch["weights"], self.label_smoothing)

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

    def eval_step(self, params: Any, mb: dict[str, Array], hooks: Any = None) -> dict[str, Array]:
        """Sums over one eval batch: loss, correct tokens, tokens, exact sequences; per
        row, whether it was exact, how many target tokens it weighs and its loss per
        target token (0 where unweighted). `hooks`' writes (`kit.hooks.Hooks`, e.g.
        `model.head_ablation(...)`) apply in both the teacher-forced and the
        predicting pass."""
        model = nnx.merge(self.graphdef, params)
        ablation = {"hooks": None if hooks is None else hooks.without_reads()}
        logits, _ = model.teacher_forced(mb, **ablation)
        w = mb["weights"]
        wf = w.astype(jnp.float32)
        losses = token_losses(logits, mb["targets"]) * wf
        prediction = model.predict(mb, **ablation)
        hit = prediction == mb["targets"]
        tokens = jnp.sum(wf)
        exact_rows = jnp.all(hit | ~w, axis=1)
        extra = {}
        if self.oracle_length:  # the target's tokens only: the EOS position is not asked
            body = w & (jnp.arange(w.shape[1])[None, :] < jnp.sum(w, axis=1, keepdims=True) - 1)
            oracle = model.predict(mb, oracle_length=True, **ablation) == mb["targets"]
            extra["exact_oracle"] = jnp.sum(jnp.all(oracle | ~body, axis=1).astype(jnp.float32))
        return {
            **extra,
            "loss_sum": jnp.sum(losses),
            "correct": jnp.sum((hit & w).astype(jnp.float32)),
            "tokens": tokens,
            "exact": jnp.sum(exact_rows.astype(jnp.float32)),
            "sequences": jnp.float32(prediction.shape[0]),
            "rows": {
                "exact": exact_rows,
                "tokens": jnp.sum(w, axis=1, dtype=jnp.int32),
                "losses": losses,
            },
        }


def init_model(mcfg: models.ModelConfig, rng: Array, shardings: Any = None) -> tuple[Any, Any]:
    """(graphdef, params) of a fresh model; initialized under jit (one compile, not one per op).

    `shardings` (a pytree of shardings like the params) places each parameter
    directly where it lives: no process ever holds a full copy first.
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.build(mcfg, rng)))
    init = jax.jit(lambda r: nnx.split(models.build(mcfg, r))[1], out_shardings=shardings)
    return graphdef, init(rng)


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


def evaluate(
    eval_step,
    params: Any,
    batches: list[tuple[dict, int]],
    kind: type[models.TaskModel],
    *,
    by_length: bool = False,
    loss_spans: tuple[tasks.LossSpan, ...] = (),
    groups: dict[str, np.ndarray] | None = None,
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """eval/loss, eval/token_accuracy and eval/exact_match over the held-out batches,
    and what the model kind adds (`eval_metrics`).

    With `by_length` (tasks whose targets end in EOS), also
    eval/exact_match_by_length: target length (the tokens weighed, less the end
    token) -> exact match of the rows of that length. Each of `loss_spans`
    (kit.tasks.LossSpan) adds eval/loss_<name>, the mean loss over that part of
    every row's target. Each of `groups` (name -> bool per held-out row,
    `Task.eval_groups`) adds eval/exact_match_<name> and eval/count_<name>.
    `eval_kwargs` go to `eval_step` (e.g. hooks).
    """
    kind = check_kind(kind)
    totals: dict[str, float] = {}
    exact, lengths, losses = [], [], []
    for mb, pad in batches:
        out = jax.device_get(eval_step(params, mb, **eval_kwargs))
        rows = out.pop("rows")
        for name, value in out.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        # A padding row has no weighted token, so it counted as one exact sequence.
        totals["sequences"] -= pad
        totals["exact"] -= pad
        if "exact_oracle" in totals:
            totals["exact_oracle"] -= pad
        keep = len(rows["exact"]) - pad
        exact.append(rows["exact"][:keep])
        lengths.append(rows["tokens"][:keep] - 1)
        losses.append(rows["losses"][:keep])
    result = {
        "eval/loss": totals["loss_sum"] / totals["tokens"],
        "eval/token_accuracy": totals["correct"] / totals["tokens"],
        "eval/exact_match": totals["exact"] / totals["sequences"],
    }
    lengths = np.concatenate(lengths)
    if loss_spans:
        losses = np.concatenate(losses)
        for span in loss_spans:
            mask = span.mask(lengths, losses.shape[1])
            result[f"eval/loss_{span.name}"] = float(losses[mask].mean()) if mask.any() else 0.0
    if "exact_oracle" in totals:
        result["eval/exact_match_oracle_length"] = totals["exact_oracle"] / totals["sequences"]
    exact = np.concatenate(exact)
    for name, rows in (groups or {}).items():
        result[f"eval/exact_match_{name}"] = float(np.mean(exact[rows])) if rows.any() else 0.0
        result[f"eval/count_{name}"] = int(np.sum(rows))
    if by_length:
        result["eval/exact_match_by_length"] = {
            str(n): float(np.mean(exact[lengths == n])) for n in np.unique(lengths)
        }
    return kind.eval_metrics(result)


def eval_batches(
    task: tasks.Task, kind: type[models.TaskModel], config, multiple: int = 1
) -> list[tuple[dict, int]]:
    """The held-out set as (model batch, number of padding rows), all of one shape.

    The batch size is rounded up to a multiple of `multiple` (the mesh's data axis).
    """
    data = task.eval_set(config.seed, config.task.eval_size)
    total = len(next(iter(data.values())))  # eval_size, or an image task's whole split
    size = min(config.train.eval_batch_size, total)
    size = -(-size // multiple) * multiple
    out = []
    for start in range(0, total, size):
        mb = model_batch(kind, {k: v[start : start + size] for k, v in data.items()})
        pad = size - len(mb["targets"])
        if pad:  # one shape, one compile; padding rows weigh nothing
            mb = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in mb.items()}
            mb["weights"][-pad:] = False
        out.append((mb, pad))
    return out
