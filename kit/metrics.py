"""Metrics as JSON lines: one object per logged step or evaluation.

A value is a number, or an object of numbers (e.g. exact match per target length).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricWriter:
    """Appends `{"step": ..., name: value}` lines to a JSONL file.

    On resume from `resume_step`, lines written after that step by the
    interrupted run are dropped first, so the file matches an uninterrupted run.
    """

    def __init__(self, path: str, *, resume_step: int | None = None, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            open(path, "w").close()
            return
        kept = [line for line in read_metrics(path) if line["step"] <= resume_step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in kept)
        os.replace(path + ".tmp", path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"step": int(step)}
        for name, value in metrics.items():
            line[name] = (
                {str(k): _number(v) for k, v in value.items()}
                if isinstance(value, dict)
                else _number(value)
            )
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _number(value: Any) -> float | str:
    """A finite float, or its name ("nan", "inf") for JSON."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All complete lines of a metrics file ([] if it does not exist)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a line cut by a crash is not a record
                out.append(json.loads(line))
    return out
