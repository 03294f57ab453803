"""Progress events leave library code through a callback; the CLI renders them.

Events are plain dicts:
    {"event": "start", "task": str, "total": int | None, "unit": str, "completed": int (optional)}
    {"event": "advance", "task": str, "n": int, "metrics": dict}
    {"event": "end", "task": str, "metrics": dict}
    {"event": "log" | "warn", "message": str}

`Reporter` renders them as a rich progress bar (TTY), plain lines (non-TTY), or JSON lines
(`--json`), always on stderr so that stdout carries only machine-readable results.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

ProgressFn = Callable[[dict[str, Any]], None]


def null_progress(event: dict[str, Any]) -> None:
    """The callback used when the caller does not care."""


def _fmt(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


class Reporter:
    """Callable progress sink. mode: 'rich', 'plain' or 'json'."""

    def __init__(self, mode: str | None = None, plain_every: float = 5.0) -> None:
        if mode is None:
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self.plain_every = plain_every
        self._progress = None
        self._tasks: dict[str, Any] = {}
        self._state: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []

    # the callback -------------------------------------------------------------------------
    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "warn":
            self.warnings.append(event.get("message", ""))
        if self.mode == "json":
            print(json.dumps({"time": round(time.time(), 3), **event}, default=str), file=sys.stderr, flush=True)
            return
        if kind in ("log", "warn"):
            self._print(("warning: " if kind == "warn" else "") + str(event.get("message", "")))
        elif kind == "start":
            self._start(event)
        elif kind == "advance":
            self._advance(event)
        elif kind == "end":
            self._end(event)

    # rendering ----------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def _start(self, event: dict[str, Any]) -> None:
        task = event["task"]
        completed = int(event.get("completed", 0))  # a resumed run starts part-way; its rate counts new work only
        self._state[task] = {"t0": time.time(), "done": completed, "base": completed, "total": event.get("total"),
                             "unit": event.get("unit", "it"), "last": 0.0}
        if self.mode == "rich":
            if self._progress is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TaskProgressColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self._progress = Progress(
                    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                    console=Console(stderr=True), transient=False)
                self._progress.start()
            self._tasks[task] = self._progress.add_task(task, total=event.get("total"), completed=completed,
                                                        rate="", metrics="")
        else:
            total = event.get("total")
            self._print(f"{task}: start" + (f" ({total} {self._state[task]['unit']})" if total else ""))

    def _advance(self, event: dict[str, Any]) -> None:
        task = event["task"]
        st = self._state.setdefault(task, {"t0": time.time(), "done": 0, "base": 0, "total": None, "unit": "it",
                                           "last": 0.0})
        st["done"] += int(event.get("n", 1))
        elapsed = max(time.time() - st["t0"], 1e-9)
        rate = f"{(st['done'] - st['base']) / elapsed:.2f} {st['unit']}/s"
        metrics = _fmt(event.get("metrics") or {})
        if self.mode == "rich" and task in self._tasks:
            self._progress.update(self._tasks[task], advance=int(event.get("n", 1)), rate=rate, metrics=metrics)
        elif self.mode == "plain":
            now = time.time()
            if now - st["last"] >= self.plain_every or (st["total"] and st["done"] >= st["total"]):
                st["last"] = now
                of = f"/{st['total']}" if st["total"] else ""
                self._print(f"{task}: {st['done']}{of} {rate} {metrics}".rstrip())

    def _end(self, event: dict[str, Any]) -> None:
        task = event["task"]
        if self.mode == "rich" and task in self._tasks:
            self._progress.update(self._tasks.pop(task), metrics=_fmt(event.get("metrics") or {}))
            if not self._tasks:
                self.close()
        elif self.mode == "plain":
            st = self._state.get(task, {})
            elapsed = time.time() - st.get("t0", time.time())
            self._print(f"{task}: done in {elapsed:.1f}s {_fmt(event.get('metrics') or {})}".rstrip())

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()
