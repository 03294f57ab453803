"""Sampling from the absorbing prior (docs/method.md section 3; paper section 4.2.1).

The paper's sampler starts from a grid of mask tokens and, for t = S, S-1, ..., 1, reveals every
still-masked position with probability 1/t, drawing its value from softmax(logits / temperature)
of p_theta(x_0 | x_t). The network is not conditioned on t, so a step that reveals nothing in a
sample leaves that sample unchanged and needs no network pass: only the rows that reveal
something are sent through the network. This gives exactly the samples of the authors' loop
(which runs the network every step) with about 1/e fewer passes at S = T = N.

Layers, top to bottom:
    SampleRNG        per-sample counter-based randomness (batch-size invariant)
    filters          top-k / top-p on logits
    absorbing_chain  the paper's sampler as a step-by-step generator (the one unmasking step)
    maskgit_chain    most-confident-first with a cosine schedule (an extension, never default)
    remask_chain     the authors' re-masking sampler, their `sample_mlm` (an extension)
    halton_chain     reveal in 2-D Halton order, Halton-MaskGIT's schedule (an extension)
    samplers         the registry entries, one signature
    sample_tokens / iter_samples / sample_images   the final-result calls

Sampling, inpainting (uvq.sampling.inpaint) and the big canvas (uvq.sampling.canvas) all run `absorbing_chain` on a
token grid in which unknown positions hold the mask id.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from uvq.config import TEMP_MAX, TEMP_MIN
from uvq.progress import ProgressFn, null_progress
from uvq.registry import register, registry
from uvq.runtime import UserError, amp_context

Predict = Callable[[torch.Tensor], torch.Tensor]
Filter = Callable[[torch.Tensor], torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Per-sample randomness
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2**32).

    Shifts follow the "lowbias32" finaliser (Chris Wellons' hash prospector), a murmur3-fmix32
    style avalanche. Both multipliers are odd and below 2**31, so a product of a 32-bit value
    never overflows int64; masking keeps the exact low word, the same on every device.
    """
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x31848BAB) & _MASK32
    return h ^ (h >> 16)


class SampleRNG:
    """Uniform draws for a batch of samples, where sample i's draws depend only on (seed, i, counter).

    Each call of `rand` is one draw per sample; the counter counts calls. Element j of sample i in
    call c is hash(seed, i, c, j), a counter-based scheme in the spirit of Philox (Salmon et al.
    2011) computed with batched integer ops, so a fixed seed gives the same images whatever the
    batch size or the order in which samples are batched, on any device, with no per-sample
    generator objects.
    """

    def __init__(self, seed: int, sample_ids: Sequence[int] | torch.Tensor, device: str | torch.device = "cpu",
                 *, _counter: int = 0) -> None:
        self.seed = int(seed)
        self.device = torch.device(device)
        ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1).to(self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > _MASK32):
            raise UserError("sample ids must lie in [0, 2**32)")
        self.sample_ids = ids
        self.counter = _counter
        lo, hi = self.seed & _MASK32, (self.seed >> 32) & _MASK32
        key = mix32(torch.full_like(ids, lo) ^ 0x9E3779B9)
        key = mix32(key ^ hi)
        self._keys = mix32(key ^ ids)  # [B], one stream key per sample
        self._index: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.sample_ids.numel())

    def rand(self, *tail: int) -> torch.Tensor:
        """DoubleTensor[B, *tail] uniform in [0, 1) with 53-bit resolution; advances the counter.

        Two 32-bit hashes per element: the top 24 bits of the first and the top 29 of the second make
        the 53 bits of a double's mantissa, so every double in k * 2**-53 is equally likely (the
        standard 53-bit construction, e.g. numpy's random_standard_uniform). The first hash alone gave
        the 24-bit uniforms of earlier versions, which are these values rounded down to 2**-24.
        """
        n = math.prod(tail)
        if self._index is None or self._index.numel() != n:
            self._index = torch.arange(n, device=self.device, dtype=torch.int64)
        c = self.counter
        self.counter += 1
        call_key = mix32(self._keys ^ ((c * 0x85EBCA6B + 0x27D4EB2F) & _MASK32))  # [B]
        high = self._hash(call_key)  # [B, n]
        low = self._hash(mix32(call_key ^ 0x68E31DA4))  # [B, n], an independent second stream
        bits = (high >> 8) * (1 << 29) + (low >> 3)  # [B, n] integers below 2**53, exact in float64
        return (bits.to(torch.float64) * (1.0 / (1 << 53))).reshape(len(self), *tail)

    def _hash(self, call_key: torch.Tensor) -> torch.Tensor:
        """32-bit hashes [B, n] of (call key, element index)."""
        h = mix32((call_key[:, None] + self._index[None, :] * 0x632BE5AB) & _MASK32)  # [B, n]
        return mix32(h ^ call_key[:, None])

    def select(self, index: torch.Tensor | Sequence[int]) -> SampleRNG:
        """A SampleRNG over a subset of the rows (row indices or a BoolTensor), at the same counter."""
        index = torch.as_tensor(index, device=self.device)
        return SampleRNG(self.seed, self.sample_ids[index], self.device, _counter=self.counter)


