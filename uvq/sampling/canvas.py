"""Images larger than the training canvas (docs/method.md section 4; paper section 3.3, Eq. 8).

The prior only accepts the N = h*w tokens of its training window. A canvas of H'xW' latents is
sampled with the same chain as `uvq sample` (uvq.sampling.chain.absorbing_chain): at every step the
prior is applied to training-sized windows s of the canvas, and for each position i the predicted
distributions are averaged over the windows S_i that contain it,

    p(x_0^i | x_t) ~= (1/|S_i|) sum_{s in S_i} p_theta(x_0^i | x_t^{(s)})          (Eq. 8)

The chain applies the temperature to the mixture, as softmax(log p / temp), and unmasks as in
section 3 (random order with a step budget; the authors' one-token-per-step raster order is an
option, for reproduction).

Layers, top to bottom:
    geometry        canvas sizes, window offsets (strided, edge windows included, or wrapped)
    WindowMixture   Eq. 8 as the chain's predict function: all windows of all canvases batched
    sample_canvas   the chain on canvas token grids (the big canvas, inpainting, outpainting)
    decode_canvas   tokens to pixels, with a circular border for tileable (wrapped) canvases
    upscale_canvas  the library function behind `uvq upscale-canvas`
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uvq.prior.autoregressive import refuse_autoregressive
from uvq.progress import ProgressFn, null_progress
from uvq.runtime import UserError
from uvq.sampling.chain import (
    DEFAULT_SAMPLER,
    SampleRNG,
    bind_sampler,
    check_temp,
    make_predict,
    mix32,
)
from uvq.sampling.outputs import provenance_header

Network = Callable[[torch.Tensor], torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Canvas geometry
# ---------------------------------------------------------------------------------------------


def parse_hw(spec: str, flag: str) -> tuple[int, int]:
    """'512x1024' (height x width) -> (512, 1024); a single number means a square."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(spec))
    if not m:
        raise UserError(f"{flag} {spec!r} is not HxW (for example 512x1024)")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h < 1 or w < 1:
        raise UserError(f"{flag} {spec!r} must be positive")
    return h, w


def canvas_latents(*, size: tuple[int, int] | None, latent_size: tuple[int, int] | None, downsample: int,
                   window: tuple[int, int]) -> tuple[int, int]:
    """The canvas in latents, from a pixel size (multiples of `downsample`) or a latent size.

    A canvas smaller than the training window in either direction is an error: the prior cannot
    be applied to it.
    """
    if (size is None) == (latent_size is None):
        raise UserError("give the canvas size as exactly one of --size HxW (pixels) or --latent-size hxw")
    if size is not None:
        if size[0] % downsample or size[1] % downsample:
            raise UserError(f"--size {size[0]}x{size[1]} is not a multiple of the VQGAN's downsampling factor "
                            f"{downsample}; use for example {size[0] // downsample * downsample}x"
                            f"{size[1] // downsample * downsample}")
        latent_size = (size[0] // downsample, size[1] // downsample)
    lh, lw = latent_size
    if lh < window[0] or lw < window[1]:
        raise UserError(f"the canvas of {lh}x{lw} latents ({lh * downsample}x{lw * downsample} pixels) is smaller "
                        f"than the prior's {window[0]}x{window[1]} training window; use --latent-size of at least "
                        f"{window[0]}x{window[1]} (--size {window[0] * downsample}x{window[1] * downsample})")
    return lh, lw


def _check_canvas(canvas: tuple[int, int], window: tuple[int, int]) -> None:
    if canvas[0] < window[0] or canvas[1] < window[1]:
        raise UserError(f"the canvas of {canvas[0]}x{canvas[1]} latents is smaller than the prior's "
                        f"{window[0]}x{window[1]} training window; make it at least {window[0]}x{window[1]} latents")


def window_offsets(length: int, window: int, stride: int, wrap: bool) -> list[int]:
    """Start offsets of the windows along one axis of `length` latents.

    Without wrap: 0, stride, 2*stride, ... up to length - window, plus the edge window at
    length - window when the stride skips it, so every position is covered. With wrap (a torus):
    0, stride, ... below length; a window may run past the end and continue at the start.
    """
    if stride < 1:
        raise UserError(f"--stride must be >= 1 (got {stride})")
    if stride > window:
        raise UserError(f"--stride {stride} is larger than the window ({window} latents), which would leave "
                        f"positions that no window covers; use a stride between 1 and {window}")
    if length < window:
        raise UserError(f"the canvas ({length} latents) is smaller than the window ({window} latents)")
    if wrap:
        return list(range(0, length, stride))
    offsets = list(range(0, length - window + 1, stride))
    if offsets[-1] != length - window:
        offsets.append(length - window)  # the right/bottom edge window
    return offsets


@dataclass
class Windows:
    """The training-sized windows of a canvas.

    offsets: LongTensor[M, 2] (top, left) of each window.
    index: LongTensor[M, h*w], the flat canvas position (row * W' + col) of each window token, in
        the window's raster order (the order the prior's positional embedding expects).
    """

    canvas: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]
    wrap: bool
    offsets: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def coverage(self) -> torch.Tensor:
        """LongTensor[H', W']: how many windows contain each position."""
        n = self.canvas[0] * self.canvas[1]
        return torch.bincount(self.index.reshape(-1), minlength=n).view(*self.canvas)


