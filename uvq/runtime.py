"""Where code runs: user errors, devices, torch.distributed under torchrun, seeds, autocast."""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

# UserError is defined apart so that the CLI can catch it without importing torch.
from uvq.errors import UserError

# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """'auto' picks the local CUDA device (LOCAL_RANK under torchrun) or the CPU; else cpu, cuda or cuda:N.

    uvq runs on CUDA and on the CPU only, so every other torch device type (mps, meta, xpu, ...) is
    refused here with one line, before a model is built, instead of failing later inside a kernel.
    """
    spec = str(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    kind, colon, index = spec.partition(":")
    if not (spec == "cpu" or (kind == "cuda" and (not colon or index.isdigit()))):
        raise UserError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec} asked for CUDA but no CUDA device is visible; use --device cpu")
    if kind == "cuda" and colon and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def amp_context(device: torch.device, precision: str):
    """Autocast for 'bf16' / 'fp16' on CUDA; a no-op for 'fp32' and on the CPU (exact CPU runs)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type="cuda", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# torch.distributed (launched by torchrun; never a home-made launcher)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA).

    Without torchrun's variables this is a single-process run and nothing is initialised.
    `timeout_s` (the recipe's `run.dist_timeout_s`) bounds every collective: a rank that died or
    hangs makes the others fail after that long instead of torch's default 30 minutes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def dist_info() -> DistInfo:
    """The current process group's shape (single process when none is initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Jobs the ranks share outside training (sample, canvas, inpaint, feature extraction)
# ---------------------------------------------------------------------------------------------


def batch_share(n: int, batch_size: int, info: DistInfo | None = None) -> tuple[int, int]:
    """(first item, item count) of this rank's share of n items processed in batches of `batch_size`.

    Rank r of W takes batches [r*B//W, (r+1)*B//W) of the B = ceil(n / batch_size) batches of a
    one-process run: a contiguous run of whole batches, so that every batch holds the same items
    as in one process and its results are bit-identical even where a kernel's rounding depends on
    the batch size. Shares differ by at most one batch; a rank may get none (count 0).
    """
    info = info or dist_info()
    n_batches = -(-n // batch_size)
    lo = info.rank * n_batches // info.world_size
    hi = (info.rank + 1) * n_batches // info.world_size
    first = min(lo * batch_size, n)
    return first, min(hi * batch_size, n) - first


def share_rounds(n: int, batch_size: int, world_size: int) -> int:
    """The most batches any rank gets from `batch_share`: the number of rounds of a pooled job."""
    n_batches = -(-n // batch_size)
    return -(-n_batches // world_size)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def on_main(fn):
    """Run fn() on rank 0 only and give every rank its result (a picklable value).

    A UserError on rank 0 (a refused output directory, say) is raised on every rank with the same
    message, so that no rank waits at a collective for a rank that gave up.
    """
    dist = _dist()
    if dist is None:
        return fn()
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as exc:
            box[0], failure = ("user", str(exc)), exc
        except BaseException as exc:
            box[0], failure = ("crash", f"rank 0 failed: {type(exc).__name__}: {exc}"), exc
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind != "ok":
        raise UserError(value)
    return value


def _comm_device(dist) -> torch.device:
    """Where a collective's tensors live: the current CUDA device on NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ranks_ok(ok: bool) -> bool:
    """True when `ok` holds on every rank (one all-reduce); every rank gets the same answer."""
    dist = _dist()
    if dist is None:
        return bool(ok)
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_comm_device(dist))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def reduce_numbers(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum or max of a list of numbers over the ranks (float64; exact for counts)."""
    dist = _dist()
    if dist is None:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(dist))
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.cpu().tolist()


def gather_to_main(obj):
    """Every rank's `obj` as a list in rank order on rank 0, None on the others (pickled; keep it small)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj) -> list:
    """Every rank's `obj` as a list in rank order, on every rank (pickled)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class JobProgress:
    """Whole-job progress for a job the ranks share: rank 0 reports every rank's work.

    Each rank calls `advance(n)` once per batch of its share; the counts are summed over the
    ranks (one all-reduce of one number per batch, so the ranks keep step by batch) and rank 0
    reports the sum. `finish()` pads a rank that had fewer batches than `rounds` with zeros, so
    every rank makes the same collectives, then reports the end. `inner` is the callback for the
    library code running a share: rank 0's events go through, except those of `task` itself.

    With a `stop` request (uvq.stopping), `advance` and `finish` also answer whether to stop
    early, the same answer on every rank for the same round (`StopRequest.should_stop`, one more
    all-reduce per round), so a rank that got the signal and one that did not stop together.
    """

    def __init__(self, progress, task: str, total: int | None, rounds: int, unit: str = "img",
                 stop=None) -> None:
        self.main = dist_info().is_main
        self.progress, self.task, self.rounds, self.calls = progress, task, rounds, 0
        self.pooled = _dist() is not None
        self.stop = stop
        if self.main:
            progress({"event": "start", "task": task, "total": total, "unit": unit})

    def inner(self, event: dict) -> None:
        if self.main and event.get("task") != self.task:
            self.progress(event)

    def advance(self, n: int, metrics: dict | None = None) -> str | None:
        """Count a batch; the agreed reason to stop now (a signal's name, "time limit") or None."""
        self.calls += 1
        dist = _dist()
        done = int(reduce_numbers([n])[0]) if self.pooled else n
        if self.main:
            self.progress({"event": "advance", "task": self.task, "n": done, "metrics": metrics or {}})
        if self.stop is None:
            return None
        return self.stop.should_stop(dist_info(), _comm_device(dist) if dist is not None else None)

    def finish(self, metrics: dict | None = None) -> str | None:
        """Pad the rounds this rank did not have; the agreed reason to stop, if one came meanwhile."""
        reason = None
        while self.calls < self.rounds:
            reason = self.advance(0) or reason
            if reason is not None:
                return reason
        if self.main:
            self.progress({"event": "end", "task": self.task, **({"metrics": metrics} if metrics else {})})
        return None


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]), gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
