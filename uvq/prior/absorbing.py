"""The absorbing diffusion process over VQGAN tokens, apart from the network (docs/method.md sections 2, 3, 6).

A plain object in the style of guided-diffusion's GaussianDiffusion and diffusers' schedulers: it
owns the forward process q(x_t | x_0), the choice of time step, the loss weights and the ELBO,
and calls a network only through `model_fn(x_t: LongTensor[B,N]) -> logits[B,N,K]`.

Notation (docs/method.md): N tokens per image, K codes, mask id m = K, T diffusion steps (T = N by
default), CE(t) = sum over masked positions i of -log p_theta(x_0^i | x_t), in nats.

All figures that leave this module are in bits: per token (divided by N ln 2) for the ELBO and
the ELBO-like losses, per masked token for the MLM loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from uvq.progress import ProgressFn
from uvq.registry import register, registry
from uvq.runtime import UserError

ModelFn = Callable[[torch.Tensor], torch.Tensor]
LN2 = math.log(2.0)

# ---------------------------------------------------------------------------------------------
# Helpers: randomness from an explicit generator (diffusers style)
# ---------------------------------------------------------------------------------------------


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move.
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _uniform_times(n: int, T: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    where = generator.device if generator is not None else device
    return torch.randint(1, T + 1, (n,), generator=generator, device=where).to(device)


def masked_cross_entropy(logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE(t): sum over masked positions of -log softmax(logits)[x_0], in nats. [B,N,K] -> [B]."""
    B, N, K = logits.shape
    target = torch.where(mask, x0, torch.full_like(x0, -100))  # -100: F.cross_entropy's ignore_index
    ce = F.cross_entropy(logits.reshape(B * N, K).float(), target.reshape(B * N), reduction="none")  # [B*N]
    return ce.view(B, N).sum(1)  # [B]


# ---------------------------------------------------------------------------------------------
# Shared with sampling and inpainting (docs/method.md sections 3 and 5)
# ---------------------------------------------------------------------------------------------


def start_time_for_masked(n_masked: int, n_tokens: int, T: int) -> int:
    """The time at which `n_masked` of `n_tokens` masks are expected: round(T * n_masked / N).

    Inpainting starts the reverse process there (docs/method.md section 5). Rounds half to even, like
    torch.round in the masking schedule; clamped to [0, T].
    """
    if n_tokens <= 0 or T <= 0:
        raise ValueError("n_tokens and T must be positive")
    return max(0, min(T, round(T * n_masked / n_tokens)))


# ---------------------------------------------------------------------------------------------
# Losses (Eq. 6, Eq. 7, the authors' code, MLM)
#
# Each maps the per-image masked cross-entropy CE(t) [B] (nats), the number of masked tokens
# [B], the time steps t [B], T and N to a per-image loss [B]. The expectation over t ~ U{1..T}
# and the masking is the quantity named; constant scales are ours (the paper leaves them free):
# every loss is in bits, and for the ELBO and the paper's reweighted ELBO the scale is chosen so
# that uniform logits score exactly log2 K, which makes curves of different losses comparable.
# ---------------------------------------------------------------------------------------------


@register("prior_losses", "elbo.v1")
def elbo_loss(ce: torch.Tensor, n_masked: torch.Tensor, t: torch.Tensor, T: int, N: int) -> torch.Tensor:
    """Eq. 6, one-sample estimate: T/t * CE(t), in bits per token (/ N ln 2)."""
    return (T / t.to(ce.dtype)) * ce / (N * LN2)


def reweighted_elbo_scale(T: int) -> float:
    """Z = (T+1)(T+2) / (6T) = (1/T^2) sum_t (T-t+1) t: with it, uniform logits score log2 K."""
    return (T + 1) * (T + 2) / (6.0 * T)


