"""Stopping a long command early: on a signal or before its time limit, at a step every rank agrees on.

Clusters end jobs with a warning: SLURM sends SIGTERM before a time limit or a preemption (and,
with `--signal=USR1@90`, SIGUSR1 that many seconds earlier). A long command that gets one
finishes the step (batch, shard) in progress, saves the same resume point `--resume` uses, and
exits with `uvq.errors.EXIT_REQUEUE` (75) so that the job script requeues it; a second signal
stops at once (docs/reliability.md, "Signals and time limits").

The parts live apart, so that library code never handles signals:

- the CLI (uvq.cli.app) installs the signal handlers; a handler calls `StopRequest.request`;
- a loop calls `StopRequest.watch` when it can stop cleanly, then `should_stop` after each step,
  and raises `uvq.errors.Stopped` once it has saved its state;
- `run.time_limit` (seconds, or SLURM's `D-HH:MM:SS`) sets a deadline `run.stop_margin_s` before
  the limit, counted from when the request was made (the command's start).

Under torchrun a signal may reach one rank only, and the ranks' clocks differ a little, so
`should_stop` is a collective: one all-reduce (MAX) of a small integer that codes "no", "time
limit" or the signal, on the same steps on every rank, so that all ranks stop at the same step and
none waits forever in the next step's gradient all-reduce. The idea of a flag set by the handler
and checked by the loop follows PyTorch Lightning's SIGUSR1 requeue and submitit's checkpointing.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

from uvq.errors import UserError

# The codes all-reduced with MAX: a signal outranks the time limit (its name is the reason given).
_NONE, _TIME = 0, 1
_SIGNAL_BASE = 100
TIME_LIMIT = "time limit"


def parse_time_limit(value: float | int | str, name: str = "run.time_limit") -> float:
    """Seconds from a number of seconds or one of SLURM's time formats (sbatch --time).

    Strings as SLURM writes them: "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS". A bare
    number is seconds (SLURM's bare "MM" would be minutes, so a string of digits alone is refused
    rather than guessed).
    """
    usage = "use seconds (3600) or a time like 45:00, 12:00:00 or 1-12:00:00"
    if isinstance(value, bool):
        raise UserError(f"{name} must be a time, got {value!r}; {usage}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = re.fullmatch(r"(?:(\d+)-(\d+)(?::(\d+))?(?::(\d+))?|(\d+):(\d+)(?::(\d+))?)", str(value).strip())
        if m is None:
            raise UserError(f"{name} {value!r} is not a time; {usage}")
        days, dh, dm, ds, a, b, c = (int(g) if g is not None else None for g in m.groups())
        if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            seconds = days * 86400 + dh * 3600 + (dm or 0) * 60 + (ds or 0)
        elif c is None:  # MM:SS
            seconds = a * 60 + b
        else:  # HH:MM:SS
            seconds = a * 3600 + b * 60 + c
        seconds = float(seconds)
    if not (seconds > 0 and seconds != float("inf")):
        raise UserError(f"{name} must be a positive time, got {value!r}; {usage}")
    return seconds


class StopRequest:
    """Whether a long command should stop early, and why.

    Args:
        clock: the time source (time.monotonic); the time limit counts from the request's creation.

    `request(signum)` records a signal (the CLI's handler calls it); `set_time_limit` a deadline.
    `should_stop(dist, step)` answers for all ranks at once. `note_write(seconds)` tells it how
    long a checkpoint write took, so that the deadline keeps room for the next one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.signum: int | None = None
        self.deadline: float | None = None
        self.watched = False  # a loop that can stop cleanly is running (the CLI's handler asks)
        self.longest_write = 0.0
        self._last_check: float | None = None
        self._step_s = 0.0  # the time between the last two checks (about one step)

    # ---- set by the CLI and the command -------------------------------------------------------

    def request(self, signum: int) -> None:
        """Ask the running loop to stop after its current step (a signal handler calls this)."""
        self.signum = signum

    def set_time_limit(self, seconds: float | None, margin_s: float) -> None:
        """Stop `margin_s` before `seconds` after the start (None: no limit)."""
        self.deadline = None if seconds is None else self.started + seconds - margin_s

    def watch(self) -> None:
        """Say that a loop now checks `should_stop`: a first signal then asks, instead of interrupting."""
        self.watched = True
        self._last_check = self.clock()

    def note_write(self, seconds: float) -> None:
        self.longest_write = max(self.longest_write, seconds)

    # ---- asked by the loops -------------------------------------------------------------------

    def _local_code(self) -> int:
        if self.signum is not None:
            return _SIGNAL_BASE + int(self.signum)
        now = self.clock()
        if self._last_check is not None:
            self._step_s = now - self._last_check
        self._last_check = now
        # Room for one more step and one more checkpoint write before the deadline.
        if self.deadline is not None and now + self._step_s + self.longest_write >= self.deadline:
            return _TIME
        return _NONE

    def should_stop(self, dist=None, device=None, *, step: int | None = None, every: int = 1) -> str | None:
        """The reason to stop now (a signal's name or "time limit"), or None; the same on every rank.

        Under torchrun (`dist.enabled`) this is a collective on the steps where `step % every == 0`
        (every rank must call it at the same steps; on the others it answers None without one);
        `device` is where the flag's tensor lives (the training device: nccl needs CUDA tensors).
        A single process decides on every call.
        """
        if dist is None or not dist.enabled:
            return _reason(self._local_code())
        if step is not None and step % every != 0:
            return None
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([self._local_code()], dtype=torch.int64, device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return _reason(int(flag.item()))


def _reason(code: int) -> str | None:
    if code == _NONE:
        return None
    if code == _TIME:
        return TIME_LIMIT
    return signal.Signals(code - _SIGNAL_BASE).name


def from_run_config(stop: StopRequest | None, run_cfg) -> StopRequest:
    """The request a library function uses: the caller's (the CLI's, with its handlers) or a new
    one, with the recipe's `run.time_limit` and `run.stop_margin_s` applied."""
    stop = stop if stop is not None else StopRequest()
    stop.set_time_limit(run_cfg.time_limit_s, run_cfg.stop_margin_s)
    return stop
