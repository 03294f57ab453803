"""An exponential moving average (EMA) of a module's weights (docs/method.md section 1, "Training").

The authors keep a deep copy of the model and, every `steps_per_update_ema` steps, move each of
its parameters towards the trained one: ema <- beta * ema + (1 - beta) * theta, with beta = 0.995
every 10 steps. We add a start step (before it the copy simply follows the weights, as in
taming-transformers' LitEma warm-up idea and k-diffusion's EMA warm-up), and copy buffers
(e.g. BatchNorm statistics) instead of averaging them.

Both training loops use this class: `fit-vqgan` on the autoencoder and `fit-prior` on the
transformer. It knows nothing about either.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


class EMA:
    """A frozen copy of `model` whose weights trail the model's.

    Args:
        model: the module being trained (a DDP or compiled wrapper is unwrapped).
        beta: decay per update, in (0, 1); 0.995 in the paper.
        every: update every this many optimiser steps (10 in the paper).
        start: before this step the copy equals the model's weights (no averaging yet).
    """

    def __init__(self, model: nn.Module, beta: float = 0.995, every: int = 1, start: int = 0) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"EMA beta must be in (0, 1), got {beta}")
        if every < 1 or start < 0:
            raise ValueError("EMA every must be >= 1 and start >= 0")
        self.beta, self.every, self.start = float(beta), int(every), int(start)
        self.num_updates = 0
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Call after optimiser step number `step` (1-based count of steps done). Returns whether it averaged."""
        src = unwrap(model)
        if step < self.start:
            self.copy_from(src)
            return False
        if step % self.every != 0:
            return False
        ema_params = list(self.model.parameters())
        new_params = [p.detach() for p in src.parameters()]
        # ema <- beta * ema + (1 - beta) * theta, i.e. lerp towards theta by (1 - beta)
        torch._foreach_lerp_(ema_params, new_params, 1.0 - self.beta)
        for b_ema, b in zip(self.model.buffers(), src.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        self.model.load_state_dict(unwrap(model).state_dict())

    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """Everything needed to continue exactly; torch.load(weights_only=True)-safe.

        `weights=False` leaves the averaged weights out, for callers that store them elsewhere
        (both training loops keep them in the checkpoint's ema.safetensors only; uvq.training).
        """
        state: dict[str, Any] = {"beta": self.beta, "every": self.every, "start": self.start,
                                 "num_updates": self.num_updates}
        if weights:
            state["weights"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> None:
        """Restore a state_dict(); `weights` supplies the averaged weights when the state has none."""
        self.num_updates = int(state["num_updates"])
        weights = state.get("weights", weights)
        if weights is None:
            raise ValueError("this EMA state holds no weights; pass them as `weights`")
        self.model.load_state_dict(weights)