@register("prior_losses", "reweighted_elbo.v1")
def reweighted_elbo_loss(ce: torch.Tensor, n_masked: torch.Tensor, t: torch.Tensor, T: int, N: int) -> torch.Tensor:
    """Eq. 7 as the paper writes it: (T - t + 1) * CE(t), divided by N ln 2 and by Z(T)."""
    weight = (T - t.to(ce.dtype) + 1.0) / reweighted_elbo_scale(T)
    return weight * ce / (N * LN2)


@register("prior_losses", "reweighted_elbo_official.v1")
def reweighted_elbo_official_loss(ce: torch.Tensor, n_masked: torch.Tensor, t: torch.Tensor, T: int, N: int) -> torch.Tensor:
    """The authors' code ('new' loss): (1 - t/T) * CE(t) / (N ln 2), their scale unchanged (0 at t = T)."""
    return (1.0 - t.to(ce.dtype) / T) * ce / (N * LN2)


@register("prior_losses", "mlm.v1")
def mlm_loss(ce: torch.Tensor, n_masked: torch.Tensor, t: torch.Tensor, T: int, N: int) -> torch.Tensor:
    """The MLM ablation: CE averaged over the masked tokens, in bits per masked token (0 if none)."""
    return ce / (n_masked.to(ce.dtype).clamp(min=1.0) * LN2)


PRIOR_LOSSES = ("elbo.v1", "reweighted_elbo.v1", "reweighted_elbo_official.v1", "mlm.v1")


# ---------------------------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------------------------


