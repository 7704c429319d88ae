"""Testing what a head does: pattern scores, value-weighted norms, rollout, ablation masks.

Pure numpy functions over attention arrays `[L, N, T, S]` (one example) or
`[B, L, N, T, S]` (a leading batch axis), as `model.attention_sets` gives them.

Pattern scores (as TransformerLens's head detector, Nanda et al.): a pattern
P `[T, S]` marks the keys a head of some kind would attend to from each query
(previous token, an earlier copy of the same token, the token after an earlier
copy: induction, the first token: an attention sink). A head's score is the
attention mass it puts on the pattern, averaged over the query rows that have
a pattern entry. Attention weights alone do not show that a model *uses* a
head (Jain & Wallace, 2019); value-weighted norms (Kobayashi et al., 2020) and
ablation (`model.head_ablation(mask)` in every kit model, hooks on each head's
output; `ablation_mask` here builds the mask) test it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SCORES = ("previous_token", "duplicate_token", "induction", "first_token")
SCORE_MODES = ("mul", "abs")
HEAD_FUSIONS = ("mean", "max", "min")


def _weights(weights: Any, name: str = "weights") -> np.ndarray:
    """`[L, N, T, S]` or `[B, L, N, T, S]` -> float64 `[B, L, N, T, S]`."""
    w = np.asarray(weights)
    if w.ndim not in (4, 5):
        raise ValueError(f"{name}: expected [L, N, T, S] or [B, L, N, T, S], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point weights, got dtype {w.dtype}")
    return w.astype(np.float64).reshape((1,) * (5 - w.ndim) + w.shape)


def _tokens(tokens: Any, name: str) -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim not in (1, 2) or not (np.issubdtype(t.dtype, np.integer) or t.dtype.kind in "UO"):
        raise ValueError(f"{name}: expected token ids or strings [T] or [B, T], got {t.shape}")
    return t


def _keep(tokens: np.ndarray, ignore: Iterable[Any]) -> np.ndarray:
    ignore = list(ignore)
    return ~np.isin(tokens, ignore) if ignore else np.ones(tokens.shape, bool)


# --------------------------------------------------------------------------
# Patterns: bool [T, S] (or [B, T, S] for batched tokens).


def _pair(query_tokens: Any, key_tokens: Any | None, ignore: Iterable[Any]):
    q = _tokens(query_tokens, "query_tokens")
    k = q if key_tokens is None else _tokens(key_tokens, "key_tokens")
    if q.ndim != k.ndim or (q.ndim == 2 and q.shape[0] != k.shape[0]):
        raise ValueError(
            f"key_tokens: expected the batch layout of query_tokens {q.shape}, got {k.shape}"
        )
    ignore = list(ignore)
    live = _keep(q, ignore)[..., :, None] & _keep(k, ignore)[..., None, :]
    T, S = q.shape[-1], k.shape[-1]
    return q, k, live, np.arange(T)[:, None], np.arange(S)[None, :]


def previous_token_pattern(query_tokens, key_tokens=None, *, ignore=()) -> np.ndarray:
    """P[t, s] = (s == t - 1): the token just before the query."""
    _, _, live, t, s = _pair(query_tokens, key_tokens, ignore)
    return live & (s == t - 1)


def first_token_pattern(query_tokens, key_tokens=None, *, ignore=()) -> np.ndarray:
    """P[t, s] = (s == 0): the first token, where heads with nothing to do park
    their attention (an attention sink)."""
    _, _, live, _, s = _pair(query_tokens, key_tokens, ignore)
    return live & (s == 0)


def duplicate_token_pattern(query_tokens, key_tokens=None, *, ignore=()) -> np.ndarray:
    """P[t, s] = (key[s] == query[t]), for self-attention (no `key_tokens`) only
    earlier positions s < t: an earlier copy of the current token."""
    q, k, live, t, s = _pair(query_tokens, key_tokens, ignore)
    same = q[..., :, None] == k[..., None, :]
    return live & same & ((s < t) if key_tokens is None else True)


def induction_pattern(query_tokens, key_tokens=None, *, ignore=()) -> np.ndarray:
    """P[t, s] = (key[s - 1] == query[t]) for s >= 1: the token right after an
    earlier copy of the current token, the key an induction head attends to to
    predict that the sequence repeats (Olsson et al., 2022). For self-attention
    only s - 1 < t (a copy before the query)."""
    q, k, live, t, s = _pair(query_tokens, key_tokens, ignore)
    before = np.concatenate([k[..., :1], k[..., :-1]], axis=-1)  # before[s] = k[s - 1]
    after_copy = (q[..., :, None] == before[..., None, :]) & (s >= 1)
    return live & after_copy & ((s - 1 < t) if key_tokens is None else True)


_PATTERNS = {
    "previous_token": previous_token_pattern,
    "duplicate_token": duplicate_token_pattern,
    "induction": induction_pattern,
    "first_token": first_token_pattern,
}


# --------------------------------------------------------------------------
# Scores.


def pattern_score(
    weights: Any,
    pattern: Any,
    *,
    mode: str = "mul",
    exclude_first_token: bool = False,
    exclude_current_token: bool = False,
) -> np.ndarray:
    """How much each head attends along `pattern`: `[L, N]` scores in [0, 1].

    With A a head's attention and P the pattern (0/1, or weights in [0, 1]), on
    each query row t that has a pattern entry (sum_s P[t, s] > 0), after the
    excluded keys are removed from both (A[t, s] = P[t, s] = 0 for s = 0 with
    `exclude_first_token`, for s = t with `exclude_current_token`):

      "mul": m_t = sum_s A[t, s] P[t, s] / sum_s A[t, s]
             (the share of the row's remaining attention that lies on the pattern)
      "abs": m_t = 1 - 1/2 sum_s |A[t, s] / sum_s' A[t, s'] - P[t, s] / sum_s' P[t, s']|
             (one minus the mean absolute difference between the row and the
             pattern as distributions, i.e. their total-variation distance: 1 when
             the head attends exactly as the pattern says, 0 when it never does)

    and score = mean of m_t over those rows (of every example, with a batch).
    A row whose remaining attention is zero counts as m_t = 0. A head whose
    pattern has no row at all scores NaN.

    Args:
      weights: `[L, N, T, S]` or `[B, L, N, T, S]`.
      pattern: `[T, S]` (every example) or `[B, T, S]`, bool or in [0, 1].
      mode: "mul" or "abs".
      exclude_first_token: leave key 0 out of both.
      exclude_current_token: leave key t out of query t's row (needs T == S).

    Returns:
      float64 `[L, N]`.

    Raises:
      ValueError: naming `pattern` when it does not match `[T, S]` (or
        `[B, T, S]`) or holds values outside [0, 1], `mode` for an unknown mode,
        `exclude_current_token` for cross-attention (T != S).
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode: expected one of {SCORE_MODES}, got {mode!r}")
    w = _weights(weights)
    B, L, N, T, S = w.shape
    p = np.asarray(pattern)
    if p.shape not in ((T, S), (B, T, S)):
        raise ValueError(
            f"pattern: expected shape [T, S] = {(T, S)} or [B, T, S] = {(B, T, S)} to match "
            f"weights {w.shape}, got {p.shape}"
        )
    p = p.astype(np.float64)
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("pattern: expected bool or values in [0, 1]")
    p = np.broadcast_to(p, (B, T, S)).copy()
    keep = np.ones((T, S))
    if exclude_first_token:
        keep[:, 0] = 0
    if exclude_current_token:
        if T != S:
            raise ValueError(
                f"exclude_current_token: needs self-attention (T = S), got T={T}, S={S}"
            )
        np.fill_diagonal(keep, 0)
    a = w * keep
    p = p * keep
    rows = p.sum(-1) > 0  # [B, T]
    if not rows.any():
        return np.full((L, N), np.nan)
    mass = a.sum(-1)  # [B, L, N, T]
    p = p[:, None, None]  # [B, 1, 1, T, S]
    with np.errstate(invalid="ignore", divide="ignore"):
        if mode == "mul":
            per_row = np.where(mass > 0, (a * p).sum(-1) / mass, 0.0)
        else:
            a_dist = a / mass[..., None]
            p_dist = p / p.sum(-1, keepdims=True)
            tv = 0.5 * np.abs(a_dist - p_dist).sum(-1)
            per_row = np.where(mass > 0, 1.0 - tv, 0.0)
    per_row = np.where(rows[:, None, None, :], per_row, 0.0)
    return per_row.sum(axis=(0, 3)) / rows.sum()


