"""Dates: a human-readable date (13 styles) -> its ISO form. Held-out sets use only
dates that training never samples (one in ten, by a fixed hash of the day), so no
source string is shared."""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np

from kit.tasks.base import SPECIALS, Options, Task

DATE_CHARS = " ,-./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_DATE = datetime.date(1950, 1, 1).toordinal()
LAST_DATE = datetime.date(2049, 12, 31).toordinal()


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def format_date(date: datetime.date, style: int) -> str:
    """One of the human-readable styles (0..len(DATE_STYLES)-1)."""
    d, m, y = date.day, date.month, date.year
    month, weekday = MONTHS[m - 1], DAYS[date.weekday()]
    styles = (
        f"{_ordinal(d)} of {month} {y}",
        f"{month[:3]} {d}, {y}",
        f"{d:02d}.{m:02d}.{y % 100:02d}",
        f"{weekday}, {month} {d}, {y}",
        f"{month} {d}, {y}",
        f"{d} {month} {y}",
        f"{m:02d}/{d:02d}/{y}",
        f"{d} {month[:3]} {y % 100:02d}",
        f"{weekday.lower()} {d} {month.lower()} {y}",
        f"{d}.{m}.{y}",
        f"{weekday[:3]}, {d} {month[:3]} {y}",
        f"{month.upper()} {d}, {y}",
        f"the {_ordinal(d)} of {month.lower()}, {y}",
    )
    return styles[style]


NUM_DATE_STYLES = 13


def _is_eval_date(ordinal: np.ndarray) -> np.ndarray:
    # A fixed hash of the day: one date in ten is held out, never trained on.
    return (ordinal.astype(np.uint64) * np.uint64(2654435761) % np.uint64(2**32)) % 10 == 0


def _sample_dates(rng: np.random.Generator, n: int, held_out: bool) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        ordinals = rng.integers(FIRST_DATE, LAST_DATE + 1, size=2 * n)
        styles = rng.integers(0, NUM_DATE_STYLES, size=2 * n)
        keep = _is_eval_date(ordinals) == held_out
        for o, s in zip(ordinals[keep], styles[keep], strict=True):
            date = datetime.date.fromordinal(int(o))
            out.append((format_date(date, int(s)), date.isoformat()))
    return out[:n]


@dataclasses.dataclass(frozen=True)
class DatesTask(Task):
    def examples(self, rng, n, held_out):
        pairs = _sample_dates(rng, n, held_out)
        return [self.encode(s) for s, _ in pairs], [self.encode(t) for _, t in pairs]


def dates_task(o: Options) -> Task:
    del o  # no options
    return DatesTask("dates", SPECIALS + tuple(DATE_CHARS), 32, 10)
