"""Sampling the autoregressive baseline token by token in raster order (paper section 4.2; docs/method.md section 9).

For i = 0 .. N-1 the value of position i is drawn from softmax(filter(logits_i / temp)), where
logits_i is the causal network's output at i, a function of the tokens before i only. With the
KV cache (`cache=True`, the default) each step feeds one token through the network and attends to
the cached keys and values of the earlier ones (taming-transformers' sampler does the same); the
uncached reference runs the whole grid through the network at every step and reads position i.
Both make the same draws, so they give the same tokens (a test checks it).

Randomness: sample i's draws are one `SampleRNG.rand(N)` call, u[:, i] drawing position i through
`uvq.sampling.chain.categorical`, so a fixed seed gives the same samples whatever the batch size.
Positions of x that already hold a code are kept (and conditioned on by later positions); the
sampler reveals every mask id, in raster order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from uvq.runtime import amp_context
from uvq.sampling.chain import (
    ChainStep,
    Filter,
    SampleRNG,
    categorical,
    check_temp,
)


def autoregressive_chain(prior: torch.nn.Module, x: torch.Tensor, *, temp: float, rng: SampleRNG,
                         filter: Filter | None = None, cache: bool = True, device: torch.device | None = None,
                         precision: str = "fp32") -> Iterator[ChainStep]:
    """Raster-order sampling from a causal prior, one position per step.

    x: LongTensor[B, N] with codes at known positions and the mask id K elsewhere.
    Yields a ChainStep per position i (t = N - i counts down to 1); `network_passes` counts the
    rows sent through the network (one token each with the cache, N without).
    """
    if not getattr(prior, "causal", False):
        raise ValueError("autoregressive_chain needs a causal prior (model.prior.causal: true)")
    check_temp(temp)
    B, N = x.shape
    if len(rng) != B:
        raise ValueError(f"rng has {len(rng)} rows but x has {B}")
    k = prior.mask_id
    if int(x.min()) < 0 or int(x.max()) > k:
        raise ValueError(f"tokens must lie in [0, mask_id={k}]")
    device = device or x.device
    u = rng.rand(N)  # [B, N]: u[:, i] draws position i
    kv = prior.new_cache() if cache else None
    inputs = torch.full((B, 1), k, dtype=torch.long, device=x.device)  # the start token
    passes = calls = 0
    for i in range(N):
        with amp_context(device, precision):
            if kv is not None:
                logits = prior.forward_cached(inputs, kv)[:, -1]  # [B, K]
            else:
                logits = prior(x)[:, i]  # [B, K]: a function of x[:, :i] only
        passes, calls = passes + B, calls + 1
        revealed = torch.zeros_like(x, dtype=torch.bool)
        revealed[:, i] = x[:, i] == k  # [B, N]
        rows = revealed[:, i]
        x = x.clone()
        if bool(rows.any()):
            chosen = logits[rows].float() / temp  # [M, K]
            if filter is not None:
                chosen = filter(chosen)
            x[rows, i] = categorical(chosen, u[rows, i])
        inputs = x[:, i:i + 1]  # [B, 1]: the input of position i + 1
        yield ChainStep(t=N - i, x=x, revealed=revealed, network_passes=passes, predict_calls=calls)


def autoregressive_tokens(prior: torch.nn.Module, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict[str, int]]:
    """Run `autoregressive_chain` to the end: (tokens [B, N], {"network_passes", "predict_calls", "steps"})."""
    last, steps = None, 0
    for step in autoregressive_chain(prior, x, **kwargs):
        last, steps = step, steps + 1
    if last is None:
        return x.clone(), {"network_passes": 0, "predict_calls": 0, "steps": 0}
    return last.x, {"network_passes": last.network_passes, "predict_calls": last.predict_calls, "steps": steps}


__all__ = ["autoregressive_chain", "autoregressive_tokens"]