def make_windows(canvas: tuple[int, int], window: tuple[int, int], stride: int | tuple[int, int] = 1,
                 wrap: bool = False) -> Windows:
    """All windows of `canvas` at `stride` (edge windows included; wrapped around the edges with `wrap`)."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    tops = window_offsets(canvas[0], window[0], sh, wrap)
    lefts = window_offsets(canvas[1], window[1], sw, wrap)
    offsets = torch.tensor([(top, left) for top in tops for left in lefts], dtype=torch.long)  # [M, 2]
    rows = (offsets[:, :1] + torch.arange(window[0])) % canvas[0]  # [M, h]
    cols = (offsets[:, 1:] + torch.arange(window[1])) % canvas[1]  # [M, w]
    index = (rows[:, :, None] * canvas[1] + cols[:, None, :]).reshape(len(offsets), -1)  # [M, h*w]
    return Windows(canvas=tuple(canvas), window=tuple(window), stride=(sh, sw), wrap=wrap, offsets=offsets,
                   index=index)


def mixture_bytes(batch: int, canvas: tuple[int, int], window: tuple[int, int], codebook_size: int,
                  n_windows: int, batch_windows: int) -> int:
    """Estimated peak bytes of sampling `batch` canvases with the window mixture (an estimate from
    the tensors WindowMixture and the chain allocate, not a measurement):
    16 * batch * H'W' * K  (float32 [batch*H'W', K]: the sums of probabilities and of logits, the
                            mixture and the output)
    + 8 * min(batch_windows, batch * M) * h*w * K  (one chunk's logits and their softmax)
    + 8 * M * h*w  (the int64 window index, M windows)."""
    n, w = canvas[0] * canvas[1], window[0] * window[1]
    return 16 * batch * n * codebook_size + 8 * min(batch_windows, batch * n_windows) * w * codebook_size \
        + 8 * n_windows * w


def check_memory(batch: int, canvas: tuple[int, int], window: tuple[int, int], codebook_size: int, *, stride: int,
                 wrap: bool, batch_windows: int, max_gb: float, section: str) -> None:
    """Refuse (one line, before any allocation) a grid whose mixture_bytes exceeds `max_gb`."""
    n_windows = len(window_offsets(canvas[0], window[0], stride, wrap)) * len(window_offsets(canvas[1], window[1],
                                                                                                stride, wrap))
    need = mixture_bytes(batch, canvas, window, codebook_size, n_windows, batch_windows) / 1e9
    if need > max_gb:
        raise UserError(f"a grid of {canvas[0]}x{canvas[1]} latents x {batch} at once needs about {need:.3g} GB for "
                        f"the window mixture (16 x batch x tokens x K bytes and more), over {section}.max_memory_gb="
                        f"{max_gb:g}; make it smaller, lower the batch, or raise {section}.max_memory_gb")


def parse_window_choice(spec: str | int | None) -> int | None:
    """'all' -> None (every window, every step); 'random:M' -> M windows drawn per step."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, int):
        m = spec
    else:
        match = re.fullmatch(r"random:(\d+)", str(spec).strip())
        if not match:
            raise UserError(f"--windows {spec!r} is not 'all' or 'random:M' (for example random:16)")
        m = int(match.group(1))
    if m < 1:
        raise UserError(f"--windows random:M needs M >= 1 (got {m})")
    return m


# ---------------------------------------------------------------------------------------------
# Eq. 8: the mixture over windows, as the chain's predict function
# ---------------------------------------------------------------------------------------------


def _row_keys(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash of each row's tokens: LongTensor[B, N] -> [B] in [0, 2**32)."""
    pos = torch.arange(x.shape[1], device=x.device, dtype=torch.int64)
    h = mix32((x * 0x9E3779B1 + pos * 0x7FEB352D + 1) & 0xFFFFFFFF)  # [B, N]
    return mix32(h.sum(1) & 0xFFFFFFFF)  # [B]


class WindowMixture:
    """predict(x[B, H'*W']) -> log of Eq. 8's mixture [B, H'*W', K], for the sampling chain.

    The windows of all B canvases are gathered into one batch of windows and sent through the
    network in chunks of at most `max_batch` windows (the authors' code runs one pass per window).
    Each window's softmax is scatter-added onto its canvas positions with a count, and the
    mixture is the sum divided by the count.

    Only windows that contain a masked position are evaluated. This is exact: every window that
    contains a masked position is kept, so the mixture at masked positions (the only positions the
    chain reads) is unchanged. Positions no evaluated window covers get uniform logits (zeros).

    A position seen by exactly one window gets that window's logits instead of their log-softmax:
    softmax is invariant to that per-position shift, so the distribution is the same, and a canvas
    of the training size (one window) reproduces `uvq sample` bit for bit.

    random_windows=M (`--windows random:M`): each canvas draws M of the windows that hold a mask
    per call (all of them when fewer), then adds windows from the tiling (stride = window size,
    edges included) until every masked position is covered. The draw is keyed by (seed, a hash of the canvas's tokens), so like the chain's own
    draws it does not depend on which other canvases share the batch.
    """

    def __init__(self, network: Network, windows: Windows, *, codebook_size: int, mask_id: int,
                 max_batch: int = 256, random_windows: int | None = None, seed: int = 0) -> None:
        if max_batch < 1:
            raise UserError(f"--batch-windows must be >= 1 (got {max_batch})")
        self.network = network
        self.windows = windows
        self.k = codebook_size
        self.mask_id = mask_id
        self.max_batch = max_batch
        self.random_windows = random_windows
        self.seed = seed
        self.n = windows.canvas[0] * windows.canvas[1]
        index = windows.index
        if random_windows is not None:
            # The covering set: a tiling, each position in one or two of its windows.
            self.cover = make_windows(windows.canvas, windows.window, windows.window, windows.wrap)
            pos = self.cover.index.reshape(-1)
            owner = torch.arange(len(self.cover)).repeat_interleave(self.cover.index.shape[1])
            self.cover_of = torch.empty(self.n, dtype=torch.long).scatter_(0, pos, owner)  # a tile per position
            index = torch.cat([windows.index, self.cover.index], 0)  # [M + M_cover, h*w]
        self.index = index
        self._device: torch.device | None = None
        self.windows_evaluated = 0  # window rows sent through the network
        self.network_calls = 0  # forward passes (chunks)

    def _on(self, device: torch.device) -> None:
        if self._device != device:
            self.index = self.index.to(device)
            if self.random_windows is not None:
                self.cover_of = self.cover_of.to(device)
            self._device = device

    def _pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvas row, window id) of every window to evaluate, each LongTensor[P]."""
        masked = x == self.mask_id  # [B, N']
        m_all = len(self.windows)
        win_masked = masked[:, self.index[:m_all]].any(-1)  # [B, M]
        if self.random_windows is None:
            return win_masked.nonzero(as_tuple=True)
        b = x.shape[0]
        chosen = torch.zeros_like(win_masked)
        if self.random_windows >= m_all:
            chosen[:] = True
        else:
            # a seed of its own (xor a constant) keeps these draws apart from the chain's
            u = SampleRNG(self.seed ^ 0x2545F491, _row_keys(x), x.device).rand(m_all)  # [B, M]
            u = u.masked_fill(~win_masked, 2.0)  # draw among the windows that hold a mask
            chosen.scatter_(1, u.topk(self.random_windows, dim=1, largest=False).indices, True)
        chosen &= win_masked
        rows, wins = chosen.nonzero(as_tuple=True)
        covered = torch.zeros(b * self.n, dtype=torch.bool, device=x.device)
        covered[(rows[:, None] * self.n + self.index[wins]).reshape(-1)] = True
        uncovered = masked & ~covered.view(b, self.n)  # [B, N']
        r, pos = uncovered.nonzero(as_tuple=True)
        extra = torch.zeros(b, len(self.cover), dtype=torch.bool, device=x.device)
        extra[r, self.cover_of[pos]] = True
        r2, w2 = extra.nonzero(as_tuple=True)
        return torch.cat([rows, r2]), torch.cat([wins, w2 + m_all])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape
        if n != self.n:
            raise ValueError(f"expected canvases of {self.n} tokens, got {n}")
        self._on(x.device)
        rows, wins = self._pairs(x)
        prob_sum = torch.zeros(b * n, self.k, device=x.device)  # sum of p over windows
        logit_sum = torch.zeros(b * n, self.k, device=x.device)  # the logits, where one window covers
        count = torch.zeros(b * n, device=x.device)
        for start in range(0, rows.numel(), self.max_batch):
            r, w = rows[start:start + self.max_batch], wins[start:start + self.max_batch]
            pos = self.index[w]  # [P, h*w]
            logits = self.network(x[r[:, None], pos]).float()  # [P, h*w, K]
            flat = (r[:, None] * n + pos).reshape(-1)  # [P*h*w]
            logits = logits.reshape(-1, self.k)  # [P*h*w, K]
            prob_sum.index_add_(0, flat, logits.softmax(-1))
            logit_sum.index_add_(0, flat, logits)
            count.index_add_(0, flat, torch.ones_like(flat, dtype=count.dtype))
            self.windows_evaluated += int(r.numel())
            self.network_calls += 1
        mixture = (prob_sum / count.clamp_min(1)[:, None]).log()  # [B*N', K]
        out = torch.where((count == 1)[:, None], logit_sum, mixture)
        out = torch.where((count == 0)[:, None], torch.zeros_like(out), out)
        return out.view(b, n, self.k)  # [B, N', K]


# ---------------------------------------------------------------------------------------------
# Sampling canvases: the chain of section 3 with the mixture as its predict function
# ---------------------------------------------------------------------------------------------


@dataclass
class CanvasStats:
    steps: int = 0
    chain_passes: int = 0  # canvas rows the chain sent to predict (as network_passes in uvq sample)
    windows_evaluated: int = 0
    network_calls: int = 0
    tokens_s: float = 0.0


def sample_canvas(prior: torch.nn.Module, x: torch.Tensor, *, steps: int, temp: float, seed: int,
                  sample_ids: Sequence[int] | torch.Tensor, window: tuple[int, int] | None = None, stride: int = 1,
                  windows: str | int | None = "all", wrap: bool = False, sampler: str = DEFAULT_SAMPLER,
                  options: dict[str, Any] | None = None, t_start: int | None = None, batch_windows: int = 256,
                  precision: str = "bf16", progress: ProgressFn | None = None,
                  stats: CanvasStats | None = None) -> torch.Tensor:
    """Run the sampling chain on canvases: x LongTensor[B, H', W'] -> tokens [B, H', W'].

    x holds known tokens and the prior's mask id at unknown positions; known tokens never change
    (inpainting and outpainting pass a partly known canvas, the big canvas an all-masked one).
    Canvas b draws from SampleRNG(seed, sample_ids[b]) exactly as sample sample_ids[b] of
    `uvq sample` does, so results do not depend on the batch size, and a canvas of the training
    size reproduces `uvq sample`. `window` is the prior's latent shape (default: its
    `latent_shape` attribute, else square). The prior and x must be on the same device. `sampler`
    (a registry name) runs with `options` (e.g. {"order": "raster"}, the authors' canvas order).
    """
    refuse_autoregressive("a canvas or inpainting chain", prior=prior)
    progress = progress or null_progress
    stats = stats if stats is not None else CanvasStats()
    if x.ndim != 3:
        raise ValueError(f"x must be LongTensor[B, H', W'], got {tuple(x.shape)}")
    window = tuple(window) if window is not None else _prior_window(prior)
    canvas = (int(x.shape[1]), int(x.shape[2]))
    _check_canvas(canvas, window)
    n_tokens = canvas[0] * canvas[1]
    if not 1 <= steps <= n_tokens:
        raise UserError(f"--steps must be between 1 and the canvas's {n_tokens} tokens (got {steps})")
    fn, options = bind_sampler(sampler, options, "canvas")
    device = x.device
    mixture = WindowMixture(make_predict(prior, device, precision), make_windows(canvas, window, stride, wrap),
                            codebook_size=int(prior.codebook_size), mask_id=int(prior.mask_id),
                            max_batch=batch_windows, random_windows=parse_window_choice(windows), seed=seed)
    rng = SampleRNG(seed, torch.as_tensor(sample_ids), device)
    flat = x.reshape(x.shape[0], n_tokens)  # [B, N']
    t0 = time.perf_counter()
    last = None
    with torch.inference_mode():
        for step in fn(flat, mixture, mask_id=int(prior.mask_id), steps=steps, temp=temp, rng=rng, t_start=t_start,
                       **options):
            last = step
            stats.steps += 1
            progress({"event": "advance", "task": "canvas", "n": 1,
                      "metrics": {"masked": int((step.x == prior.mask_id).sum()), "windows": mixture.windows_evaluated}})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.tokens_s += time.perf_counter() - t0
    stats.chain_passes += last.network_passes if last is not None else 0
    stats.windows_evaluated += mixture.windows_evaluated
    stats.network_calls += mixture.network_calls
    out = last.x if last is not None else flat
    return out.reshape(x.shape)


def _prior_window(prior: torch.nn.Module) -> tuple[int, int]:
    """The prior's training window: its `latent_shape` attribute, else the square of N tokens."""
    shape = getattr(prior, "latent_shape", None)
    if shape is None:
        side = math.isqrt(int(prior.n_tokens))
        if side * side != int(prior.n_tokens):
            raise ValueError("the prior's window is not square; pass window=(h, w)")
        shape = (side, side)
    return int(shape[0]), int(shape[1])


def sample_canvases(prior: torch.nn.Module, n: int, canvas: tuple[int, int], *, steps: int, temp: float,
                    seed: int = 0, batch_size: int = 4, start_index: int = 0, device: str | torch.device = "cpu",
                    **kwargs: Any) -> tuple[torch.Tensor, CanvasStats]:
    """n all-masked canvases sampled in batches: (LongTensor[n, H', W'] on the CPU, stats).

    Canvas i (global index start_index + i) uses the draws of sample i; kwargs as sample_canvas.
    """
    if n < 1 or batch_size < 1:
        raise UserError("-n and --batch-size must be >= 1")
    device = torch.device(device)
    prior = prior.to(device).eval()
    stats = CanvasStats()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.full((b, *canvas), int(prior.mask_id), dtype=torch.long, device=device)  # all masked
        ids = torch.arange(start_index + start, start_index + start + b)
        out.append(sample_canvas(prior, x, steps=steps, temp=temp, seed=seed, sample_ids=ids, stats=stats,
                                 **kwargs).cpu())
    return torch.cat(out, 0), stats


# ---------------------------------------------------------------------------------------------
# Tokens to pixels
# ---------------------------------------------------------------------------------------------


def decode_canvas(vqgan: torch.nn.Module, codes: torch.Tensor, *, wrap: bool = False, pad: int | None = None) -> torch.Tensor:
    """LongTensor[B, H', W'] -> FloatTensor[B, 3, H'f, W'f] (not clamped), one canvas at a time.

    The VQGAN decoder is convolutional plus attention, so it decodes grids larger than its
    training size. A wrapped (tileable) canvas is decoded with a circular border of `pad` latents
    (default: half the training window) and cropped, so that the convolutions at the edges see the
    wrapped neighbours and the pixels continue across the seam as the tokens do.
    """
    b, lh, lw = codes.shape
    images = []
    with torch.inference_mode():
        for i in range(b):
            c = codes[i:i + 1]
            if not wrap:
                images.append(vqgan.decode_codes(c).float().cpu())
                continue
            window = getattr(vqgan, "latent_shape", (lh, lw))
            ph = min(lh, pad if pad is not None else max(1, window[0] // 2))
            pw = min(lw, pad if pad is not None else max(1, window[1] // 2))
            rows = torch.arange(-ph, lh + ph, device=c.device) % lh
            cols = torch.arange(-pw, lw + pw, device=c.device) % lw
            img = vqgan.decode_codes(c[:, rows][:, :, cols]).float().cpu()  # [1, 3, (H'+2ph)f, (W'+2pw)f]
            f = img.shape[-1] // (lw + 2 * pw)
            images.append(img[:, :, ph * f:(ph + lh) * f, pw * f:(pw + lw) * f])
    return torch.cat(images, 0)


# ---------------------------------------------------------------------------------------------
# `uvq upscale-canvas`: checkpoints in, PNGs and provenance out
# ---------------------------------------------------------------------------------------------


def upscale_canvas(prior: str | Path, out_dir: str | Path, *, vqgan: str | Path | None = None,
                   size: Sequence[int] | None = None, latent_size: Sequence[int] | None = None, n: int = 4,
                   steps: int | None = None, temp: float = 0.8, seed: int = 0, stride: int = 1,
                   windows: str = "all", wrap: bool = False, sampler: str = DEFAULT_SAMPLER,
                   options: dict[str, Any] | None = None, batch_size: int = 4, batch_windows: int = 256,
                   weights: str = "default", device: str = "auto", precision: str = "bf16",
                   max_memory_gb: float = 64.0, overwrite: bool = False, allow_other_vqgan: bool = False,
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """Sample n canvases larger than the training window from a prior checkpoint into `out_dir`.

    The keyword arguments are the fields of the recipe's `canvas` section (uvq.config.CanvasConfig)
    plus seed, weights, device and overwrite. Writes sample-000000.png ... (canvas i uses the draws
    of `uvq sample`'s sample i), grid.png and samples.json (checkpoint hashes, canvas, windows,
    settings, timing). `steps` defaults to the prior's window token count N (random order) or the
    canvas's token count (options {"order": "raster"}, one token per step as the authors).
    """
    from uvq.checkpoint import load_pair, read_prior_meta, resolve_pair, verify_checkpoint
    from uvq.config import VQGANConfig, section_from_dict
    from uvq.files import atomic_write_json
    from uvq.images import save_grid, save_png
    from uvq.runtime import (
        JobProgress,
        batch_share,
        gather_to_main,
        init_distributed,
        on_main,
        reduce_numbers,
        resolve_device,
        share_rounds,
    )
    from uvq.sampling.outputs import SAMPLE_NAME, SAMPLES_JSON, claim_shared

    t_begin = time.perf_counter()
    info = init_distributed(resolve_device(device))
    progress = (progress or null_progress) if info.is_main else null_progress
    check_temp(temp)
    if n < 1 or batch_size < 1:
        raise UserError("-n and --batch-size must be >= 1")
    _, options = bind_sampler(sampler, options, "canvas")
    order = options.get("order", "random")
    random_m = parse_window_choice(windows)
    dev = resolve_device(device)
    prior_meta = read_prior_meta(prior)
    refuse_autoregressive("upscale-canvas", meta=prior_meta)  # before anything is written (paper section 4.5)
    window = tuple(int(s) for s in prior_meta["model_config"]["latent_shape"])
    vq_meta, vq_weights = resolve_pair(prior_meta, vqgan, allow_other_vqgan=allow_other_vqgan, progress=progress)
    downsample = section_from_dict(VQGANConfig, vq_meta["model_config"], "model.vqgan").downsample
    canvas = canvas_latents(size=tuple(size) if size else None, latent_size=tuple(latent_size) if latent_size else None,
                            downsample=downsample, window=window)
    n_canvas = canvas[0] * canvas[1]
    if steps is None:
        steps = n_canvas if order == "raster" else min(n_canvas, window[0] * window[1])
    if not 1 <= steps <= n_canvas:
        raise UserError(f"--steps must be between 1 and the canvas's {n_canvas} tokens (got {steps})")
    check_memory(min(batch_size, n), canvas, window, int(prior_meta["model_config"]["codebook_size"]), stride=stride,
                 wrap=wrap, batch_windows=batch_windows, max_gb=max_memory_gb, section="canvas")  # validates the stride
    geometry = make_windows(canvas, window, stride, wrap)
    # Damaged weights are refused before the output directory is touched (a refused command changes nothing).
    verify_checkpoint(prior_meta["path"], "prior")
    verify_checkpoint(vq_meta["path"], "vqgan")
    out, claim = claim_shared(out_dir, command="upscale-canvas", overwrite=overwrite,
                              inputs=(prior, prior_meta["path"], vqgan, vq_meta["path"]),
                              entries=("grid.png", SAMPLES_JSON), patterns=(SAMPLE_NAME.replace("{:06d}", "*"),))
    net, prior_meta, vq_model, vq_meta, vq_weights = load_pair(prior, vqgan, weights=weights, device=dev, allow_other_vqgan=allow_other_vqgan)

    progress({"event": "log", "message": f"canvas {canvas[0]}x{canvas[1]} latents "
              f"({canvas[0] * downsample}x{canvas[1] * downsample} pixels), {len(geometry)} windows of "
              f"{window[0]}x{window[1]} at stride {stride}{' (wrapped)' if wrap else ''}, {steps} steps"})
    # This rank's share: whole batches of the one-process run (uvq.runtime.batch_share). Each rank
    # writes its own canvases; the grid's images go to rank 0. "canvas" counts the whole job's
    # canvases; "canvas steps" the chain steps of rank 0's share.
    first, count = batch_share(n, batch_size, info)
    job = JobProgress(progress, "canvas", n, share_rounds(n, batch_size, info.world_size))
    progress({"event": "start", "task": "canvas steps", "total": None, "unit": "step"})

    def steps_progress(event: dict[str, Any]) -> None:
        progress({**event, "task": "canvas steps"} if event.get("task") == "canvas" else event)

    stats = CanvasStats()
    decode_s = write_s = 0.0
    grid_images: list[torch.Tensor] = []
    for start in range(first, first + count, batch_size):
        tokens, batch_stats = sample_canvases(
            net, min(batch_size, n - start), canvas, steps=steps, temp=temp, seed=seed, batch_size=batch_size,
            start_index=start, device=dev, window=window, stride=stride, windows=windows, wrap=wrap, sampler=sampler,
            options=options, batch_windows=batch_windows, precision=precision, progress=steps_progress)
        for field_name in ("steps", "chain_passes", "windows_evaluated", "network_calls", "tokens_s"):
            setattr(stats, field_name, getattr(stats, field_name) + getattr(batch_stats, field_name))
        t0 = time.perf_counter()
        images = decode_canvas(vq_model, tokens.to(dev), wrap=wrap).clamp(0, 1)  # [b, 3, H, W]
        t1 = time.perf_counter()
        for j in range(images.shape[0]):
            save_png(images[j], out / SAMPLE_NAME.format(start + j))
        if start < 16:
            grid_images.extend(images[: 16 - start])
        decode_s += t1 - t0
        write_s += time.perf_counter() - t1
        job.advance(images.shape[0])
    progress({"event": "end", "task": "canvas steps"})
    job.finish()
    windows_evaluated, network_calls = reduce_numbers([stats.windows_evaluated, stats.network_calls], "sum")
    tokens_s, decode_s, write_s = reduce_numbers([stats.tokens_s, decode_s, write_s], "max")
    gathered = gather_to_main(grid_images)

    def write_shared() -> dict[str, Any]:
        """Rank 0, after every rank's canvases: the grid and samples.json."""
        grid_all = [im for part in gathered for im in part]
        cols = min(4, len(grid_all))
        grid_path = save_grid(torch.stack(grid_all), out / "grid.png", nrow=cols,
                              row_labels=[f"#{i}" for i in range(0, len(grid_all), cols)])
        total_s = time.perf_counter() - t_begin
        summary = {
            **provenance_header("upscale-canvas", out, n, prior_meta, weights, vq_meta, vq_weights),
            "canvas": {"latents": list(canvas), "pixels": [canvas[0] * downsample, canvas[1] * downsample],
                       "window": list(window), "stride": stride, "windows": windows, "wrap": wrap,
                       "windows_per_step": len(geometry) if random_m is None else random_m},
            "seed": seed,
            "steps": steps,
            "order": order,
            "temperature": temp,
            "sampler": sampler,
            "sampler_options": options,
            "batch_size": batch_size,
            "batch_windows": batch_windows,
            "device": str(dev),
            "precision": precision if dev.type == "cuda" else "fp32",
            "world_size": info.world_size,
            "network_passes": int(windows_evaluated),
            "network_passes_per_image": windows_evaluated / n,
            "forward_calls": int(network_calls),
            "timing": {"tokens_s": round(tokens_s, 3), "decode_s": round(decode_s, 3), "write_s": round(write_s, 3),
                       "total_s": round(total_s, 3), "seconds_per_image": round((tokens_s + decode_s) / n, 3),
                       "images_per_s": round(n / max(tokens_s + decode_s, 1e-9), 4)},
            "files": {"images": SAMPLE_NAME.replace("{:06d}", "%06d"), "grid": grid_path.name},
            "grid": str(grid_path),
        }
        atomic_write_json(out / SAMPLES_JSON, summary)
        claim.release()
        return summary

    return on_main(write_shared)
