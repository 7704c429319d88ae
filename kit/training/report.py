"""What a training run tells the person watching it: a header, progress, evaluations.

Library code never prints on its own: `train_and_evaluate` reports through a
`Console`, whose style the caller picks. "bar" draws a rich progress bar (for
a terminal), "lines" prints a plain line per log step (for CI logs and pipes),
"quiet" only the header and the evaluations, "off" nothing. rich is imported
only for the bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from absl import logging

STYLES = ("bar", "lines", "quiet", "off")


def quiet_library_logs(verbosity: int) -> None:
    """Below verbosity 1, absl, orbax and jax log warnings and errors only (their INFO
    lines would bury a command's own output); from 1 on, absl's level stands."""
    if verbosity < 1:
        logging.set_verbosity(logging.WARNING)


def _format_metrics(values: dict[str, Any]) -> str:
    """The numbers of a result; a per-length breakdown stays in metrics.jsonl."""
    return "  ".join(
        f"{name} {value}" if isinstance(value, int) else f"{name} {value:.4f}"
        for name, value in values.items()
        if not isinstance(value, dict)
    )


class Console:
    """Reports one run to `stream` (default stdout) in the chosen style.

    The bar is drawn between `start` and `stop`; lines printed meanwhile go
    above it. "auto" picks "bar" for a terminal and "lines" otherwise.
    """

    def __init__(self, style: str = "auto", stream: TextIO | None = None):
        stream = sys.stdout if stream is None else stream
        if style == "auto":
            style = "bar" if stream.isatty() else "lines"
        if style not in STYLES:
            raise ValueError(f"style: expected 'auto' or one of {STYLES}, got {style!r}")
        self.style = style
        self.stream = stream
        self._bar = None
        self._job = None
        self._window = (time.perf_counter(), 0)

    def print(self, line: str) -> None:
        if self.style == "off":
            return
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def header(self, fields: dict[str, str]) -> None:
        """One `name: value` line per field, aligned."""
        width = max(map(len, fields), default=0)
        for name, value in fields.items():
            self.print(f"{name + ':':<{width + 1}} {value}")

    def start(self, name: str, total: int, completed: int) -> None:
        self._window = (time.perf_counter(), completed)
        if self.style != "bar":
            return
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn(
                "loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} "
                "{task.fields[rate]} steps/s"
            ),
            TimeRemainingColumn(),
        )
        self._bar = Progress(*columns, console=RichConsole(file=self.stream, highlight=False))
        self._bar.start()
        self._job = self._bar.add_task(
            name, total=total, completed=completed, loss=float("nan"), acc=0.0, rate="-"
        )

    def log_step(self, step: int, total: int, record: dict[str, float]) -> None:
        began, first = self._window
        now = time.perf_counter()
        rate = (step - first) / max(now - began, 1e-9)
        self._window = (now, step)
        if self._bar is not None:
            self._bar.update(
                self._job,
                completed=step,
                loss=record["loss"],
                acc=record["accuracy"],
                rate=f"{rate:.0f}",
            )
        elif self.style == "lines":
            self.print(
                f"step {step}/{total}  loss {record['loss']:.4f}  "
                f"accuracy {record['accuracy']:.4f}  {rate:.0f} steps/s"
            )

    def evaluation(self, step: int, result: dict[str, float]) -> None:
        self.print(f"eval at step {step}:  {_format_metrics(result)}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
