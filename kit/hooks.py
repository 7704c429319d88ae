"""Hook points: read a model's activations by name, or write them (ablation, patching).

The forward pass stays fixed; a `Hooks` value says which named activations to
return (`read`) and which to change (`write`). It is a pytree whose arrays are
leaves, so a jitted forward takes it as an argument and changing a written
value or an ablation's `where` does not recompile.

Every kit model names its points `<stack>.<layer>.<point>` ("encoder.0.resid_pre")
and, inside a block's attention, `<stack>.<layer>.<attn>.<point>` with `<attn>`
"attn" (self-attention) or "cross" (cross-attention to the encoder):

  resid_pre   `[B, T, D]`  the block's input (the residual stream before it)
  resid_mid   `[B, T, D]`  after the attentions' residual adds, before the feed-forward
  mlp_out     `[B, T, D]`  the feed-forward's output, before its residual add (if any)
  resid_post  `[B, T, D]`  the block's output (after the last residual add)
  attn.q      `[B, T, N, H]`  queries as attention reads them (after RoPE)
  attn.k, attn.v  `[B, S, K, H]`  keys and values (in decoding: the whole cache)
  attn.scores   `[B, N, T, S]`  float32 logits `q k / sqrt(H)` plus the positions'
                bias or score function, before the mask
  attn.weights  `[B, N, T, S]`  the softmax weights (before attention dropout)
  attn.heads    `[B, T, N, H]`  each head's output, before the output projection
                (TransformerLens's `z`); head ablation writes here
  attn.out      `[B, T, D]`  the attention's output, after the projection
  attn.bias     `[B, N, T, S]`  read only: the additive positional bias (ALiBi,
                T5: the score function on zero scores), where there is one

Reading or writing `scores` or `weights` runs that attention on the
materialized path; the other points leave the path the call would take. A
model's `hook_points()` lists its names; `read` takes shell-style patterns
("*.attn.weights"). The cache holds each point's value after any write to it:
what the forward went on with.

References:
  Nanda & Bloom, TransformerLens (2022): named hook points, `run_with_cache`
  and `run_with_hooks`; Meng et al., "Locating and Editing Factual Associations
  in GPT", 2022, and Heimersheim & Nanda, "How to use and interpret activation
  patching", 2024: activation patching.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

EDIT_OPS = ("replace", "add", "zero", "mean")
ATTENTION_POINTS = ("q", "k", "v", "bias", "scores", "weights", "heads", "out")
READ_ONLY = ("bias",)


@dataclasses.dataclass(frozen=True)
class Edit:
    """A write to one hook point.

    op:
      "replace": the activation becomes `value`;
      "add": `value` is added to it;
      "zero": it becomes 0;
      "mean": it becomes its mean over the batch (axis 0), per position.
    where: optional, broadcastable to the activation: 1 edits an entry, 0 keeps
      it, values between blend (x (1 - where) + new where). An all-zero `where`
      returns the activation bit for bit.
    """

    op: str
    value: Any = None
    where: Any = None

    def __post_init__(self):
        if self.op not in EDIT_OPS:
            raise ValueError(f"op: expected one of {EDIT_OPS}, got {self.op!r}")
        needs = self.op in ("replace", "add")
        if needs and self.value is None:
            raise ValueError(f"value: op {self.op!r} needs a value")
        if not needs and self.value is not None:
            raise ValueError(f"value: op {self.op!r} takes no value")

    def apply(self, x: Array, name: str = "edit") -> Array:
        """`x` with this edit made; errors name `name` (the hook point)."""
        if self.op == "zero":
            new = jnp.zeros_like(x)
        elif self.op == "mean":
            new = jnp.broadcast_to(jnp.mean(x, axis=0, keepdims=True), x.shape)
        else:
            value = jnp.asarray(self.value)
            _check_broadcast(f"{name}: value", value.shape, x.shape)
            new = value.astype(x.dtype)
            new = x + new if self.op == "add" else jnp.broadcast_to(new, x.shape)
        if self.where is None:
            return new
        where = jnp.asarray(self.where)
        _check_broadcast(f"{name}: where", where.shape, x.shape)
        if not (jnp.issubdtype(where.dtype, jnp.floating) or where.dtype == jnp.bool_):
            raise ValueError(f"{name}: where: expected bool or float values, got {where.dtype}")
        where = where.astype(x.dtype)
        return x * (1 - where) + new * where


def _check_broadcast(name: str, shape: tuple[int, ...], target: tuple[int, ...]) -> None:
    try:
        ok = np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: shape {tuple(shape)} does not broadcast to the point's {target}")


jax.tree_util.register_pytree_node(
    Edit,
    lambda e: ((e.value, e.where), e.op),
    lambda op, children: Edit(op, *children),
)


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Which hook points a forward pass returns (`read`) and changes (`write`).

    read: point names or shell-style patterns ("decoder.*.attn.weights"); the
      model returns their values in `aux["activations"]` (name -> array).
    write: point name -> `Edit`.
    """

    read: tuple[str, ...] = ()
    write: Mapping[str, Edit] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        read = (self.read,) if isinstance(self.read, str) else tuple(self.read)
        object.__setattr__(self, "read", read)
        if not isinstance(self.write, Mapping):
            raise ValueError(f"write: expected a dict {{point: Edit}}, got {type(self.write)}")
        for name, edit in self.write.items():
            if not isinstance(edit, Edit):
                raise ValueError(f"write[{name!r}]: expected an Edit, got {type(edit).__name__}")
        object.__setattr__(self, "write", dict(self.write))

    def check(self, points: Iterable[str]) -> None:
        """Raises ValueError naming a written point or read pattern that is not among
        `points` (a model's `hook_points()`), or a write to a read-only point."""
        points = list(points)
        for name in self.write:
            if name not in points:
                raise ValueError(f"hooks.write: unknown hook point {name!r}; {_some(points)}")
            if name.rsplit(".", 1)[-1] in READ_ONLY:
                raise ValueError(f"hooks.write: {name!r} is read only")
        for pattern in self.read:
            if not fnmatch.filter(points, pattern):
                raise ValueError(f"hooks.read: {pattern!r} matches no hook point; {_some(points)}")

    def without_reads(self) -> Hooks:
        return Hooks((), self.write)

    def __or__(self, other: Hooks) -> Hooks:
        """Both reads; both writes (the right one's where they name the same point)."""
        return Hooks(self.read + other.read, {**self.write, **other.write})


