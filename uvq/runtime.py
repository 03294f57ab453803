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
