"""The error a user can fix, in a module that imports nothing heavy.

The CLI's entry point catches it before any command has imported torch, so `uvq --help`,
`uvq --version` and a mistyped command answer at once (docs/design.md, "Errors").
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits with status 2."""


# The exit status of a long command that stopped early on a signal (SIGTERM, SIGUSR1, SIGINT) or
# its time limit after saving its state: sysexits.h's EX_TEMPFAIL, "try again later". A job
# script requeues on it and reruns the same line with `--resume auto` (docs/reliability.md).
EXIT_REQUEUE = 75


class Stopped(Exception):
    """A long command stopped early on request with its state saved; the CLI exits EXIT_REQUEUE.

    `reason` is the signal's name (`SIGTERM`) or `time limit`; `saved` says what was kept (a
    checkpoint's path, "the finished shards", ...), for the one line the CLI prints; `out` the
    output directory, where the CLI leaves the requeue marker (docs/cluster.md).
    """

    def __init__(self, reason: str, saved: str, *, step: int | None = None, out: str | None = None) -> None:
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"stopped{where} on {reason}; {saved}")
        self.reason, self.saved, self.step = reason, saved, step
        # The output directories to mark for a requeue (uvq.files.mark_requeue): the command's own,
        # and the pipeline's around a stage.
        self.out_dirs: list[str] = [str(out)] if out is not None else []
