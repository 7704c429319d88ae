"""The experiment config: every key with its default, and the start-up checks.

configs/<name>.py start from `default_config()` and set only what differs;
`tiny(config)` shrinks any of them to the size the tests run. Every check names
its field (`config.train.steps: ...`) and runs before anything is compiled or
written; the checks write `train.steps: ...` and `in_config_terms` adds "config."
in one place.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import ml_collections

from kit import models, tasks
from kit.attention import context

P = ParamSpec("P")
R = TypeVar("R")


def default_config() -> ml_collections.ConfigDict:
    """The full set of keys with defaults (configs/*.py start from this)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = ml_collections.ConfigDict(
        {
            "name": "copy",
            "length": 16,
            "num_symbols": 10,
            "eval_size": 1000,
            "augment": True,
            "split": "simple",
            # True: train on the split's training part less a validation part drawn
            # from it, and evaluate on that part, never the test split
            # (kit.scan.scan_split's `validation`); for choosing hyperparameters.
            "validation": False,
            # Pack several examples into each training row (kit.models.packing):
            # batch_size / pack_span rows that hold about pack_span examples each;
            # evaluation is unchanged. For encoder_decoder and encoder_only.
            "pack": False,
            "pack_span": 4,
        }
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
            # > 0: randomized positions (Ruoss et al., 2023) for "sinusoidal" or
            # "learned": each call reads its positions through a sorted random draw
            # from range(random_positions), at least max_len (kit.models.text.Embedder).
            "random_positions": 0,
            "patch_size": 2,
            # False: attention-only blocks (no feed-forward), as in configs/induction.py
            "feed_forward": True,
            # True: one block applied num_layers times per stack (a Universal Transformer)
            "share_layers": False,
            # The computation's dtype: "float32" or "bfloat16" (mixed precision: the
            # parameters, optimizer state and checkpoints stay float32; the softmax and
            # the loss run in float32).
            "dtype": "float32",
            # With mesh.seq > 1 (context parallelism): how attention meets the split
            # sequence, "all_gather" (keys and values gathered, queries stay split) or
            # "ring" (kit.attention.context), and whether causal sequences are laid out
            # in the zig-zag order so that every device has the same work.
            "context_strategy": "all_gather",
            "context_balance": True,
            # The ring's key/value heads in this many groups, one after another: less
            # in flight per device for more rounds of messages (must divide the heads).
            "context_head_groups": 1,
        }
    )
    config.train = ml_collections.ConfigDict(
        {
            "steps": 1000,
            "batch_size": 128,
            "learning_rate": 3e-3,
            "warmup_steps": 50,
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
    # Device mesh ("data", "seq", "model"); -1 fills the remaining devices. seq > 1
    # splits every sequence over devices (context parallelism). See kit/sharding.py.
    config.mesh = ml_collections.ConfigDict({"data": -1, "seq": 1, "model": 1})
    return config


# What `tiny` sets: seconds to compile and run on one CPU device, for tests.
TINY = {
    "task.length": 5,
    "task.num_symbols": 6,
    "task.eval_size": 12,
    "model.d_model": 16,
    "model.num_heads": 2,
    "model.num_layers": 1,
    "model.num_decoder_layers": 1,
    "model.d_ff": 32,
    "model.max_len": 64,
    "train.steps": 4,
    "train.batch_size": 8,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "train.eval_batch_size": 8,
    "mesh.data": 1,
    "mesh.seq": 1,
    "mesh.model": 1,
}


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` shrunk to the tests' size (`TINY`); task and model kind are kept."""
    config.update_from_flattened_dict(TINY)
    return config


VARIANTS = ("tiny",)


def variant(config: ml_collections.ConfigDict, name: str | None) -> ml_collections.ConfigDict:
    """A config file's variant: `--config=configs/copy.py:tiny` passes "tiny" here.

    Raises:
      ValueError: for a variant other than None or one of VARIANTS.
    """
    if name is None:
        return config
    if name not in VARIANTS:
        raise ValueError(f"config variant: expected one of {VARIANTS} after ':', got {name!r}")
    return tiny(config)


def from_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(variant)` of the config file at `path` (as --config=path:variant)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def get(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def positive_int(config: ml_collections.ConfigDict, path: str) -> int:
    value = get(config, path)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{path}: expected a positive int, got {value!r}")
    return value


def number(
    config: ml_collections.ConfigDict,
    path: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """A finite real number in the interval; raises ValueError naming <path>."""
    value = get(config, path)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{path}: expected a finite number in {interval}, got {value!r}")
    return float(value)


# The computation dtypes a model trains in (config.model.dtype).
COMPUTE_DTYPES = models.COMPUTE_DTYPES


def _check_dtype(dtype: str) -> None:
    """model.dtype: a computation dtype the kit trains in.

    Raises:
      ValueError: naming model.dtype (for float16: why it is refused).
    """
    if dtype == "float16":
        raise ValueError(
            "model.dtype: float16 trains only with loss scaling (its range, up to "
            "65504, lets gradients overflow and underflow), which the kit does not do; use "
            "'bfloat16', which has float32's range in the same memory"
        )
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype: expected one of {COMPUTE_DTYPES}, got {dtype!r}")


def _check_random_positions(m: ml_collections.ConfigDict) -> None:
    r = m.random_positions
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"model.random_positions: expected an int >= 0, got {r!r}")
    if r and m.positions not in ("sinusoidal", "learned"):
        raise ValueError(
            "model.random_positions: randomizes the absolute positions "
            f"('sinusoidal' or 'learned'), got model.positions={m.positions!r}"
        )
    if r and r < m.max_len:
        raise ValueError(
            f"model.random_positions: draws model.max_len = {m.max_len} positions "
            f"without replacement, so it must be at least that, got {r}"
        )


def in_config_terms(check: Callable[P, R]) -> Callable[P, R]:
    """The one place "config." is added: the library's checks name a field as
    `<section>.<field>` (`task.length`, `model.patch_size`); a config check's error
    names it `config.<section>.<field>`, as it is written on the command line."""

    @functools.wraps(check)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return check(*args, **kwargs)
        except ValueError as error:
            raise ValueError(f"config.{error}") from None

    return checked


@in_config_terms
def model_config(config: ml_collections.ConfigDict, task: tasks.Task) -> models.ModelConfig:
    """Validates `config.model` against the task and builds the frozen ModelConfig."""
    m = config.model
    if m.kind not in models.KINDS:
        raise ValueError(f"model.kind: expected one of {models.KINDS}, got {m.kind!r}")
    if m.positions not in models.POSITIONS:
        raise ValueError(
            f"model.positions: expected one of {models.POSITIONS}, got {m.positions!r}"
        )
    for name in (
        "d_model",
        "num_heads",
        "num_layers",
        "num_decoder_layers",
        "d_ff",
        "max_len",
        "patch_size",
    ):
        positive_int(config, f"model.{name}")
    if m.d_model % m.num_heads:
        raise ValueError(
            f"model.d_model: must be divisible by model.num_heads = {m.num_heads}, got {m.d_model}"
        )
    kv = m.num_kv_heads
    if kv is not None and (not isinstance(kv, int) or kv <= 0 or m.num_heads % kv):
        raise ValueError(
            f"model.num_kv_heads: must be a positive divisor of model.num_heads = "
            f"{m.num_heads}, got {kv!r}"
        )
    number(config, "model.dropout_rate", 0.0, 1.0)
    _check_dtype(m.dtype)
    if m.context_strategy not in context.STRATEGIES:
        raise ValueError(
            f"model.context_strategy: expected one of {context.STRATEGIES}, "
            f"got {m.context_strategy!r}"
        )
    groups = m.context_head_groups
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"model.context_head_groups: expected a positive int, got {groups!r}")
    if (kv or m.num_heads) % groups:
        raise ValueError(
            f"model.context_head_groups: {groups} does not divide the key/value heads "
            f"({kv or m.num_heads})"
        )
    for name in ("feed_forward", "share_layers", "context_balance"):
        if not isinstance(m[name], bool):
            raise ValueError(f"model.{name}: expected a bool, got {m[name]!r}")
    if m.positions == "rope" and (m.d_model // m.num_heads) % 2:
        raise ValueError("model.positions: 'rope' needs an even head dim d_model / num_heads")
    if m.positions == "sinusoidal" and m.d_model % 2:
        raise ValueError(f"model.d_model: sinusoidal positions need it even, got {m.d_model}")
    _check_random_positions(m)
    kind = models.MODELS[m.kind]
    kind.check(m, task)
    needed = kind.positions_needed(task)
    if m.max_len < needed:
        raise ValueError(
            f"model.max_len: the {m.kind} model needs positions up to {needed} "
            f"for task {task.name!r}, got {m.max_len}"
        )
    return models.ModelConfig(
        kind=m.kind,
        vocab_size=task.vocab_size,
        d_model=m.d_model,
        num_heads=m.num_heads,
        num_kv_heads=kv,
        num_layers=m.num_layers,
        num_decoder_layers=m.num_decoder_layers,
        d_ff=m.d_ff,
        max_len=m.max_len,
        dropout_rate=float(m.dropout_rate),
        positions=m.positions,
        random_positions=m.random_positions,
        patch_size=m.patch_size,
        image_size=task.image_size,
        feed_forward=m.feed_forward,
        share_layers=m.share_layers,
        dtype=m.dtype,
    )


_POSITIVE_TRAIN_FIELDS = (
    "steps",
    "batch_size",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_batch_size",
)


def _check_packing(config: ml_collections.ConfigDict, task: tasks.Task) -> None:
    pack = config.task.get("pack", False)
    if not isinstance(pack, bool):
        raise ValueError(f"task.pack: expected a bool, got {pack!r}")
    positive_int(config, "task.pack_span")
    if not pack:
        return
    kind = config.model.kind
    if task.image_size or kind not in models.MODELS or models.MODELS[kind].PACKED is None:
        raise ValueError(
            f"task.pack: packs token examples for encoder_decoder or encoder_only "
            f"models, not model.kind={kind!r} on task {task.name!r}"
        )
    span, batch = config.task.pack_span, config.train.batch_size
    if not isinstance(batch, int) or batch % span:
        raise ValueError(
            f"task.pack_span: must divide train.batch_size = {batch} (the packed "
            f"batch has batch_size / pack_span rows), got {span}"
        )


@in_config_terms
def check_config(config: ml_collections.ConfigDict) -> tuple[tasks.Task, models.ModelConfig]:
    """All start-up checks; returns the task and the model config.

    Raises:
      ValueError: naming the first invalid field, `config.<section>.<field>`.
    """
    seed = config.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"seed: expected an int in [0, 2**31), got {seed!r}")
    task = tasks.make_task(
        config.task.name,
        length=config.task.length,
        num_symbols=config.task.num_symbols,
        augment=config.task.augment,
        split=config.task.split,
        validation=config.task.validation,
    )
    positive_int(config, "task.eval_size")
    _check_packing(config, task)
    for name in _POSITIVE_TRAIN_FIELDS:
        positive_int(config, f"train.{name}")
    t = config.train
    number(config, "train.learning_rate", 0.0, math.inf, low_open=True)
    if (
        not isinstance(t.warmup_steps, int)
        or isinstance(t.warmup_steps, bool)
        or t.warmup_steps < 0
    ):
        raise ValueError(f"train.warmup_steps: expected an int >= 0, got {t.warmup_steps!r}")
    number(config, "train.label_smoothing", 0.0, 1.0)
    number(config, "train.grad_clip", 0.0, math.inf, low_open=True)
    number(config, "train.weight_decay", 0.0, math.inf)
    if not isinstance(t.skip_nonfinite, bool):
        raise ValueError(f"train.skip_nonfinite: expected a bool, got {t.skip_nonfinite!r}")
    return task, model_config.__wrapped__(config, task)