def head_scores(
    weights: Any,
    query_tokens: Any,
    key_tokens: Any | None = None,
    *,
    ignore: Iterable[Any] = (),
    mode: str = "mul",
    exclude_first_token: bool = False,
    exclude_current_token: bool = False,
) -> dict[str, np.ndarray]:
    """The four standard scores (`SCORES`), each `[L, N]`, by `pattern_score`.

    Args:
      weights: `[L, N, T, S]` or `[B, L, N, T, S]`.
      query_tokens: `[T]` or `[B, T]` token ids (or strings).
      key_tokens: `[S]` / `[B, S]` for cross-attention; None for self-attention.
      ignore: token values that never take part in a pattern, as query or key
        (e.g. padding).
      mode: as in `pattern_score`.
      exclude_first_token: as in `pattern_score`; not applied to "first_token"
        (that would leave it empty).
      exclude_current_token: as in `pattern_score`; not applied to
        "first_token" (that would leave it empty).
    """
    out = {}
    for name, build in _PATTERNS.items():
        pattern = build(query_tokens, key_tokens, ignore=ignore)
        out[name] = pattern_score(
            weights,
            pattern,
            mode=mode,
            exclude_first_token=exclude_first_token and name != "first_token",
            exclude_current_token=exclude_current_token and name != "first_token",
        )
    return out


