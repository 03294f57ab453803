"""The autoregressive baseline's process over VQGAN tokens (paper section 4.2, Table 4; docs/method.md section 9).

The paper compares the absorbing prior with an autoregressive prior that uses the same transformer
with causal attention over the raster order of the code grid. Its likelihood factorises exactly,

    log p_theta(x) = sum_{i=1..N} log p_theta(x_i | x_<i),

so its training loss is the next-token cross-entropy and its negative log-likelihood is exact: no
bound, no time step and no estimator noise (the per-image figure has no standard error).

Like `uvq.prior.absorbing.AbsorbingDiffusion`, the process is an object apart from the network
and calls it only through `model_fn(x: LongTensor[B,N]) -> logits[B,N,K]`, where a causal network
(`uvq.prior.model`, `causal=True`) makes logits[:, i] a function of x[:, :i] only. Figures leave
this module in bits per token (nats / (N ln 2)), the unit of the absorbing ELBO, so that the two
priors compare in one table. The token-by-token sampler is `uvq.sampling.autoregressive`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from uvq.registry import register
from uvq.runtime import UserError

ModelFn = Callable[[torch.Tensor], torch.Tensor]
LN2 = math.log(2.0)

NAME = "autoregressive.v1"


def next_token_nll(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """sum_i -log softmax(logits[:, i])[x0[:, i]] in nats: logits [B,N,K], x0 [B,N] -> [B]."""
    B, N, K = logits.shape
    ce = F.cross_entropy(logits.reshape(B * N, K).float(), x0.reshape(B * N), reduction="none")  # [B*N]
    return ce.view(B, N).sum(1)  # [B]


class AutoregressiveProcess:
    """Raster-order autoregression over N tokens with codebook size K (the paper's AR baseline).

    The network must be causal; the process checks it once per call, because a bidirectional
    network would see the token it predicts and report a meaningless, near-zero NLL.
    """

    exact = True  # the likelihood is exact: validation and `eval elbo` report the NLL itself
    likelihood = "nll"  # the name of the figure in logs and reports

    def __init__(self, n_tokens: int, codebook_size: int) -> None:
        if n_tokens < 1 or codebook_size < 1:
            raise ValueError("n_tokens and codebook_size must be positive")
        self.n_tokens = n_tokens
        self.codebook_size = codebook_size

    def _check(self, model_fn: ModelFn, x0: torch.Tensor) -> None:
        net = getattr(model_fn, "module", model_fn)  # DistributedDataParallel wraps the network
        if not getattr(net, "causal", False):
            raise UserError(f"the {NAME} process needs a causal prior network (model.prior.causal: true)")
        if x0.shape[1] != self.n_tokens:
            raise UserError(f"token grids have {x0.shape[1]} tokens but the process was built for {self.n_tokens}; "
                            "the latents do not match model.prior.latent_shape")

    # --- training loss: the exact NLL, next-token cross-entropy ------------------------------------

    def training_loss(self, model_fn: ModelFn, x0: torch.Tensor, loss_name: str | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The mean NLL of the batch x0 [B,N] in bits per token, as `loss` and (detached) as `elbo`.

        The keys match `AbsorbingDiffusion.training_loss` so that `fit-prior` logs both processes
        alike; here the bound is the likelihood itself. `loss_name` and `generator` are unused
        (no loss weighting and no randomness: the same batch gives the same loss).
        """
        self._check(model_fn, x0)
        per_image = next_token_nll(model_fn(x0), x0) / (self.n_tokens * LN2)  # [B] bits per token
        loss = per_image.mean()
        return {"loss": loss, "elbo": loss.detach(), "nll_t": per_image.detach()}

    # --- the exact likelihood (validation, `uvq eval elbo`) ---------------------------------------

    @torch.no_grad()
    def nll(self, model_fn: ModelFn, x0: torch.Tensor) -> torch.Tensor:
        """-log2 p_theta(x0) / N per image, exact: x0 [B,N] -> [B] bits per token (float32)."""
        self._check(model_fn, x0)
        return (next_token_nll(model_fn(x0), x0).double() / (self.n_tokens * LN2)).float()

    # --- state for resume: none (no trackers) -----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise UserError(f"the trainer state holds absorbing-process trackers ({', '.join(sorted(state))}) but the "
                            f"recipe's prior_train.process is {NAME}; resume with the process the run was started with")


@register("processes", NAME)
def build_autoregressive(prior, train) -> AutoregressiveProcess:
    """prior_train.process: autoregressive.v1 (prior_train.loss, masking, time_sampling and T do not apply)."""
    return AutoregressiveProcess(n_tokens=prior.n_tokens, codebook_size=prior.codebook_size)


def process_name(meta: dict[str, Any]) -> str:
    """The process a prior checkpoint was trained with, from its embedded recipe (absorbing.v1 when
    the recipe predates prior_train.process)."""
    return ((meta.get("config") or {}).get("prior_train") or {}).get("process") or "absorbing.v1"


def refuse_autoregressive(command: str, *, meta: dict[str, Any] | None = None, prior: Any = None) -> None:
    """One clear line when `command` (upscale-canvas, inpaint) is given an autoregressive prior,
    named by its checkpoint `meta` or given as the network `prior`."""
    causal = bool(getattr(prior, "causal", False))
    if meta is not None:
        causal = causal or process_name(meta) == NAME or bool((meta.get("model_config") or {}).get("causal"))
    if causal:
        what = (meta or {}).get("path") or "this prior"
        raise UserError(f"{command} needs an absorbing prior, but {what} is autoregressive: it conditions only on "
                        "earlier raster positions, so it cannot fill a region that has known tokens after it (paper "
                        "section 4.5); use a prior trained with prior_train.process: absorbing.v1")


__all__ = ["AutoregressiveProcess", "NAME", "build_autoregressive", "next_token_nll", "process_name",
           "refuse_autoregressive"]
