"""Activation patching and attribution patching over a model's hook points.

Run a clean and a corrupted input; copy one activation (a head's output at every
position, or the residual stream at one position) from the clean run into the
corrupted one; measure how much of the clean answer comes back. `patch` does it
for a batch of selections of one point at once (`jax.vmap` over the `where` of a
`kit.hooks.Edit`); `patch_heads` and `patch_positions` sweep every head and every
position of a list of points. `attribution_patching` approximates all of them
from one backward pass: the metric's gradient at the corrupted run times the
clean-minus-corrupted activation (Nanda, "Attribution Patching", 2023; Syed et
al., "Attribution Patching Outperforms Automated Circuit Discovery", 2023).

`forward(hooks) -> logits` is the corrupted run as a pure function of its hooks
(e.g. `lambda h: model(*corrupt_inputs, hooks=h)[0]`), and `metric(logits) -> `
a float scalar, e.g. `logit_difference`. The clean run's activations come from
`run_with_cache`. Clean and corrupted inputs must have the same shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kit.hooks import Edit, Hooks

Array = jax.Array
Forward = Callable[[Hooks], Array]
Metric = Callable[[Array], Array]


def run_with_cache(forward: Callable[..., tuple[Array, dict]], read: Sequence[str]):
    """`forward(hooks) -> (logits, aux)` run with `read` (point names or patterns):
    returns logits and the activations read (name -> array)."""
    logits, aux = forward(Hooks(read=tuple(read)))
    return logits, aux["activations"]


def logit_difference(position: int, right: int, wrong: int, example: int = 0) -> Metric:
    """The metric logits[example, position, right] - logits[example, position, wrong]
    (for per-position logits `[B, T, V]`)."""

    def metric(logits: Array) -> Array:
        row = logits[example, position].astype(jnp.float32)
        return row[right] - row[wrong]

    return metric


def patch(forward: Forward, metric: Metric, point: str, clean: Array, wheres: Array) -> np.ndarray:
    """The metric of the corrupted run with `point` replaced by the `clean` activation
    where each of `wheres` `[M, ...]` is 1 (each broadcastable to the point): `[M]`.
    One compiled program serves the M selections."""

    def one(where):
        return metric(forward(Hooks(write={point: Edit("replace", clean, where=where)})))

    return np.asarray(jax.jit(jax.vmap(one))(wheres))


def head_wheres(num_heads: int) -> Array:
    """One selection per head of a `heads` point `[B, T, N, H]`: `[N, 1, 1, N, 1]`."""
    return jnp.eye(num_heads, dtype=jnp.float32)[:, None, None, :, None]


def position_wheres(length: int) -> Array:
    """One selection per position of a `[B, T, D]` point: `[T, 1, T, 1]`."""
    return jnp.eye(length, dtype=jnp.float32)[:, None, :, None]


def patch_heads(
    forward: Forward, metric: Metric, cache: dict[str, Array], points: Sequence[str]
) -> np.ndarray:
    """Each head of each `heads` point in `points` patched alone from the clean
    `cache`: `[len(points), N]` metrics."""
    _check_cache(cache, points)
    return np.stack(
        [patch(forward, metric, p, cache[p], head_wheres(cache[p].shape[2])) for p in points]
    )


def patch_positions(
    forward: Forward, metric: Metric, cache: dict[str, Array], points: Sequence[str]
) -> np.ndarray:
    """Each position of each `[B, T, D]` point in `points` (e.g. "encoder.0.resid_pre")
    patched alone from the clean `cache`: `[len(points), T]` metrics."""
    _check_cache(cache, points)
    return np.stack(
        [patch(forward, metric, p, cache[p], position_wheres(cache[p].shape[1])) for p in points]
    )


def attribution_patching(
    forward: Forward,
    metric: Metric,
    clean: dict[str, Array],
    corrupt: dict[str, Array],
    points: Sequence[str],
    *,
    keep: int,
) -> np.ndarray:
    """The linear estimate of patching each point's entries along axis `keep`:
    sum over the other axes of d metric / d activation (at the corrupted run) times
    (clean - corrupt), for every point from one backward pass. `keep=2` on `heads`
    points gives `[len(points), N]` like `patch_heads`; `keep=1` on `[B, T, D]`
    points gives `[len(points), T]` like `patch_positions`."""
    _check_cache(clean, points)
    _check_cache(corrupt, points)
    zeros = {p: jnp.zeros_like(corrupt[p]) for p in points}

    def shifted(deltas):
        return metric(forward(Hooks(write={p: Edit("add", d) for p, d in deltas.items()})))

    grads = jax.jit(jax.grad(shifted))(zeros)
    rows = []
    for p in points:
        product = grads[p] * (clean[p] - corrupt[p]).astype(grads[p].dtype)
        other = tuple(a for a in range(product.ndim) if a != keep)
        rows.append(np.asarray(jnp.sum(product, axis=other)))
    return np.stack(rows)


def normalized(values: Any, clean: float, corrupt: float) -> np.ndarray:
    """(values - corrupt) / (clean - corrupt): 1 where the clean metric comes back
    whole, 0 where nothing does."""
    if clean == corrupt:
        raise ValueError(
            f"clean, corrupt: the two runs give the same metric ({clean}); patching "
            "between them measures nothing"
        )
    return (np.asarray(values) - corrupt) / (clean - corrupt)


def _check_cache(cache: dict[str, Array], points: Sequence[str]) -> None:
    missing = [p for p in points if p not in cache]
    if missing:
        raise ValueError(f"points: {missing} not in the cache (read them with run_with_cache)")


# --------------------------------------------------------------------------
# A clean and a corrupted text through a trained model.


@dataclasses.dataclass(frozen=True)
class TextPatching:
    """Patching one text into another, read at one position.

    Attributes:
      clean_tokens, corrupt_tokens: the T input tokens of each run.
      position: where the answer is read; right, wrong: the answer's token in
        the clean and the corrupted run; clean, corrupt: the logit difference
        right - wrong of each run.
      head_points, position_points: the patched points (rows below).
      heads, heads_attribution: normalized effect of patching each head's
        output `[L, N]` (1: the clean answer comes back whole), by activation
        patching and by attribution patching.
      positions, positions_attribution: the same for the residual stream
        before each layer at each position `[L, T]`.
    """

    clean_tokens: list[str]
    corrupt_tokens: list[str]
    position: int
    right: str
    wrong: str
    clean: float
    corrupt: float
    head_points: list[str]
    position_points: list[str]
    heads: np.ndarray
    heads_attribution: np.ndarray
    positions: np.ndarray
    positions_attribution: np.ndarray

    def correlation(self, which: str) -> float:
        """Pearson correlation of attribution with activation patching ("heads" or
        "positions")."""
        a = np.ravel(getattr(self, which))
        b = np.ravel(getattr(self, f"{which}_attribution"))
        return float(np.corrcoef(a, b)[0, 1])

    def summary(self) -> str:
        """The answer, each head's share brought back (attribution's estimate in
        brackets), the strongest residual position and the correlations, as text."""
        lines = [
            f"answer at position {self.position}: {self.right!r} (clean) vs {self.wrong!r} "
            f"(corrupted); logit difference {self.clean:.3f} clean, {self.corrupt:.3f} corrupted",
            "share of it patching each head's output brings back (attribution estimate):",
        ]
        for point, row, guess in zip(
            self.head_points, self.heads, self.heads_attribution, strict=True
        ):
            cells = "  ".join(f"{v:+.2f} ({g:+.2f})" for v, g in zip(row, guess, strict=True))
            lines.append(f"  {point:<24} {cells}")
        best = np.unravel_index(np.argmax(self.positions), self.positions.shape)
        lines.append(
            f"strongest residual position: {self.position_points[best[0]]} at "
            f"{best[1]} ({self.clean_tokens[best[1]]!r}): {self.positions[best]:+.2f}"
        )
        lines.append(
            f"attribution vs activation patching, correlation: heads "
            f"{self.correlation('heads'):.3f}, positions {self.correlation('positions'):.3f}"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}
        out["correlation"] = {w: self.correlation(w) for w in ("heads", "positions")}
        return out


def patch_text(
    model: Any,
    task: Any,
    clean: str,
    corrupt: str,
    position: int | None = None,
    answers: tuple[str, str] | None = None,
):
    """Activation and attribution patching from text `clean` into text `corrupt` (same
    number of tokens) in `model`, a kind with per-position logits
    (`model.text_logits`), read at `position` (default: the last position where
    the two runs predict different tokens) as the logit difference between
    `answers` (right, wrong; default: each run's prediction there; with `answers` and
    no `position`, the last position, where a prompt's next token is predicted).
    Returns a `TextPatching`.

    Raises:
      ValueError: naming `corrupt` for a token count other than `clean`'s,
        `position` out of range or (without `answers`) where both runs predict
        the same, `answers` for tokens outside the vocabulary, and `clean` and
        `corrupt` when the runs predict the same everywhere.
    """
    ids_clean, ids_corrupt = task.encode(clean), task.encode(corrupt)
    if len(ids_clean) != len(ids_corrupt):
        raise ValueError(
            f"corrupt: {len(ids_corrupt)} tokens, but clean has {len(ids_clean)}; "
            "patching pairs the two runs position by position"
        )

    points = [p for p in model.hook_points() if p.endswith((".attn.heads", ".resid_pre"))]
    read = Hooks(read=tuple(points))
    c_logits, c_aux, tokens = model.text_logits(task, ids_clean, read)
    r_logits, r_aux, corrupt_tokens = model.text_logits(task, ids_corrupt, read)
    c_cache, r_cache = c_aux["activations"], r_aux["activations"]
    position = _answer_position(c_logits[0], r_logits[0], position, len(tokens), answers)
    if answers is None:
        right = int(jnp.argmax(c_logits[0, position]))
        wrong = int(jnp.argmax(r_logits[0, position]))
    else:
        right, wrong = _answer_ids(task, answers)
    metric = logit_difference(position, right, wrong)
    m_clean, m_corrupt = float(metric(c_logits)), float(metric(r_logits))

    def forward(hooks):  # the corrupted run's logits, under `hooks`
        return model.text_logits(task, ids_corrupt, hooks)[0]

    heads = [p for p in points if p.endswith(".heads")]
    resid = [p for p in points if p.endswith(".resid_pre")]

    def both(sweep, chosen, keep):
        found = normalized(sweep(forward, metric, c_cache, chosen), m_clean, m_corrupt)
        guess = attribution_patching(forward, metric, c_cache, r_cache, chosen, keep=keep)
        return found, guess / (m_clean - m_corrupt)

    head_effect, head_guess = both(patch_heads, heads, 2)
    pos_effect, pos_guess = both(patch_positions, resid, 1)
    return TextPatching(
        clean_tokens=tokens,
        corrupt_tokens=corrupt_tokens,
        position=position,
        right=task.vocab[right],
        wrong=task.vocab[wrong],
        clean=m_clean,
        corrupt=m_corrupt,
        head_points=heads,
        position_points=resid,
        heads=head_effect,
        heads_attribution=head_guess,
        positions=pos_effect,
        positions_attribution=pos_guess,
    )


def _answer_ids(task: Any, answers: Any) -> tuple[int, int]:
    if not isinstance(answers, tuple | list) or len(answers) != 2:
        raise ValueError(f"answers: expected (right, wrong) tokens, got {answers!r}")
    if hasattr(task, "token_id"):  # a pretrained model's tokenizer (kit.hf.TokenizerTask)
        return task.token_id(answers[0], "answers"), task.token_id(answers[1], "answers")
    unknown = [a for a in answers if a not in task.vocab]
    if unknown:
        raise ValueError(f"answers: {unknown} not in the {task.name} vocabulary")
    return task.vocab.index(answers[0]), task.vocab.index(answers[1])


def _answer_position(clean, corrupt, position, length: int, answers) -> int:
    differ = np.flatnonzero(np.asarray(jnp.argmax(clean, -1) != jnp.argmax(corrupt, -1)))
    if position is None and answers is not None:  # named answers: the next token's
        return length - 1
    if position is None:
        if not len(differ):
            raise ValueError(
                "clean, corrupt: the model predicts the same token at every position of "
                "both texts; there is no answer to patch back"
            )
        return int(differ[-1])
    if not isinstance(position, int) or not 0 <= position < length:
        raise ValueError(f"position: expected an int in [0, {length}), got {position!r}")
    if answers is None and position not in differ:
        raise ValueError(
            f"position: both runs predict the same token at {position}; positions where "
            f"they differ: {differ.tolist()}"
        )
    return position