# ---------------------------------------------------------------------------------------------
# Filters on logits (extensions: top-k as in Fan et al. 2018, nucleus top-p as in Holtzman et al. 2020)
# ---------------------------------------------------------------------------------------------


def top_k_filter(k: int) -> Filter:
    """Keep the k largest logits of each row; the rest become -inf."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"top_k must be an integer >= 1 (got {k!r})")

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if k >= logits.shape[-1]:
            return logits
        kth = logits.topk(k, dim=-1).values[..., -1:]  # [M, 1]
        return logits.masked_fill(logits < kth, float("-inf"))

    return apply


def top_p_filter(p: float) -> Filter:
    """Keep the smallest set of most likely values whose probability reaches p (at least one)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise UserError(f"top_p must be a number in (0, 1] (got {p!r})")

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if p >= 1.0:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a value when the mass before it already reaches p, so the first one always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))

    return apply


def make_filter(top_k: int | None = None, top_p: float | None = None) -> Filter | None:
    """Compose the filters asked for (top-k first, then top-p), or None."""
    filters = [f for f in (top_k_filter(top_k) if top_k is not None else None,
                           top_p_filter(top_p) if top_p is not None else None) if f]
    if not filters:
        return None
    if len(filters) == 1:
        return filters[0]

    def apply(logits: torch.Tensor) -> torch.Tensor:
        for f in filters:
            logits = f(logits)
        return logits

    return apply


# ---------------------------------------------------------------------------------------------
# The categorical draw
# ---------------------------------------------------------------------------------------------