def _some(points: list[str]) -> str:
    return f"this model has {len(points)}, e.g. {points[:3] + points[-2:]}"


jax.tree_util.register_pytree_node(
    Hooks,
    lambda h: (tuple(h.write.values()), (h.read, tuple(h.write))),
    lambda aux, values: Hooks(aux[0], dict(zip(aux[1], values, strict=True))),
)


class Tap:
    """One forward pass's view of `Hooks` under a name prefix: `tap(point, x)` applies
    the write to `prefix + point`, caches the value if it is read, and returns it.
    The model calls it at each point; `scope` narrows the prefix for a sub-module."""

    def __init__(self, hooks: Hooks | None, prefix: str = "", cache: dict | None = None):
        self.hooks = hooks if hooks is not None else Hooks()
        self.prefix = prefix
        self.cache = {} if cache is None else cache

    def scope(self, *parts: Any) -> Tap:
        prefix = self.prefix + "".join(f"{p}." for p in parts)
        return Tap(self.hooks, prefix, self.cache)

    def touches(self, point: str) -> bool:
        """Whether `point` is read or written (so a caller computes it at all)."""
        name = self.prefix + point
        return name in self.hooks.write or any(
            fnmatch.fnmatchcase(name, p) for p in self.hooks.read
        )

    def __call__(self, point: str, x: Array) -> Array:
        name = self.prefix + point
        edit = self.hooks.write.get(name)
        if edit is not None:
            x = edit.apply(x, name)
        if any(fnmatch.fnmatchcase(name, p) for p in self.hooks.read):
            self.cache[name] = x
        return x


def hook_points(stacks: Mapping[str, tuple[int, bool]], *, feed_forward: bool = True) -> list[str]:
    """Every point of a model whose stacks are `{name: (layers, has cross-attention)}`,
    in the order the forward meets them (no mlp_out without a feed-forward)."""
    names = []
    for stack, (layers, cross) in stacks.items():
        for layer in range(layers):
            block = f"{stack}.{layer}."
            attns = ("attn", "cross") if cross else ("attn",)
            names.append(block + "resid_pre")
            names += [f"{block}{a}.{p}" for a in attns for p in ATTENTION_POINTS]
            names.append(block + "resid_mid")
            if feed_forward:
                names.append(block + "mlp_out")
            names.append(block + "resid_post")
    return names