def value_weighted(weights: Any, value_norms: Any) -> np.ndarray:
    """||alpha_ts f(x_s)|| = alpha_ts ||f(x_s)|| (Kobayashi et al., 2020).

    f(x_s) is token s's value vector through the head's slice of the output
    projection, what the head actually adds to query t's output per unit of
    weight; a large weight on a token whose f(x_s) is small moves little.
    `model.attention_sets` gives ||f(x_s)|| as `["vectors"][set]["value_norms"]`
    `[B, L, N, S]`.

    Args:
      weights: `[..., N, T, S]`.
      value_norms: `[..., N, S]` with the same leading axes.

    Returns:
      float64 `[..., N, T, S]`.
    """
    w = np.asarray(weights, np.float64)
    v = np.asarray(value_norms, np.float64)
    if w.ndim < 3 or v.shape != w.shape[:-2] + w.shape[-1:]:
        raise ValueError(
            f"value_norms: expected shape {w.shape[:-2] + w.shape[-1:]} ([..., N, S]) for "
            f"weights {w.shape}, got {v.shape}"
        )
    return w * v[..., None, :]


def attention_rollout(
    weights: Any, *, head_fusion: str = "mean", residual: bool = True
) -> np.ndarray:
    """Attention rollout: how much each position draws on each input token.

    Heads are fused per layer (their mean, max or min; max and min rows are
    renormalized); with `residual`, the skip connection is modelled by mixing in
    the identity, and the layers are multiplied:

      Ā_l = fuse_n A_{l,n}
      Â_l = rownorm(0.5 * Ā_l + 0.5 * I)      (Â_l = Ā_l if not residual)
      R   = Â_L @ ... @ Â_2 @ Â_1

    R[i, j] is the share of token j of the input in position i after the last
    layer; with `residual`, every row of R sums to 1 (a fully masked query keeps
    to itself).

    Args:
      weights: self-attention `[L, N, T, T]` (one example) or `[B, L, N, T, T]`.
      head_fusion: "mean", "max" or "min".
      residual: model the residual connection, as in the paper.

    Returns:
      float64 `[T, T]`, or `[B, T, T]`.

    Raises:
      ValueError: naming `weights` if it is not rank 4 or 5 or its last two
        dimensions differ (rollout chains layers, so it needs self-attention),
        or `head_fusion`.

    References:
      Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS}, got {head_fusion!r}")
    w = np.asarray(weights)
    if w.ndim not in (4, 5):
        raise ValueError(
            f"weights: expected rank 4 [L, N, T, T] or 5 [B, L, N, T, T], "
            f"given rank {w.ndim} with shape {w.shape}"
        )
    if w.shape[-1] != w.shape[-2]:
        raise ValueError(
            f"weights: expected self-attention with T = S, given shape {w.shape} "
            f"(T={w.shape[-2]}, S={w.shape[-1]}); rollout does not apply to cross-attention"
        )
    batched = w.ndim == 5
    w = (w if batched else w[None]).astype(np.float64)  # [B, L, N, T, T]
    a = getattr(np, head_fusion)(w, axis=2)  # [B, L, T, T]
    if head_fusion != "mean":  # max / min rows no longer sum to 1
        a = a / np.maximum(a.sum(-1, keepdims=True), 1e-30)
    if residual:
        a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        # Rows of a fully masked query sum to 0.5, not 1: renormalizing keeps R stochastic.
        a = a / a.sum(axis=-1, keepdims=True)
    rollout = a[:, 0]
    for layer in range(1, a.shape[1]):
        rollout = a[:, layer] @ rollout
    return rollout if batched else rollout[0]


# --------------------------------------------------------------------------
# Ablation masks for the models' `head_ablation`.


def ablation_mask(
    shapes: Mapping[str, Sequence[int]],
    name: str,
    *,
    layer: int | None = None,
    head: int | None = None,
) -> dict[str, np.ndarray]:
    """A head mask for `model.head_ablation` (set -> float32 `[L, N]`, ones) with
    heads of set `name` at 0: one head (`layer` and `head`), a whole layer
    (`layer` only) or every head of the set (neither).

    Args:
      shapes: set -> (L, N), as `model.attention_shapes()` gives them.

    Raises:
      ValueError: naming `name`, `layer` or `head` when it is unknown or out of range.
    """
    if name not in shapes:
        raise ValueError(f"name: unknown attention set {name!r}; expected one of {sorted(shapes)}")
    L, N = shapes[name]
    if head is not None and layer is None:
        raise ValueError("layer: required when head is given")
    for arg, value, size in (("layer", layer, L), ("head", head, N)):
        if value is not None and (
            not isinstance(value, (int, np.integer))
            or isinstance(value, bool)
            or not 0 <= value < size
        ):
            raise ValueError(
                f"{arg}: expected an int in [0, {size}) for set {name!r}, got {value!r}"
            )
    masks = {n: np.ones(shape, np.float32) for n, shape in shapes.items()}
    if layer is None:
        masks[name][:] = 0
    elif head is None:
        masks[name][layer] = 0
    else:
        masks[name][layer, head] = 0
    return masks