def categorical(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw from softmax(logits) by inverting the CDF at u: logits [M,K], u [M] in [0,1) -> [M] long.

    One uniform per token (instead of K Gumbel draws) keeps the draw cheap and tied to our
    per-sample counter. Values of probability zero (filtered to -inf) are never drawn.

    Exact to double precision (docs/sampling.md, "Exact draws"): the softmax, the cumulative sum
    and the comparison run in float64 on 53-bit uniforms. A float32 CDF cannot resolve steps below
    its spacing near 1 (2**-24, about 6e-8), so codes rarer than that were never drawn and the tail
    was under-sampled (Zheng et al., ICLR 2025); in float64 the cumulative sum of K terms is off by
    at most about K * 2**-53 (1e-13 for K = 1024), far below any probability a sample can show.
    """
    probs = logits.double().softmax(-1)  # [M, K]
    cdf = probs.cumsum(-1)  # [M, K]
    total = cdf[:, -1:].contiguous()  # [M, 1]
    idx = torch.searchsorted(cdf, u.double()[:, None] * total, right=True)  # [M, 1]
    last = torch.searchsorted(cdf, total, right=False)  # the last value of non-zero probability
    return torch.minimum(idx, last).squeeze(1)


# ---------------------------------------------------------------------------------------------
# The absorbing chain (docs/method.md section 3)
# ---------------------------------------------------------------------------------------------


@dataclass
class ChainStep:
    """One step of a chain. `x` is a new tensor at every step (safe to keep)."""

    t: int  # the step just taken (counts down to 1)
    x: torch.Tensor  # LongTensor[B, N], tokens after this step
    revealed: torch.Tensor  # BoolTensor[B, N], positions revealed at this step
    network_passes: int  # cumulative sample-rows sent through `predict` (a call on b rows counts b)
    predict_calls: int = 0  # cumulative calls of `predict`


def _check_chain_args(x: torch.Tensor, *, mask_id: int, steps: int, temp: float, rng: SampleRNG,
                      t_start: int | None) -> int:
    if x.ndim != 2 or x.dtype != torch.long:
        raise ValueError(f"x must be a LongTensor[B, N], got {tuple(x.shape)} {x.dtype}")
    if steps < 1:
        raise UserError(f"--steps must be >= 1 (got {steps})")
    check_temp(temp)
    if len(rng) != x.shape[0]:
        raise ValueError(f"rng has {len(rng)} rows but x has {x.shape[0]}")
    t_start = steps if t_start is None else int(t_start)
    if not 1 <= t_start <= steps:
        raise UserError(f"t_start must be in [1, steps={steps}] (got {t_start})")
    if int(x.min()) < 0 or int(x.max()) > mask_id:
        raise ValueError(f"tokens must lie in [0, mask_id={mask_id}]")
    return t_start


def _predict_rows(predict: Predict, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run `predict` on the rows that need it; returns (logits of those rows [b,N,K], b)."""
    if bool(rows.all()):
        return predict(x), x.shape[0]
    sub = x[rows]  # [b, N]
    return predict(sub), sub.shape[0]


def _chosen_logits(predict: Predict, x: torch.Tensor, where: torch.Tensor, rows: torch.Tensor, temp: float,
                   filter: Filter | None) -> tuple[torch.Tensor, int]:
    """The tempered (and filtered) logits of the positions `where` [B,N] of x, from one pass over
    the rows that hold any: ([M,K] in the order of `where`'s True entries, rows predicted)."""
    logits, b = _predict_rows(predict, x, rows)  # [b, N, K]
    chosen = logits[where[rows]].float() / temp  # [M, K]
    return (filter(chosen) if filter is not None else chosen), b


def absorbing_chain(x: torch.Tensor, predict: Predict, *, mask_id: int, steps: int, temp: float,
                    rng: SampleRNG, t_start: int | None = None, order: str = "random",
                    filter: Filter | None = None) -> Iterator[ChainStep]:
    """The paper's sampler, one step per iteration.

    x: LongTensor[B, N], known tokens and `mask_id` at unknown positions (known tokens never change).
    predict: x[b, N] -> logits or log-probabilities [b, N, K] of p_theta(x_0 | x).
    For t = t_start (default `steps`) down to 1 each masked position is revealed with probability
    1/t (order="random"; at t = 1 all that is left), or the first ceil(masked / t) masked positions
    in raster order (order="raster": one per step when steps equals the number masked, the authors'
    canvas sampler). Revealed values are drawn from softmax(filter(predict(x) / temp)).

    Exact reuse: the draws of a step are made whatever happens, but `predict` runs only on the
    rows that reveal something at that step; a row that reveals nothing is unchanged, and its
    network output (which does not depend on t) would not be used. So the samples equal those of
    the authors' loop, which runs the network on every row at every step, for the same draws.
    """
    t_start = _check_chain_args(x, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start)
    if order not in ("random", "raster"):
        raise UserError(f"order must be 'random' or 'raster', not {order!r}")
    n = x.shape[1]
    passes = calls = 0
    for t in range(t_start, 0, -1):
        masked = x == mask_id  # [B, N]
        u_reveal = rng.rand(n)  # [B, N], drawn every step so draws never depend on what happened
        u_value = rng.rand(n)  # [B, N]
        if order == "random":
            revealed = masked & (u_reveal < 1.0 / t)
        else:
            remaining = masked.sum(1, keepdim=True)  # [B, 1]
            quota = (remaining + t - 1) // t  # ceil(remaining / t)
            revealed = masked & (masked.cumsum(1) <= quota)
        rows = revealed.any(1)  # [B]
        if bool(rows.any()):
            chosen, b = _chosen_logits(predict, x, revealed, rows, temp, filter)  # [M, K], M = revealed positions
            passes, calls = passes + b, calls + 1
            values = categorical(chosen, u_value[revealed])  # [M]
            x = x.masked_scatter(revealed, values)
        else:
            x = x.clone()
        yield ChainStep(t=t, x=x, revealed=revealed, network_passes=passes, predict_calls=calls)


def run_chain(x: torch.Tensor, predict: Predict, *, sampler: str | Callable | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, dict[str, int]]:
    """Run a chain to the end: (x_final [B,N], {"network_passes", "predict_calls", "steps"}).

    Without `sampler` this takes absorbing_chain's arguments (mask_id, steps, temp, rng, t_start,
    order, filter); with a registry name or a sampler callable, that sampler's.
    """
    if sampler is None:
        fn = absorbing_chain
    else:
        fn = registry.get("samplers", sampler) if isinstance(sampler, str) else sampler
    last = None
    n_steps = 0
    for step in fn(x, predict, **kwargs):
        last, n_steps = step, n_steps + 1
    if last is None:
        return x.clone(), {"network_passes": 0, "predict_calls": 0, "steps": 0}
    return last.x, {"network_passes": last.network_passes, "predict_calls": last.predict_calls, "steps": n_steps}


# ---------------------------------------------------------------------------------------------
# Most-confident-first with a cosine schedule (MaskGIT, Chang et al. 2022): an extension
# ---------------------------------------------------------------------------------------------


def maskgit_chain(x: torch.Tensor, predict: Predict, *, mask_id: int, steps: int, temp: float,
                  rng: SampleRNG, t_start: int | None = None, choice_temp: float = 4.5,
                  filter: Filter | None = None) -> Iterator[ChainStep]:
    """MaskGIT's iterative decoding: draw every masked token, keep the most confident.

    At iteration s (of `steps`; t = steps - s counts down) each masked position gets a value from
    softmax(logits / temp); its confidence is log p(value) + choice_temp * (1 - r) * Gumbel noise,
    r = (s+1)/steps (the annealed "choice temperature" of MaskGIT's code). The least confident
    stay masked so that the masked count follows n0 * cos(pi/2 * r) (rescaled when starting from
    t_start < steps); at least one position is revealed per step and none is left at the end.
    """
    t_start = _check_chain_args(x, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start)
    n = x.shape[1]
    n0 = (x == mask_id).sum(1)  # [B]
    s0 = steps - t_start
    scale0 = math.cos(math.pi / 2 * s0 / steps)
    passes = calls = 0
    for s in range(s0, steps):
        t = steps - s
        masked = x == mask_id  # [B, N]
        u_value = rng.rand(n)  # [B, N]
        u_choice = rng.rand(n).clamp_min(2.0 ** -25)  # [B, N], kept away from 0 for the Gumbel log
        rows = masked.any(1)
        if not bool(rows.any()):
            yield ChainStep(t=t, x=x.clone(), revealed=torch.zeros_like(masked), network_passes=passes,
                            predict_calls=calls)
            continue
        chosen, b = _chosen_logits(predict, x, masked, rows, temp, filter)  # [M, K]
        passes, calls = passes + b, calls + 1
        values = categorical(chosen, u_value[masked])  # [M]
        logp = chosen.log_softmax(-1).gather(1, values[:, None]).squeeze(1)  # [M]
        r = (s + 1) / steps
        gumbel = -torch.log(-torch.log(u_choice[masked]))
        confidence = torch.full(masked.shape, float("inf"), device=x.device, dtype=gumbel.dtype)  # float64 draws
        confidence[masked] = logp + choice_temp * (1.0 - r) * gumbel
        keep_masked = torch.floor(n0 * (math.cos(math.pi / 2 * r) / scale0)).long()  # [B]
        keep_masked = torch.minimum(keep_masked, (masked.sum(1) - 1).clamp_min(0))
        rank = confidence.argsort(1).argsort(1)  # [B, N], 0 = least confident
        revealed = masked & (rank >= keep_masked[:, None])
        proposal = x.masked_scatter(masked, values)
        x = torch.where(revealed, proposal, x)
        yield ChainStep(t=t, x=x, revealed=revealed, network_passes=passes, predict_calls=calls)


# ---------------------------------------------------------------------------------------------
# The authors' re-masking sampler (their `sample_mlm`, samb-t/unleashing-transformers): an extension
# ---------------------------------------------------------------------------------------------


def remask_times(steps: int, T: int) -> list[int]:
    """The authors' evenly spaced times, largest first: int(linspace(1, T, steps)) reversed (may repeat).

    Computed as numpy.linspace does (i * step + 1 in float64, the last one exactly T), so the
    truncation to integers is the same as in their code.
    """
    if steps == 1:
        return [1]
    step = (T - 1) / (steps - 1)
    return [T] + [int(i * step + 1.0) for i in range(steps - 2, -1, -1)]


def remask_chain(x: torch.Tensor, predict: Predict, *, mask_id: int, steps: int, temp: float, rng: SampleRNG,
                 t_start: int | None = None, T: int | None = None, filter: Filter | None = None
                 ) -> Iterator[ChainStep]:
    """Re-masking over evenly spaced t: every unknown token is re-drawn at every step.

    x: LongTensor[B, N], known tokens and `mask_id` at unknown positions (known tokens never change).
    The times are tau_1 > ... > tau_S, int(linspace(1, T, S)) largest first (T default N). At step s
    each unknown position is masked again with probability tau_s / T (still-masked positions stay
    masked), and every masked position is drawn from softmax(filter(predict(x_masked) / temp)).
    The first step draws every unknown position, so later steps only re-draw: `revealed` is the
    first step's draw. t_start < steps runs the last t_start times. A row that masks nothing at a
    step is unchanged and skips the network; the draws are made whatever happens, so the tokens
    equal the authors' loop (uvq.interop.reference.authors_mlm_loop) for the same draws.
    """
    t_start = _check_chain_args(x, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start)
    n = x.shape[1]
    T = n if T is None else int(T)
    unknown = x == mask_id  # [B, N], the positions this chain may change
    passes = calls = 0
    for t, tau in zip(range(t_start, 0, -1), remask_times(steps, T)[steps - t_start:], strict=True):
        u_mask = rng.rand(n)  # [B, N]
        u_value = rng.rand(n)  # [B, N]
        masked = (x == mask_id) | (unknown & (u_mask < tau / T))  # [B, N], x_t of q(x_t | x_0)
        rows = masked.any(1)  # [B]
        if bool(rows.any()):
            x_t = x.masked_fill(masked, mask_id)
            chosen, b = _chosen_logits(predict, x_t, masked, rows, temp, filter)  # [M, K]
            passes, calls = passes + b, calls + 1
            new = x.masked_scatter(masked, categorical(chosen, u_value[masked]))
        else:
            new = x.clone()
        revealed = (x == mask_id) & (new != mask_id)
        x = new
        yield ChainStep(t=t, x=x, revealed=revealed, network_passes=passes, predict_calls=calls)


# ---------------------------------------------------------------------------------------------
# Halton ordering (Besnier et al. 2025, "Halton Scheduler for Masked Generative Image Transformer",
# valeoai/Halton-MaskGIT): an extension
# ---------------------------------------------------------------------------------------------


def _radical_inverse(i: int, base: int) -> tuple[int, int]:
    """The van der Corput radical inverse of i in `base` as an exact fraction (numerator, denominator)."""
    num, den = 0, 1
    while i > 0:
        i, digit = divmod(i, base)
        num, den = num * base + digit, den * base
    return num, den


@functools.lru_cache(maxsize=16)
def halton_order(h: int, w: int) -> torch.Tensor:
    """The grid's positions in Halton order: LongTensor[h*w], a permutation of 0..h*w-1 (raster index).

    Point i = 1, 2, ... of the 2-D Halton sequence (bases 2 and 3) falls in cell
    (floor(phi_2(i) * h), floor(phi_3(i) * w)); a cell is taken at its first point, until every cell
    has one (the construction of Halton-MaskGIT's mask, computed in exact integers). The first k
    cells spread over the grid with low discrepancy: every region gets about its share.
    """
    if h < 1 or w < 1:
        raise ValueError(f"the grid must be at least 1x1 (got {h}x{w})")
    seen: dict[int, None] = {}
    i = 0
    while len(seen) < h * w:
        i += 1
        (n2, d2), (n3, d3) = _radical_inverse(i, 2), _radical_inverse(i, 3)
        seen.setdefault((n2 * h // d2) * w + n3 * w // d3)
    return torch.tensor(list(seen), dtype=torch.long)


def _grid_of(n: int, shape: Sequence[int] | None) -> tuple[int, int]:
    if shape is None:
        side = math.isqrt(n)
        if side * side != n:
            raise UserError(f"halton.v1 needs the grid's shape for {n} tokens (not a square): set options.shape=[h, w]")
        return side, side
    h, w = (int(v) for v in shape)
    if h * w != n:
        raise UserError(f"options.shape {h}x{w} does not hold the chain's {n} tokens")
    return h, w


def halton_chain(x: torch.Tensor, predict: Predict, *, mask_id: int, steps: int, temp: float, rng: SampleRNG,
                 t_start: int | None = None, shape: Sequence[int] | None = None,
                 filter: Filter | None = None) -> Iterator[ChainStep]:
    """Reveal the unknown positions in Halton order, with Halton-MaskGIT's arccos schedule.

    x: LongTensor[B, N] on an h x w grid (`shape`, default square), `mask_id` at unknown positions.
    After step s of S (s = 1..S) the first r_s unknown positions in Halton order (halton_order) are
    revealed, r_s = max(s, floor(n0 * (1 - arccos(s/S) / (pi/2)))) clamped to n0, the row's number
    of unknown positions (from t_start < steps, the remaining fraction is rescaled to start at n0).
    Revealed values are drawn from softmax(filter(predict(x) / temp)); a row that reveals nothing
    at a step skips the network. The order is fixed, so the only randomness is the values.
    """
    t_start = _check_chain_args(x, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start)
    n = x.shape[1]
    order = halton_order(*_grid_of(n, shape)).to(x.device)  # [N], positions in Halton order
    unknown = x == mask_id  # [B, N]
    n0 = unknown.sum(1)  # [B]
    rank = torch.empty_like(unknown, dtype=torch.long)  # [B, N], rank among the row's unknown positions
    rank[:, order] = unknown[:, order].long().cumsum(1) - 1

    def done(s: int) -> float:  # Halton-MaskGIT's revealed fraction after step s of S
        return 1.0 - math.acos(s / steps) / (math.pi / 2)

    s0 = steps - t_start
    before = done(s0)
    passes = calls = 0
    prev = torch.zeros_like(n0)
    for s in range(s0 + 1, steps + 1):
        fraction = 1.0 if s == steps else (done(s) - before) / (1.0 - before)
        count = torch.floor(n0 * fraction).long().clamp_min(s - s0).minimum(n0)  # [B]
        u_value = rng.rand(n)  # [B, N]
        revealed = unknown & (rank >= prev[:, None]) & (rank < count[:, None])  # [B, N]
        prev = count
        rows = revealed.any(1)
        if bool(rows.any()):
            chosen, b = _chosen_logits(predict, x, revealed, rows, temp, filter)  # [M, K]
            passes, calls = passes + b, calls + 1
            x = x.masked_scatter(revealed, categorical(chosen, u_value[revealed]))
        else:
            x = x.clone()
        yield ChainStep(t=steps - s + 1, x=x, revealed=revealed, network_passes=passes, predict_calls=calls)


# ---------------------------------------------------------------------------------------------
# Registered samplers: sampler(x, predict, *, mask_id, steps, temp, rng, t_start=None, **options)
# ---------------------------------------------------------------------------------------------


@register("samplers", "absorbing.v1")
def absorbing_sampler(x, predict, *, mask_id, steps, temp, rng, t_start=None, order="random",
                      top_k=None, top_p=None) -> Iterator[ChainStep]:
    """The paper's sampler (the default): random order, reveal probability 1/t, step skipping."""
    return absorbing_chain(x, predict, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start,
                           order=order, filter=make_filter(top_k, top_p))


@register("samplers", "absorbing_top_k.v1")
def absorbing_top_k_sampler(x, predict, *, mask_id, steps, temp, rng, t_start=None, top_k=50,
                            order="random") -> Iterator[ChainStep]:
    """The paper's sampler with values drawn from the k most likely codes only (an extension)."""
    return absorbing_chain(x, predict, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start,
                           order=order, filter=top_k_filter(top_k))


@register("samplers", "absorbing_top_p.v1")
def absorbing_top_p_sampler(x, predict, *, mask_id, steps, temp, rng, t_start=None, top_p=0.9,
                            order="random") -> Iterator[ChainStep]:
    """The paper's sampler with nucleus (top-p) filtering of the values (an extension)."""
    return absorbing_chain(x, predict, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start,
                           order=order, filter=top_p_filter(top_p))


@register("samplers", "maskgit_cosine.v1")
def maskgit_cosine_sampler(x, predict, *, mask_id, steps, temp, rng, t_start=None, choice_temp=4.5,
                           top_k=None, top_p=None) -> Iterator[ChainStep]:
    """Most-confident-first with a cosine schedule and annealed choice temperature (MaskGIT)."""
    return maskgit_chain(x, predict, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start,
                         choice_temp=choice_temp, filter=make_filter(top_k, top_p))


@register("samplers", "remask.v1")
def remask_sampler(x, predict, *, mask_id, steps, temp, rng, t_start=None, T=None, top_k=None,
                   top_p=None) -> Iterator[ChainStep]:
    """The authors' re-masking sampler (`sample_mlm`): over evenly spaced t, every token re-drawn."""
    return remask_chain(x, predict, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start, T=T,
                        filter=make_filter(top_k, top_p))


@register("samplers", "halton.v1")
def halton_sampler(x, predict, *, mask_id, steps, temp, rng, t_start=None, shape=None, top_k=None,
                   top_p=None) -> Iterator[ChainStep]:
    """Reveal in 2-D Halton order with Halton-MaskGIT's arccos schedule (an extension)."""
    return halton_chain(x, predict, mask_id=mask_id, steps=steps, temp=temp, rng=rng, t_start=t_start,
                        shape=shape, filter=make_filter(top_k, top_p))


DEFAULT_SAMPLER = "absorbing.v1"

# Arguments every sampler takes from the chain's caller; everything else is an option.
RESERVED_ARGS = ("x", "predict", "mask_id", "steps", "temp", "rng", "t_start")


def bind_sampler(sampler: str | Callable, options: dict[str, Any] | None = None, path: str = "sample"
                 ) -> tuple[Callable, dict[str, Any]]:
    """(sampler function, options) for a registry name (or a sampler callable) and its options.

    The options are bound against the sampler's signature (inspect.signature(...).bind_partial),
    so one it does not take is a UserError naming `path.options.KEY` and the options it takes, raised
    when the recipe loads (uvq.registry.resolve_config) and again by every library call; then the
    values of the shared options are checked (check_options).
    """
    if isinstance(sampler, str):
        try:
            fn = registry.get("samplers", sampler)
        except UserError as exc:
            raise UserError(f"{path}.sampler: {exc}") from None
    else:
        fn = sampler
    options = dict(options or {})
    name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", repr(sampler))
    for key in options:
        if key in RESERVED_ARGS:
            where = f"{path}.{key}" if key in ("steps", "temp") else "the chain"
            raise UserError(f"{path}.options.{key} is not a sampler option: {where} sets it")
    signature = inspect.signature(fn)
    try:
        signature.bind_partial(None, None, **options)
    except TypeError:
        takes = [p for p, v in signature.parameters.items() if p not in RESERVED_ARGS and v.kind == v.KEYWORD_ONLY]
        bad = sorted(k for k in options if k not in takes)
        raise UserError(f"{path}.options.{bad[0] if bad else '?'} is not an option of the sampler {name}; "
                        f"its options: {', '.join(takes) or 'none'}") from None
    check_options(options, f"{path}.options")
    return fn, options


def check_options(options: dict[str, Any], path: str = "sample.options") -> None:
    """Check the values of the options the built-in samplers share (a plugin's option of the same
    name must mean the same): top_k, top_p, order, choice_temp, T, shape. One UserError naming the key."""
    if options.get("top_k") is not None:
        k = options["top_k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"{path}.top_k must be an integer >= 1 (got {k!r}); leave it unset for no top-k filter")
    if options.get("top_p") is not None:
        p = options["top_p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise UserError(f"{path}.top_p must be a number in (0, 1] (got {p!r}); leave it unset for no nucleus filter")
    if "order" in options and options["order"] not in ("random", "raster"):
        raise UserError(f"{path}.order must be random or raster (got {options['order']!r})")
    if options.get("T") is not None:
        T = options["T"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise UserError(f"{path}.T must be an integer >= 1 (got {T!r}); leave it unset for T = N")
    if options.get("shape") is not None:
        shp = options["shape"]
        if (not isinstance(shp, (list, tuple)) or len(shp) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shp)):
            raise UserError(f"{path}.shape must be two integers [h, w] >= 1 (got {shp!r}); leave it unset for a square grid")
    if "choice_temp" in options:
        c = options["choice_temp"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c >= 0):
            raise UserError(f"{path}.choice_temp must be a finite number >= 0 (got {c!r})")


# ---------------------------------------------------------------------------------------------
# Final-result calls
# ---------------------------------------------------------------------------------------------


def prior_shape(prior: torch.nn.Module) -> tuple[int, int]:
    """(N tokens, K codes) of a prior, read from its attributes (mask id = K)."""
    n = getattr(prior, "n_tokens", None)
    k = getattr(prior, "codebook_size", None)
    if n is None or k is None:
        raise ValueError("the prior must expose n_tokens and codebook_size")
    return int(n), int(k)


def make_predict(prior: torch.nn.Module, device: torch.device, precision: str = "bf16", *,
                 compile: bool = False, cuda_graphs: bool = False, batch_size: int | None = None) -> Predict:
    """Wrap a prior as predict(x[b,N]) -> logits[b,N,K] under autocast on CUDA (callers add inference mode).

    compile: torch.compile the prior. cuda_graphs: compile with mode="reduce-overhead" (CUDA
    graphs). Both pad the row count to a multiple of 16 (at most `batch_size`) so that the
    shrinking batches of the reuse scheme hit a handful of static shapes instead of recompiling
    for every row count. Off by default: they pay a compile time that only long runs recover.
    """
    net = prior
    if compile or cuda_graphs:
        net = torch.compile(prior, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    pad_to = 16 if (compile or cuda_graphs) else 1
    cap = batch_size

    def predict(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        padded = -(-b // pad_to) * pad_to
        if cap is not None:
            padded = min(padded, max(cap, b))
        if padded != b:
            x = torch.cat([x, x[:1].expand(padded - b, -1)], 0)  # [padded, N]
        with amp_context(device, precision):
            out = net(x)
        if cuda_graphs:
            out = out.clone()  # CUDA-graph outputs are overwritten by the next replay
        return out[:b]

    return predict


def check_temp(temp: float, flag: str = "--temp") -> None:
    """The temperature rule of the recipes (uvq.config.TEMP_MIN..TEMP_MAX), for library callers."""
    if not (isinstance(temp, (int, float)) and math.isfinite(temp) and TEMP_MIN <= temp <= TEMP_MAX):
        raise UserError(f"{flag} must be between {TEMP_MIN:g} and {TEMP_MAX:g} (got {temp!r}): logits / temp must "
                        "stay finite and distinct in float32")


def _validate_sampling(n_tokens: int, steps: int, temp: float) -> None:
    if not 1 <= steps <= n_tokens:
        raise UserError(f"--steps must be between 1 and N={n_tokens} tokens (got {steps})")
    check_temp(temp)


@dataclass
class SampleBatch:
    start: int  # index of the first sample of this batch
    tokens: torch.Tensor  # LongTensor[b, N] on the CPU
    images: torch.Tensor | None  # FloatTensor[b, 3, H, W] on the CPU, not clamped (None without a VQGAN)
    network_passes: int


def iter_samples(prior: torch.nn.Module, n: int, *, vqgan: torch.nn.Module | None = None,
                 steps: int | None = None, temp: float = 0.9, seed: int = 0, batch_size: int = 64,
                 sampler: str = DEFAULT_SAMPLER, options: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu", precision: str = "bf16", compile: bool = False,
                 cuda_graphs: bool = False, start_index: int = 0, latent_shape: Sequence[int] | None = None,
                 progress: ProgressFn | None = None, stats: dict[str, Any] | None = None) -> Iterator[SampleBatch]:
    """Sample n token grids in batches (and decode them when a VQGAN is given), one batch at a time.

    Sample i (global index start_index + i) uses the draws of SampleRNG(seed, [i]): the result
    does not depend on batch_size. Tokens are flattened grids [b, N]; decoding reshapes them to
    `latent_shape` (default: the VQGAN's, else square). `stats` (if given) receives the totals:
    network_passes, tokens_s, decode_s.
    """
    progress = progress or null_progress
    device = torch.device(device)
    n_tokens, k = prior_shape(prior)
    steps = n_tokens if steps is None else int(steps)
    _validate_sampling(n_tokens, steps, temp)
    if batch_size < 1 or n < 1:
        raise UserError("-n and --batch-size must be >= 1")
    fn, options = bind_sampler(sampler, options)
    causal = bool(getattr(prior, "causal", False))
    if causal:  # the autoregressive baseline: token by token with the KV cache (uvq.sampling.autoregressive)
        from uvq.config import check_autoregressive_sampling
        from uvq.sampling.autoregressive import autoregressive_tokens

        check_autoregressive_sampling(n_tokens, steps, sampler if isinstance(sampler, str) else "", options)
        if compile or cuda_graphs:
            raise UserError("sample.compile and sample.cuda_graphs apply to the absorbing chain; an autoregressive "
                            "prior runs its KV-cache steps uncompiled: set both false")
    if latent_shape is None and vqgan is not None and hasattr(vqgan, "latent_shape"):
        latent_shape = tuple(vqgan.latent_shape)
    if latent_shape is None:
        side = math.isqrt(n_tokens)
        latent_shape = (side, n_tokens // side)
    prior = prior.to(device).eval()
    if vqgan is not None:
        vqgan = vqgan.to(device).eval()
    predict = make_predict(prior, device, precision, compile=compile, cuda_graphs=cuda_graphs,
                           batch_size=batch_size)
    totals = {"network_passes": 0, "tokens_s": 0.0, "decode_s": 0.0, "steps": steps, "n": n}
    progress({"event": "start", "task": "sample", "total": n, "unit": "img"})
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.arange(start_index + start, start_index + start + b)
        rng = SampleRNG(seed, ids, device)
        x = torch.full((b, n_tokens), k, dtype=torch.long, device=device)  # all masked
        t0 = time.perf_counter()
        with torch.inference_mode():
            if causal:
                tokens, chain_stats = autoregressive_tokens(prior, x, temp=temp, rng=rng, device=device,
                                                            precision=precision, filter=make_filter(**options))
            else:
                tokens, chain_stats = run_chain(x, predict, sampler=fn, mask_id=k, steps=steps, temp=temp, rng=rng,
                                                **options)
            _sync(device)
            t1 = time.perf_counter()
            images = None
            if vqgan is not None:
                codes = tokens.view(b, *latent_shape)  # [b, h, w]
                images = vqgan.decode_codes(codes).float().cpu()  # [b, 3, H, W]
                _sync(device)
        t2 = time.perf_counter()
        totals["network_passes"] += chain_stats["network_passes"]
        totals["tokens_s"] += t1 - t0
        totals["decode_s"] += t2 - t1
        progress({"event": "advance", "task": "sample", "n": b,
                  "metrics": {"passes/img": round(totals["network_passes"] / (start + b), 1)}})
        yield SampleBatch(start=start_index + start, tokens=tokens.cpu(), images=images,
                          network_passes=chain_stats["network_passes"])
    progress({"event": "end", "task": "sample",
              "metrics": {"passes/img": round(totals["network_passes"] / n, 1)}})
    if stats is not None:
        stats.update(totals)


def sample_tokens(prior: torch.nn.Module, n: int, *, steps: int | None = None, temp: float = 0.9, seed: int = 0,
                  batch_size: int = 64, sampler: str = DEFAULT_SAMPLER, device: str | torch.device = "cpu",
                  precision: str = "bf16", progress: ProgressFn | None = None, **kwargs: Any) -> torch.Tensor:
    """n samples of the prior as LongTensor[n, N] (on the CPU). Keyword arguments as iter_samples."""
    batches = iter_samples(prior, n, steps=steps, temp=temp, seed=seed, batch_size=batch_size, sampler=sampler,
                           device=device, precision=precision, progress=progress, **kwargs)
    return torch.cat([b.tokens for b in batches], 0)


def sample_images(prior: torch.nn.Module, vqgan: torch.nn.Module, n: int, **kwargs: Any) -> torch.Tensor:
    """n decoded samples as FloatTensor[n, 3, H, W] in [0, 1] (clamped; on the CPU)."""
    batches = iter_samples(prior, n, vqgan=vqgan, **kwargs)
    return torch.cat([b.images for b in batches], 0).clamp_(0, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
