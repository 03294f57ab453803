"""What the two training loops share: seeds, a metrics meter, the trainer state and resume.

`fit-vqgan` (uvq.vqgan.train) and `fit-prior` (uvq.prior.train) stay visible functions
(style.md, principle 8); this module holds the few pieces both need written once:

- `derive_seeds`: every random stream of a run, from its seed and the process's rank.
- `Meter`: the logging window. Per-step values are summed on the device in float64 (no host
  sync in the step path); `reduce` sums over ranks under torchrun and crosses to the host once,
  at log time. A NaN or inf carries into its sum, so divergence is caught there (and at each
  checkpoint, before non-finite weights are written) without a per-step check.
- `resolve_resume`: what `--resume auto` means.
- `TrainerState`: the record in a checkpoint's trainer.pt (optimisers, GradScalers, EMA
  counters, best metric, and per rank the RNG states, the data position and the meter's sums),
  built by `capture` and restored by `resume`, the one resume path of both loops. The EMA's
  weights are in ema.safetensors only, never again in trainer.pt.

The meter's idea follows NVlabs/edm's `training_stats` (accumulate on the device, reduce across
ranks at report time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uvq.checkpoint import load_state_dict, load_trainer_state
from uvq.ema import EMA
from uvq.files import read_record
from uvq.progress import ProgressFn
from uvq.rundir import RunDir
from uvq.runtime import DistInfo, UserError, rng_state, set_rng_state
from uvq.vqgan.model import perplexity  # the one definition (code usage of the VQGAN's codebook)

# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeds:
    """The random streams of one process of a run."""

    global_: int  # Python, NumPy and torch's global RNGs: initial weights, dropout
    generator: int  # the loop's own torch.Generator (DiffAugment; masks and time steps)
    data: int  # the data order (every rank passes the same seed and takes its own share)


def derive_seeds(seed: int, rank: int) -> Seeds:
    """Both loops' seeds. The global RNGs get `seed + rank` (each rank its own dropout masks; DDP
    broadcasts rank 0's initial weights, so the other ranks' initial draws never count).

    Numbers: a one-process run of either loop is bit-identical to the loops before they shared
    this (fit-prior always seeded seed + rank; fit-vqgan seeded `seed` on every rank, which only
    ever reached rank k's overwritten initial weights: its step path draws from its generator).
    """
    return Seeds(global_=seed + rank, generator=seed * 7919 + rank, data=seed)


# ---------------------------------------------------------------------------------------------
# The metrics meter
# ---------------------------------------------------------------------------------------------


class Meter:
    """Means over a logging window of per-step scalars, kept on the device.

    Args:
        keys: the names that may be added, in the order they are reported.
        device: where the sums live (the training device).
        codebook_size: when given, `count_codes` keeps a code histogram and `reduce` reports its
            `usage` (fraction of codes used) and `perplexity` (exp of the code entropy).

    `add(name, value)` adds a 0-dim tensor to `name`'s float64 sum and counts it; a name is
    reported as sum / count over the steps that added it (and over ranks), when any did. The
    sums are float64 so that the mean equals a Python float sum of the same values, bit for bit.
    """

    def __init__(self, keys: tuple[str, ...], device: torch.device, *, codebook_size: int | None = None) -> None:
        self.keys, self.device, self.codebook_size = tuple(keys), device, codebook_size
        self.reset()

    def reset(self) -> None:
        self.sums = {k: torch.zeros((), device=self.device, dtype=torch.float64) for k in self.keys}
        self.counts = dict.fromkeys(self.keys, 0)  # host integers: counting needs no sync
        self.codes = (torch.zeros(self.codebook_size, device=self.device, dtype=torch.float64)
                      if self.codebook_size else None)

    @torch.no_grad()
    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] += value.detach().double()
        self.counts[name] += 1

    @torch.no_grad()
    def count_codes(self, codes: torch.Tensor) -> None:
        """Add a LongTensor of code indices to the histogram (index_add_: bincount syncs on CUDA)."""
        flat = codes.reshape(-1)
        self.codes.index_add_(0, flat, torch.ones(flat.shape, device=flat.device, dtype=torch.float64))

    def _packed(self) -> torch.Tensor:
        counts = torch.tensor([self.counts[k] for k in self.keys], dtype=torch.float64).to(self.device)
        parts = [torch.stack([self.sums[k] for k in self.keys]), counts]
        return torch.cat(parts + ([self.codes] if self.codes is not None else []))

    def reduce(self, dist: DistInfo) -> dict[str, float]:
        """The window's means (summed over ranks under torchrun): one host sync. A collective."""
        packed = self._packed()
        if dist.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(packed)
        n = len(self.keys)
        extra: list[torch.Tensor] = []
        if self.codes is not None:
            counts = packed[2 * n:]
            extra = [counts.sum(), (counts > 0).double().mean(), perplexity(counts)]
        host = torch.cat([packed[:2 * n], *(e.reshape(1) for e in extra)]).tolist()  # the one sync
        out = {k: host[i] / host[n + i] for i, k in enumerate(self.keys) if host[n + i] > 0}
        if extra and host[2 * n] > 0:
            out["usage"], out["perplexity"] = host[2 * n + 1], host[2 * n + 2]
        return out

    def finite(self, dist: DistInfo) -> bool:
        """Whether every value added since the last reset was finite (on every rank). A collective."""
        total = torch.stack(list(self.sums.values())).sum().reshape(1)
        if dist.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(total)
        return bool(torch.isfinite(total).item())

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "counts": dict(self.counts),
                "codes": None if self.codes is None else self.codes.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for k in self.keys:
            if k in state["sums"]:
                self.sums[k] = state["sums"][k].to(self.device, torch.float64)
                self.counts[k] = int(state["counts"][k])
        if self.codes is not None and state.get("codes") is not None:
            self.codes = state["codes"].to(self.device, torch.float64)


def refuse_nonfinite(metrics: dict[str, float], step: int, last_ckpt: Path | None) -> None:
    """Stop a diverged run with one line (the sums of the window carry any NaN or inf)."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        names = ", ".join(f"{k}={v}" for k, v in bad.items())
        where = f"the last checkpoint, {last_ckpt}, precedes it" if last_ckpt else "no checkpoint was written"
        raise UserError(f"training diverged: {names} in the steps up to {step}; {where}. Lower the learning rate "
                        "or set a grad_clip, and start again or resume")


# ---------------------------------------------------------------------------------------------
# The trainer state (trainer.pt) and the one resume path
# ---------------------------------------------------------------------------------------------

FORMAT = 2  # trainer.pt's layout; 1 is the layout before TrainerState (read by `from_dict`)


@dataclass
class RankState:
    """One process's share: its RNG states, data position, logging window and extras."""

    rng: dict[str, Any]  # uvq.runtime.rng_state()
    generators: dict[str, torch.Tensor]  # the loop's torch.Generator states, by name
    data: dict[str, Any]  # the data stream's position (its state_dict)
    meter: dict[str, Any]  # Meter.state_dict(): the logging window so far
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the absorbing process's trackers


@dataclass
class TrainerState:
    """Everything beyond the weights files that a run needs to continue exactly."""

    step: int
    optimizers: dict[str, Any]  # name -> optimizer.state_dict()
    scalers: dict[str, Any]  # name -> GradScaler.state_dict()
    ema: dict[str, Any] | None  # EMA counters (its weights are ema.safetensors)
    best: dict[str, Any] | None  # the best validation metric so far (fit-prior)
    modules: dict[str, Any]  # module states without a weights file (fit-vqgan's discriminator)
    ranks: list[RankState]

    def to_dict(self) -> dict[str, Any]:
        """Plain containers of tensors, for torch.save (read back with weights_only=True)."""
        return {"format": FORMAT, "step": self.step, "optimizers": self.optimizers, "scalers": self.scalers,
                "ema": self.ema, "best": self.best, "modules": self.modules, "ranks": [vars(r) for r in self.ranks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        if d.get("format") == FORMAT:
            return cls(step=int(d["step"]), optimizers=d["optimizers"], scalers=d["scalers"], ema=d["ema"],
                       best=d["best"], modules=d["modules"], ranks=[RankState(**r) for r in d["ranks"]])
        return _from_format_1(d)


def _from_format_1(d: dict[str, Any]) -> TrainerState:
    """trainer.pt as the loops wrote it before TrainerState: fit-vqgan's or fit-prior's own layout."""
    ema = d.get("ema")
    if ema is not None:
        ema = {k: v for k, v in ema.items() if k != "weights"}  # the copy of ema.safetensors
    if "opt_ae" in d:  # fit-vqgan: its window was the sums and counters of its LOSS_KEYS
        ranks = []
        for r in d["ranks"]:
            w = r["window"]
            counters = {"lpips": "n_lpips", "g_loss": "n_g", "d_loss": "n_d", "logits_real": "n_d",
                        "logits_fake": "n_d"}
            names = [k for k in w if k not in ("codes", "n", "n_lpips", "n_g", "n_d")]
            meter = {"sums": {k: w[k] for k in names}, "counts": {k: int(w[counters.get(k, "n")]) for k in names},
                     "codes": w.get("codes")}
            ranks.append(RankState(rng=r["rng"], generators={"augment": r["aug_rng"]}, data=r["data"], meter=meter))
        return TrainerState(step=int(d["step"]), optimizers={"ae": d["opt_ae"], "d": d["opt_d"]},
                            scalers={"ae": d["scaler"], "d": d["d_scaler"]}, ema=ema, best=None,
                            modules={"disc": d["disc"]}, ranks=ranks)
    if "optimizer" in d:  # fit-prior: its logging window was not saved (it restarted at the resume step)
        ranks = [RankState(rng=r["rng"], generators={"process": r["generator"]}, data=r["stream"],
                           meter={"sums": {}, "counts": {}}, extra={"process": r["process"]}) for r in d["ranks"]]
        return TrainerState(step=int(d["step"]), optimizers={"model": d["optimizer"]}, scalers={}, ema=ema,
                            best=d.get("best"), modules={}, ranks=ranks)
    raise UserError("trainer.pt has an unknown layout; the checkpoint cannot be resumed")


def capture(step: int, dist: DistInfo, *, optimizers: dict[str, Any], scalers: dict[str, Any], ema: EMA | None,
            generators: dict[str, torch.Generator], data: Any, meter: Meter, modules: dict[str, torch.nn.Module] | None = None,
            best: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> TrainerState:
    """The trainer state at `step`; a collective under torchrun (every rank's share is gathered)."""
    mine = RankState(rng=rng_state(), generators={k: g.get_state().cpu() for k, g in generators.items()},
                     data=data.state_dict(), meter=meter.state_dict(), extra=dict(extra or {}))
    ranks = [mine]
    if dist.enabled:
        import torch.distributed as tdist

        ranks = [None] * dist.world_size
        tdist.all_gather_object(ranks, mine)
    return TrainerState(step=step, optimizers={k: o.state_dict() for k, o in optimizers.items()},
                        scalers={k: s.state_dict() for k, s in scalers.items()},
                        ema=ema.state_dict(weights=False) if ema is not None else None, best=best,
                        modules={k: {n: v.detach().cpu() for n, v in m.state_dict().items()}
                                 for k, m in (modules or {}).items()},
                        ranks=ranks)


def resume(run: RunDir, dist: DistInfo, *, kind: str, model: torch.nn.Module, optimizers: dict[str, Any],
           scalers: dict[str, Any], ema: EMA | None, generators: dict[str, torch.Generator], data: Any,
           meter: Meter, modules: dict[str, torch.nn.Module] | None = None,
           progress: ProgressFn) -> tuple[Path | None, TrainerState | None]:
    """Restore every piece of state from the run's last checkpoint, per rank: (checkpoint, state).

    Without a checkpoint (killed before the first) the run starts from step 0. Either way
    metrics.jsonl loses its rows after the resume step, so that no step is logged twice.
    """
    last = run.resume_point(dist, kind=kind)
    state = TrainerState.from_dict(load_trainer_state(last)) if last is not None else None
    dropped = run.truncate_metrics(state.step if state else 0)
    if dropped:
        progress({"event": "warn", "message": f"{run.path / 'metrics.jsonl'}: dropped a torn last line "
                                              "(a write was killed)"})
    if state is None:
        return None, None
    if len(state.ranks) != dist.world_size:
        raise UserError(f"{last} was written by {len(state.ranks)} processes; resume with the same number "
                        f"(this run has {dist.world_size})")
    model.load_state_dict(load_state_dict(last, "model")[0])
    for k, m in (modules or {}).items():
        m.load_state_dict(state.modules[k])
    for k, opt in optimizers.items():
        opt.load_state_dict(state.optimizers[k])
    for k, scaler in scalers.items():
        if k in state.scalers:  # a fit-prior checkpoint of format 1 had no GradScaler (it starts fresh)
            scaler.load_state_dict(state.scalers[k])
    if ema is not None:
        if state.ema is None:
            raise UserError(f"{last} was trained without EMA; resume with ema=false in the training section")
        ema.load_state_dict(state.ema, weights=load_state_dict(last, "ema")[0])
    mine = state.ranks[dist.rank]
    set_rng_state(mine.rng)
    for k, g in generators.items():
        g.set_state(mine.generators[k].to(g.get_state().device))
    data.load_state_dict(mine.data)
    meter.load_state_dict(mine.meter)
    progress({"event": "log", "message": f"resumed {run.path} at step {state.step} from {last.name}"})
    return last, state


# ---------------------------------------------------------------------------------------------
# `--resume auto` (docs/reliability.md, "Signals and time limits")
# ---------------------------------------------------------------------------------------------


def resolve_resume(resume: bool | str | None, out_dir: str | Path) -> bool:
    """Whether to continue `out_dir`: `--resume` (True or "last") always, `--resume auto` when the
    directory holds a run of uvq's (its `.uvq` record; a run killed before its first checkpoint
    then restarts from step 0 in place), None or False never."""
    if resume in (None, False):
        return False
    if resume in (True, "last"):
        return True
    if resume == "auto":
        return read_record(out_dir) is not None if Path(out_dir).is_dir() else False
    raise UserError(f"--resume takes no value or `auto`, not {resume!r}")

