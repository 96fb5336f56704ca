"""The one progress display of tilenorm-bmz: a rich bar on a terminal, plain lines in logs.

Library code never prints unless a caller passes ``progress=True``; then :func:`progress_bar` (and
:func:`track` over an iterable) writes to stderr: a rich progress bar when stderr is a terminal, and
otherwise (CI logs, ``make demo`` through a pipe) one plain line at most every :data:`PLAIN_INTERVAL_S`
seconds and at the end, never cut to the width of a terminal that is not there.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["PLAIN_INTERVAL_S", "Update", "progress_bar", "track"]

T = TypeVar("T")

PLAIN_INTERVAL_S = 10.0
"""Seconds between two plain progress lines when stderr is not a terminal."""

Update = Callable[..., None]
"""``update(advance=1, *, completed=None, info="")``: advance the bar (or set it), with a short status text."""


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int | None, description: str, *, completed: int = 0) -> Iterator[Update]:
    """A progress display for ``total`` steps; yields the function that advances it (a no-op when disabled)."""
    if not enabled:
        yield lambda *a, **k: None
        return
    if not sys.stderr.isatty():
        yield from _plain(total, description, completed)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(description, total=total, completed=completed, info="")

        def update(advance: int = 1, *, completed: int | None = None, info: str = "") -> None:
            if completed is not None:
                prog.update(task, completed=completed, info=info)
            else:
                prog.update(task, advance=advance, info=info)

        yield update


def _plain(total: int | None, description: str, completed: int) -> Iterator[Update]:
    state = {"done": completed, "info": "", "printed": time.monotonic()}

    def line() -> None:
        of = f"/{total}" if total is not None else ""
        info = f"  {state['info']}" if state["info"] else ""
        print(f"{description}: {state['done']}{of}{info}", file=sys.stderr, flush=True)
        state["printed"] = time.monotonic()

    def update(advance: int = 1, *, completed: int | None = None, info: str = "") -> None:
        state["done"] = completed if completed is not None else int(state["done"]) + advance
        state["info"] = info or state["info"]
        if time.monotonic() - float(state["printed"]) >= PLAIN_INTERVAL_S:
            line()

    try:
        yield update
    finally:
        line()


def track(iterable: Iterable[T], description: str, enabled: bool, total: int | None = None) -> Iterator[T]:
    """Iterate over ``iterable`` with :func:`progress_bar` (``total``: its length when it has one)."""
    if not enabled:
        yield from iterable
        return
    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
    with progress_bar(True, n, description) as update:
        for item in iterable:
            yield item
            update()
