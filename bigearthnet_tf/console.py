"""What the terminal shows: one console set-up, plain messages, and progress bars of one look.

Status goes to standard error (standard output stays for results a user may pipe), never with rich
markup or highlighting applied to user text (a path with `[brackets]` prints as it is).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_SPEED_STYLE = "progress.data.speed"


def plain_console(*, file: IO[str] | None = None, stderr: bool = False, quiet: bool = False) -> Console:
    """Every command's console: no highlighting, and no line breaks put into messages, so a long path
    stays whole (a terminal wraps long lines itself; a log keeps them on one line). Tables still fit
    the width."""
    return Console(file=file, stderr=stderr, quiet=quiet, highlight=False, soft_wrap=True)


def status_console(show: bool = True) -> Console:
    """The console for progress and messages: standard error, silent when `show` is False."""
    return plain_console(stderr=True, quiet=not show)


def say(console: Console, message: str) -> None:
    """Print `message` as it is (no markup, no highlighting, no wrapping of long paths)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second averaged over this run; items an earlier run did (the task field `resumed`)
    do not count."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields.get("resumed", 0)
        if not task.elapsed or done <= 0:
            return Text(f"-- {self.unit}/s", style=_SPEED_STYLE)
        return Text(f"{done / task.elapsed:,.0f} {self.unit}/s", style=_SPEED_STYLE)


class AmountColumn(ProgressColumn):
    """Done / total and the rate over this run, in the task's `unit` field: `bytes` (shown in MB) or a
    count of things."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        in_bytes = unit == "bytes"
        scale, shown = (1e6, "MB") if in_bytes else (1, unit)
        digits = 1 if in_bytes and (task.total or 0) < 100e6 else 0  # small files: 0.4/1.1 MB
        done = f"{task.completed / scale:,.{digits}f}/{(task.total or 0) / scale:,.{digits}f} {shown}"
        rate = f"{task.completed / scale / task.elapsed:,.{digits}f} {shown}/s" if task.elapsed else "--"
        return Text(f"{done}  {rate}", style=_SPEED_STYLE)


def progress_bar(
    console: Console,
    unit: str | None = None,
    *,
    amounts: bool = False,
    label: str = "[progress.description]{task.description}",
    columns: Sequence[ProgressColumn] | None = None,
    disable: bool = False,
) -> Progress:
    """A progress bar: `label` (the task's description), the bar, then done/total and the rate in
    `unit` (with `amounts`: `AmountColumn`, for tasks in bytes and counts alike; or the `columns`
    given), and the time left."""
    if columns is None:
        columns = [AmountColumn()] if amounts else [MofNCompleteColumn(), RateColumn(unit or "items")]
    return Progress(
        TextColumn(label),
        BarColumn(),
        *columns,
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=disable,
    )