class AbsorbingDiffusion:
    """Absorbing (masking) diffusion over N tokens with codebook size K; mask id K.

    Args:
        n_tokens: N. codebook_size: K.
        T: number of diffusion steps (None: N, the paper's 256 at 16x16 tokens).
        masking: "random" masks each token independently with probability t/T (the paper);
            "fixed" masks exactly round(t/T * N) tokens chosen uniformly, at least one (the
            authors' code's option).
        time_sampling: "uniform" draws t ~ U{1..T}; "importance" draws t with probability
            proportional to sqrt(E[L_t^2]) of a running history of the per-t ELBO term, after
            every t has been seen more than 10 times (uniform until then), and weights each
            sample by 1/(T p(t)) so that every loss keeps its expectation.
    """

    def __init__(self, n_tokens: int, codebook_size: int, T: int | None = None,
                 masking: Literal["random", "fixed"] = "random",
                 time_sampling: Literal["uniform", "importance"] = "uniform") -> None:
        if masking not in ("random", "fixed"):
            raise UserError(f"masking must be 'random' or 'fixed', got {masking!r}")
        if time_sampling not in ("uniform", "importance"):
            raise UserError(f"time_sampling must be 'uniform' or 'importance', got {time_sampling!r}")
        if n_tokens < 1 or codebook_size < 1:
            raise ValueError("n_tokens and codebook_size must be positive")
        self.n_tokens = n_tokens
        self.codebook_size = codebook_size
        self.mask_id = codebook_size
        self.T = int(T) if T is not None else n_tokens
        if self.T < 1:
            raise UserError(f"T must be >= 1, got {T}")
        self.masking = masking
        self.time_sampling = time_sampling
        # Trackers indexed by t (index 0 unused), laid out as the authors' buffers so that an
        # imported checkpoint's can be loaded: EMA of L_t^2 (importance sampling), the count of
        # draws per t, and an EMA of the training loss per t (the loss-by-time-step plot).
        self.Lt_history = torch.zeros(self.T + 1, dtype=torch.float64)
        self.Lt_count = torch.zeros(self.T + 1, dtype=torch.float64)
        self.loss_history = torch.zeros(self.T + 1, dtype=torch.float64)
        self._ready: bool | None = None

    # --- the forward process q(x_t | x_0) (section 3.2) -----------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask x0 [B,N] at times t [B]; returns (x_t [B,N] with mask id K, mask BoolTensor[B,N])."""
        B, N = x0.shape
        u = _uniform((B, N), generator, x0.device)
        if self.masking == "random":
            mask = u < (t.to(x0.device, torch.float64) / self.T).unsqueeze(1).to(u.dtype)
        else:
            n = torch.round(t.to(x0.device, torch.float64) / self.T * N).clamp(min=1, max=N).long()  # [B]
            ranks = u.argsort(dim=1).argsort(dim=1)  # a uniformly random permutation per row
            mask = ranks < n.unsqueeze(1)
        return torch.where(mask, torch.full_like(x0, self.mask_id), x0), mask

    # --- time steps ---------------------------------------------------------------------------

    def importance_ready(self) -> bool:
        """Whether every t has been drawn more than 10 times (the authors' warm-up)."""
        if not self._ready:  # counts only grow: once ready, stays ready without another host sync
            self._ready = bool((self.Lt_count[1:] > 10).all())
        return self._ready

    def time_probabilities(self) -> torch.Tensor:
        """p(t) for t = 1..T (float64 [T]): uniform, or sqrt(E[L_t^2]) once warmed up."""
        if self.time_sampling == "uniform" or not self.importance_ready():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        # The authors add 1e-10 inside and 1e-4 outside the root so that no t gets probability 0.
        w = torch.sqrt(self.Lt_history[1:] + 1e-10) + 1e-4
        return w / w.sum()

    def sample_time(self, batch: int, device: torch.device, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t LongTensor[B] in 1..T, and the weight 1/(T p(t)) [B] (all ones when uniform)."""
        if self.time_sampling == "uniform" or not self.importance_ready():
            t = _uniform_times(batch, self.T, generator, device)
            return t, torch.ones(batch, device=device)
        p = self.time_probabilities()
        where = generator.device if generator is not None else p.device
        t = torch.multinomial(p.to(where), batch, replacement=True, generator=generator).to(p.device) + 1
        weight = 1.0 / (self.T * p[t - 1])
        return t.to(device), weight.to(device, torch.float32)

    # --- training loss (Eq. 6 / Eq. 7 / official / MLM) ---------------------------------------

    def training_loss(self, model_fn: ModelFn, x0: torch.Tensor, loss_name: str = "reweighted_elbo.v1",
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One stochastic estimate of the chosen loss on the batch x0 [B,N], with the ELBO beside it.

        Returns a dict:
            loss:  scalar to backpropagate (mean over the batch, importance weights applied);
            elbo:  scalar, detached: the ELBO estimate of the same batch, bits per token;
            t:     LongTensor[B], the time steps drawn;
            loss_t, elbo_t: [B] detached per-image values before importance weighting, for a
                   loss-by-time-step plot; weight: [B] the importance weights 1/(T p(t)).
        Updates the per-t trackers (importance sampling and the plot's history).
        """
        loss_fn = registry.get("prior_losses", loss_name)
        B, N = x0.shape
        if N != self.n_tokens:
            raise UserError(f"token grids have {N} tokens but the process was built for {self.n_tokens}; "
                            "the latents do not match model.prior.latent_shape")
        t, weight = self.sample_time(B, x0.device, generator)
        x_t, mask = self.q_sample(x0, t, generator)
        ce = masked_cross_entropy(model_fn(x_t), x0, mask)  # [B] nats
        n_masked = mask.sum(1)
        per_image = loss_fn(ce, n_masked, t, self.T, N)  # [B]
        elbo_t = elbo_loss(ce.detach(), n_masked, t, self.T, N)  # [B] bits per token
        self._track(t, elbo_t, per_image.detach())
        return {
            "loss": (weight * per_image).mean(),
            "elbo": (weight * elbo_t).mean(),
            "t": t,
            "loss_t": per_image.detach(),
            "elbo_t": elbo_t,
            "weight": weight,
        }

    def _track(self, t: torch.Tensor, elbo_t: torch.Tensor, loss_t: torch.Tensor) -> None:
        # EMA with factor 0.1 per draw, as the authors' trackers. Vectorised (no host sync): a t
        # drawn c times in one batch moves by 1 - 0.9^c towards the mean of its c values.
        device = t.device
        if self.Lt_history.device != device:
            self._to(device)
        count = torch.zeros_like(self.Lt_count).index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
        seen = count.clamp(min=1.0)
        mean_l2 = torch.zeros_like(self.Lt_history).index_add_(0, t, elbo_t.double().pow(2)) / seen
        mean_loss = torch.zeros_like(self.loss_history).index_add_(0, t, loss_t.double()) / seen
        keep = 0.9 ** count
        self.Lt_history = keep * self.Lt_history + (1.0 - keep) * mean_l2
        self.loss_history = keep * self.loss_history + (1.0 - keep) * mean_loss
        self.Lt_count = self.Lt_count + count

    def _to(self, device: torch.device) -> None:
        self.Lt_history = self.Lt_history.to(device)
        self.Lt_count = self.Lt_count.to(device)
        self.loss_history = self.loss_history.to(device)

    def loss_by_time(self, buckets: int = 10) -> list[dict[str, float]]:
        """The tracked training loss per time-step bucket (the authors' bar plot), oldest t first.

        Each bucket: {"t_lo", "t_hi", "loss"} with loss the mean tracked value over its seen t.
        """
        edges = torch.linspace(1, self.T + 1, buckets + 1).round().long().tolist()
        out = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            if hi <= lo:
                continue
            seen = self.Lt_count[lo:hi] > 0
            value = float(self.loss_history[lo:hi][seen].mean()) if seen.any() else float("nan")
            out.append({"t_lo": lo, "t_hi": hi - 1, "loss": value})
        return out

    # --- state for resume ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The per-t trackers (CPU float64 [T+1]; the authors' buffer names)."""
        return {"Lt_history": self.Lt_history.cpu().clone(), "Lt_count": self.Lt_count.cpu().clone(),
                "loss_history": self.loss_history.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("Lt_history", "Lt_count", "loss_history"):
            if name not in state:
                raise UserError(f"absorbing-process state lacks {name!r}; the trainer state is incomplete")
            value = torch.as_tensor(state[name])
            if value.shape != (self.T + 1,):
                raise UserError(f"absorbing-process state {name} has {value.shape[0] if value.ndim else 0} entries "
                                f"but T = {self.T} needs {self.T + 1}; resume with the same prior_train.T")
            setattr(self, name, value.detach().to(self.Lt_history.device, torch.float64).clone())
        self._ready = None

    # --- the ELBO (Eq. 6; docs/method.md section 6) ---------------------------------------------------

    @torch.no_grad()
    def elbo_full_sum(self, model_fn: ModelFn, x0: torch.Tensor, generator: torch.Generator | None = None,
                      max_rows: int = 256, progress: ProgressFn | None = None) -> torch.Tensor:
        """sum_{t=1..T} (1/t) CE(t) with one masking draw per t, in bits per token. [B,N] -> [B].

        As the authors' `elbo`; several t share a forward pass (up to `max_rows` rows of B images).
        Unbiased for the bound; its spread comes from the one draw per t.
        """
        B, N = x0.shape
        chunk = max(1, max_rows // B)
        total = torch.zeros(B, dtype=torch.float64, device=x0.device)
        if progress:
            progress({"event": "start", "task": "elbo (full sum)", "total": self.T, "unit": "t"})
        for start in range(1, self.T + 1, chunk):
            ts = torch.arange(start, min(start + chunk, self.T + 1), device=x0.device)  # [c]
            c = ts.numel()
            rows = x0.unsqueeze(0).expand(c, B, N).reshape(c * B, N)  # [c*B,N]
            t = ts.repeat_interleave(B)  # [c*B]
            x_t, mask = self.q_sample(rows, t, generator)
            ce = masked_cross_entropy(model_fn(x_t), rows, mask).double()  # [c*B]
            total += (ce / t.double()).view(c, B).sum(0)
            if progress:
                progress({"event": "advance", "task": "elbo (full sum)", "n": c, "metrics": {}})
        if progress:
            progress({"event": "end", "task": "elbo (full sum)", "metrics": {}})
        return (total / (N * LN2)).float()

    @torch.no_grad()
    def elbo_monte_carlo(self, model_fn: ModelFn, x0: torch.Tensor, n_draws: int,
                         generator: torch.Generator | None = None, max_rows: int = 256,
                         progress: ProgressFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard error over `n_draws` single-t estimates T/t CE(t), t ~ U{1..T}. -> ([B], [B]).

        Bits per token. Each draw is an unbiased estimate of the same bound as the full sum.
        """
        if n_draws < 2:
            raise UserError(f"the Monte-Carlo ELBO needs at least 2 draws for a standard error, got {n_draws}")
        B, N = x0.shape
        draws = torch.empty(n_draws, B, dtype=torch.float64, device=x0.device)
        per_pass = max(1, max_rows // B)
        if progress:
            progress({"event": "start", "task": "elbo (monte carlo)", "total": n_draws, "unit": "draw"})
        for start in range(0, n_draws, per_pass):
            c = min(per_pass, n_draws - start)
            rows = x0.unsqueeze(0).expand(c, B, N).reshape(c * B, N)  # [c*B,N]
            t = _uniform_times(c * B, self.T, generator, x0.device)
            x_t, mask = self.q_sample(rows, t, generator)
            ce = masked_cross_entropy(model_fn(x_t), rows, mask).double()  # [c*B]
            draws[start:start + c] = (self.T / t.double() * ce).view(c, B) / (N * LN2)
            if progress:
                progress({"event": "advance", "task": "elbo (monte carlo)", "n": c, "metrics": {}})
        if progress:
            progress({"event": "end", "task": "elbo (monte carlo)", "metrics": {}})
        mean = draws.mean(0)
        stderr = draws.std(0, unbiased=True) / math.sqrt(n_draws)
        return mean.float(), stderr.float()


@register("processes", "absorbing.v1")
def build_absorbing(prior, train) -> AbsorbingDiffusion:
    """prior_train.process: absorbing.v1 (the paper's; the default) with T, masking and time sampling."""
    return AbsorbingDiffusion(n_tokens=prior.n_tokens, codebook_size=prior.codebook_size, T=train.diffusion_steps(prior),
                              masking=train.masking, time_sampling=train.time_sampling)


# ---------------------------------------------------------------------------------------------
# Functional forms of the ELBO estimators (for `uvq eval elbo`)
# ---------------------------------------------------------------------------------------------


def _mask_id_of(model_fn: ModelFn, mask_id: int | None) -> int:
    if mask_id is not None:
        return mask_id
    found = getattr(model_fn, "mask_id", None)
    if found is None:
        raise ValueError("pass mask_id (the codebook size K) for a model_fn that has no .mask_id")
    return int(found)


def elbo_full_sum(model_fn: ModelFn, x0: torch.Tensor, generator: torch.Generator | None = None,
                  T: int | None = None, *, mask_id: int | None = None, masking: str = "random",
                  max_rows: int = 256, progress: ProgressFn | None = None) -> torch.Tensor:
    """Bits per token per image [B] by the full sum over t (see AbsorbingDiffusion.elbo_full_sum)."""
    process = AbsorbingDiffusion(x0.shape[1], _mask_id_of(model_fn, mask_id), T=T, masking=masking)
    return process.elbo_full_sum(model_fn, x0, generator, max_rows=max_rows, progress=progress)


def elbo_monte_carlo(model_fn: ModelFn, x0: torch.Tensor, n_draws: int, generator: torch.Generator | None = None,
                     T: int | None = None, *, mask_id: int | None = None, masking: str = "random",
                     max_rows: int = 256, progress: ProgressFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B], stderr [B]) in bits per token from single-t draws (see AbsorbingDiffusion.elbo_monte_carlo)."""
    process = AbsorbingDiffusion(x0.shape[1], _mask_id_of(model_fn, mask_id), T=T, masking=masking)
    return process.elbo_monte_carlo(model_fn, x0, n_draws, generator, max_rows=max_rows, progress=progress)
