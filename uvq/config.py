"""Recipes: one typed dataclass per section, loaded strictly from YAML plus overrides.

A recipe is YAML whose top-level keys are the sections below. Unknown keys fail with their path
and the closest valid key; wrong types, non-finite numbers and values out of range fail at load
time, naming the key path and the valid range. Overrides are `section.key=value` strings whose
values are parsed as YAML (`train.batch_size=4`, `prior_train.lr=1e-4`,
`model.vqgan.ch_mult=[1,2]`). Numbers follow YAML 1.2's core schema. Derived values (latent
shape, mask id, learning rate times world size, the number of diffusion steps T, ...) are
computed here and only here.

A recipe is a path to a YAML file, or the bare name of a recipe packaged in `uvq/recipes/`
(`demo`, `ffhq`, ...): a name has no `/` and no `.yaml`/`.yml` suffix. A path that does not exist
is an error; it never falls back to a packaged recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from uvq.registry import resolve_config
from uvq.runtime import UserError
from uvq.stopping import parse_time_limit

# The packaged recipes are package data (uvq/recipes/*.yaml), read through importlib.resources so
# that an installed wheel finds them; the repository's top-level `recipes` is a link to that folder.
RECIPE_PACKAGE = "uvq"
RECIPE_FOLDER = "recipes"

INT64_MAX = 2**63 - 1  # every integer option ends up in Python/torch int64 arithmetic
# run.seed: the trainers derive per-rank and per-epoch seeds from it (at most seed x 1000003 x 7919
# in the latent stream), and those must stay below torch's 2**64 generator-seed limit.
SEED_MAX = 2**31 - 1
# The demo set keeps one key string per image in memory (about 70 bytes each: 'demo-%06d'); a
# million images (~70 MB of keys, ~3 GB drawn at 32x32) is far past any smoke test.
MAX_DEMO_IMAGES = 1_000_000
# AbsorbingDiffusion keeps three float64 tables of T + 1 entries (importance sampling) and the full
# ELBO sums over all T; a million steps (24 MB of tables) is 4000x the paper's T = N = 256.
MAX_DIFFUSION_STEPS = 1_000_000


class ConfigError(UserError):
    """A recipe or override that cannot be used; the message names the key path."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where images come from and how they are prepared (docs/method.md section 1; official loaders)."""

    source: str = "demo"  # "demo", an image folder, or webdataset shards (paths, brace patterns, URLs)
    stream: str = "auto"  # registry name of the stream, or "auto" to choose from `source`
    hflip: bool = True  # random horizontal flip while training the VQGAN
    val_fraction: float = 0.05  # held-out split, deterministic by key
    num_workers: int = 0
    strict: bool = False  # fail on the first unreadable image instead of skipping it
    max_images: int | None = None  # use at most this many images (None: all)
    demo_images: int = 2048  # size of the embedded demo set
    shuffle_buffer: int = 1000  # webdataset shuffle buffer

    def validate(self, path: str) -> None:
        _range(f"{path}.val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        _range(f"{path}.num_workers", self.num_workers, 0)
        _range(f"{path}.max_images", self.max_images, 1)
        _range(f"{path}.demo_images", self.demo_images, 8, MAX_DEMO_IMAGES,
               why="the demo set is a smoke test whose image keys are held in memory")
        _range(f"{path}.shuffle_buffer", self.shuffle_buffer, 1)


@dataclass
class VQGANConfig:
    """Stage one autoencoder (docs/method.md section 1). Defaults are the paper's 256x256 model."""

    img_size: int = 256
    in_channels: int = 3
    nf: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    res_blocks: int = 2  # residual blocks per encoder level
    dec_res_blocks: int | None = None  # decoder blocks per level (None: official = res_blocks; taming = res_blocks + 1)
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    emb_dim: int = 256  # codebook vector size D
    z_channels: int | None = None  # taming: encoder output channels before quant_conv (None: emb_dim)
    codebook_size: int = 1024  # K
    variant: Literal["official", "taming"] = "official"
    encoder: str = "vqgan_encoder.v1"
    decoder: str = "vqgan_decoder.v1"
    quantizer: str = "nearest.v1"
    likelihood_head: bool = False  # the official decoder's `logsigma` head (docs/method.md section 6); off by default

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.img_size // self.downsample, self.img_size // self.downsample)

    @property
    def decoder_res_blocks(self) -> int:
        if self.dec_res_blocks is not None:
            return self.dec_res_blocks
        return self.res_blocks + 1 if self.variant == "taming" else self.res_blocks

    def validate(self, path: str) -> None:
        _range(f"{path}.codebook_size", self.codebook_size, 2, 65535, why="codes are stored as uint16")
        _check(len(self.ch_mult) >= 1 and all(m >= 1 for m in self.ch_mult),
               f"{path}.ch_mult must be a non-empty list of integers >= 1 (got {_short(self.ch_mult)})")
        _check(all(r >= 1 for r in self.attn_resolutions),
               f"{path}.attn_resolutions must be integers >= 1 (got {_short(self.attn_resolutions)})")
        _check(self.img_size > 0 and self.img_size % self.downsample == 0,
               f"{path}.img_size {self.img_size} is not divisible by the downsampling factor {self.downsample} "
               f"(2**(len(ch_mult)-1)); pick an img_size that is a multiple of {self.downsample}")
        _check(self.nf >= 32 and self.nf % 32 == 0, f"{path}.nf must be a positive multiple of 32 (GroupNorm(32))")
        _range(f"{path}.res_blocks", self.res_blocks, 1)
        _range(f"{path}.emb_dim", self.emb_dim, 1)
        _range(f"{path}.in_channels", self.in_channels, 1)
        _range(f"{path}.z_channels", self.z_channels, 1)
        _check(self.variant == "taming" or self.z_channels in (None, self.emb_dim),
               f"{path}.z_channels ({self.z_channels}) needs variant: taming (quant_conv); the official variant "
               f"has none, so leave z_channels unset or equal to emb_dim ({self.emb_dim})")
        _range(f"{path}.dec_res_blocks", self.dec_res_blocks, 1)


@dataclass
class DiscriminatorConfig:
    """PatchGAN discriminator (docs/method.md section 1: 3 layers, ndf=64, BatchNorm)."""

    name: str = "patchgan.v1"
    ndf: int = 64
    n_layers: int = 3

    def validate(self, path: str) -> None:
        _range(f"{path}.ndf", self.ndf, 1)
        _range(f"{path}.n_layers", self.n_layers, 1)


@dataclass
class PriorConfig:
    """Stage two bidirectional transformer (docs/method.md section 2). Defaults: the paper's 76.8M model."""

    name: str = "absorbing_transformer.v1"
    n_embd: int = 512
    n_head: int = 8
    n_layer: int = 24
    codebook_size: int = 1024  # K; must equal model.vqgan.codebook_size
    latent_shape: list[int] = field(default_factory=lambda: [16, 16])  # must equal the VQGAN's
    dropout: float = 0.0
    causal: bool = False  # causal attention in raster order: the autoregressive baseline (paper 4.2)

    @property
    def n_tokens(self) -> int:
        return int(self.latent_shape[0]) * int(self.latent_shape[1])

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    def validate(self, path: str) -> None:
        _range(f"{path}.codebook_size", self.codebook_size, 2, 65535, why="codes are stored as uint16")
        _check(len(self.latent_shape) == 2 and all(s >= 1 for s in self.latent_shape),
               f"{path}.latent_shape must be [h, w] with h, w >= 1 (got {_short(self.latent_shape)})")
        _range(f"{path}.n_head", self.n_head, 1)
        _range(f"{path}.n_embd", self.n_embd, 1)
        _check(self.n_embd % self.n_head == 0,
               f"{path}.n_embd ({self.n_embd}) must be divisible by {path}.n_head ({self.n_head})")
        _range(f"{path}.n_layer", self.n_layer, 1)
        _range(f"{path}.dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass
class ModelConfig:
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)


@dataclass
class VQGANTrainConfig:
    """`fit-vqgan` (docs/method.md section 1, the authors' training settings)."""

    batch_size: int = 4
    steps: int = 1_500_000
    lr: float | None = None  # None: 4.5e-6 x batch_size, as the authors' code
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # torch's default, as the authors' Adam (taming: [0.5, 0.9])
    grad_clip: float | None = None
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # CUDA only; the CPU always runs fp32
    channels_last: bool = True  # CUDA only
    # Losses (Eq. 5, Eq. 9)
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS; 0 disables it (no VGG weights needed)
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    codebook_weight: float = 1.0
    beta: float = 0.25
    beta_placement: Literal["legacy", "paper"] = "legacy"  # legacy = the official code's (default)
    disc_weight: float = 1.0
    disc_start_step: int = 30001
    disc_weight_max: float = 1.0  # lambda_max, the clamp the paper introduces
    disc_lr_mult: float = 1.0
    diffaug_policy: str = "color,translation"  # add ",cutout" for cutout
    # EMA of the weights
    ema: bool = True
    ema_beta: float = 0.995
    ema_every: int = 10
    ema_start: int = 0

    def validate(self, path: str) -> None:
        _range(f"{path}.batch_size", self.batch_size, 1)
        _range(f"{path}.steps", self.steps, 1)
        _optimiser_ranges(self, path)
        for name in ("l1_weight", "perceptual_weight", "codebook_weight", "beta", "disc_weight"):
            _range(f"{path}.{name}", getattr(self, name), 0.0)
        _range(f"{path}.disc_start_step", self.disc_start_step, 0)
        _range(f"{path}.disc_weight_max", self.disc_weight_max, 0.0, lo_open=True)
        _range(f"{path}.disc_lr_mult", self.disc_lr_mult, 0.0, lo_open=True)
        valid = {"color", "translation", "cutout", ""}
        bad = [p for p in self.diffaug_policy.split(",") if p.strip() not in valid]
        _check(not bad, f"{path}.diffaug_policy has unknown parts {_short(bad)}; valid: color, translation, cutout")

    def learning_rate(self, world_size: int = 1) -> float:
        """The Adam learning rate: `lr` as given, else 4.5e-6 x the global batch (the authors' rule).

        The global batch is `batch_size` per rank times `world_size` ranks; an explicit `lr` is
        used as it is, whatever the number of ranks.
        """
        if self.lr is not None:
            return self.lr
        return 4.5e-6 * self.batch_size * world_size


@dataclass
class PriorTrainConfig:
    """`fit-prior` (docs/method.md section 2)."""

    batch_size: int = 20
    steps: int = 1_400_000
    lr: float = 1e-4
    warmup_steps: int = 30_000
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float | None = None
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    process: str = "absorbing.v1"  # registry name in "processes": absorbing.v1 or autoregressive.v1
    loss: str = "reweighted_elbo.v1"  # registry name in "prior_losses" (absorbing process only)
    masking: Literal["random", "fixed"] = "random"
    time_sampling: Literal["uniform", "importance"] = "uniform"
    T: int | None = None  # diffusion steps; None: the number of tokens N (256 in the paper)
    ema: bool = True
    ema_beta: float = 0.995
    ema_every: int = 10
    ema_start: int = 0
    val_every: int = 5000
    val_batches: int = 20
    val_draws: int = 8  # single-t ELBO draws per validation image (Monte-Carlo estimate, fixed generator)
    vqgan: str | None = None  # the VQGAN checkpoint the latents must come from (optional)

    def validate(self, path: str) -> None:
        _range(f"{path}.batch_size", self.batch_size, 1)
        _range(f"{path}.steps", self.steps, 1)
        _optimiser_ranges(self, path)
        _range(f"{path}.weight_decay", self.weight_decay, 0.0)
        _range(f"{path}.warmup_steps", self.warmup_steps, 0)
        _range(f"{path}.T", self.T, 1, MAX_DIFFUSION_STEPS, why="the process keeps tables of T + 1 entries")
        _range(f"{path}.val_every", self.val_every, 1)
        _range(f"{path}.val_batches", self.val_batches, 1)
        _range(f"{path}.val_draws", self.val_draws, 2, why="a standard error needs two draws")

    def diffusion_steps(self, prior: PriorConfig) -> int:
        """T, the number of diffusion steps: `T` as given, else N, the prior's number of tokens (paper)."""
        return self.T if self.T is not None else prior.n_tokens


@dataclass
class EncodeConfig:
    """`encode`: images to latent shards."""

    batch_size: int = 32
    shard_size: int = 10_000  # samples per shard
    flip_copies: bool = False  # also write horizontally flipped copies (the paper's option)
    weights: Literal["default", "ema", "model"] = "default"

    def validate(self, path: str) -> None:
        _range(f"{path}.batch_size", self.batch_size, 1)
        _range(f"{path}.shard_size", self.shard_size, 1)


# Temperatures outside this range make logits / temp overflow or lose every difference in float32
# for ordinary logits; the paper uses 0.8-0.9 (docs/method.md section 3).
TEMP_MIN, TEMP_MAX = 1e-3, 1e3


def _check_temp(temp: float, path: str) -> None:
    _check(math.isfinite(temp) and TEMP_MIN <= temp <= TEMP_MAX,
           f"{path} must be between {TEMP_MIN:g} and {TEMP_MAX:g} (got {temp!r}): logits / temp must stay "
           "finite and distinct in float32")


def _check_windows(spec: str, path: str) -> None:
    m = re.fullmatch(r"random:(\d+)", spec.strip())
    _check(spec == "all" or (m is not None and int(m.group(1)) >= 1),
           f"{path} {spec!r} is not 'all' or 'random:M' with M >= 1 (for example random:16)")


def _check_hw(value: list[int] | None, path: str) -> None:
    _check(value is None or (len(value) == 2 and all(v >= 1 for v in value)),
           f"{path} must be [height, width], two positive integers (got {value})")


@dataclass
class SampleConfig:
    """`uvq sample` (docs/method.md section 3). `options` go to the sampler, bound against its signature
    when the recipe loads (uvq.registry.resolve_sampler)."""

    sampler: str = "absorbing.v1"  # registry name in "samplers"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {top_k: 50}; see docs/sampling.md
    allow_other_vqgan: bool = False  # decode with a --vqgan that did not make the prior's latents (warns)
    steps: int | None = None  # None: N (the full chain)
    temp: float = 0.9
    n: int = 64
    batch_size: int = 64
    grid: bool = True
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    compile: bool = False  # torch.compile the prior
    cuda_graphs: bool = False  # CUDA graphs through torch.compile's reduce-overhead mode

    def validate(self, path: str) -> None:
        _check(self.steps is None or self.steps >= 1, f"{path}.steps must be >= 1")
        _check_temp(self.temp, f"{path}.temp")
        _check(self.n >= 1, f"{path}.n must be >= 1 (got {self.n})")
        _check(self.batch_size >= 1, f"{path}.batch_size must be >= 1 (got {self.batch_size})")


@dataclass
class CanvasConfig:
    """`uvq upscale-canvas` (docs/method.md section 4, Eq. 8): canvases larger than the training window."""

    sampler: str = "absorbing.v1"  # registry name in "samplers"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {order: raster}, the authors' order
    allow_other_vqgan: bool = False  # decode with a --vqgan that did not make the prior's latents (warns)
    size: list[int] | None = None  # [H, W] pixels, multiples of the VQGAN's downsampling (or latent_size)
    latent_size: list[int] | None = None  # [h, w] latents
    n: int = 4
    steps: int | None = None  # None: the prior's N window tokens (order raster: the canvas's tokens)
    temp: float = 0.8  # the authors' canvas setting
    stride: int = 1  # between windows, 1 .. the window size
    windows: str = "all"  # or "random:M": M windows per step plus covering ones
    wrap: bool = False  # windows wrap around the edges: the result tiles
    batch_size: int = 4  # canvases sampled together
    batch_windows: int = 256  # most windows per forward pass
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_memory_gb: float = 64.0  # refuse a canvas whose window mixture is estimated to need more

    def validate(self, path: str) -> None:
        _check(self.size is None or self.latent_size is None,
               f"give {path}.size (pixels) or {path}.latent_size (latents), not both")
        _check_hw(self.size, f"{path}.size")
        _check_hw(self.latent_size, f"{path}.latent_size")
        _check(self.n >= 1 and self.batch_size >= 1, f"{path}.n and {path}.batch_size must be >= 1")
        _check(self.steps is None or self.steps >= 1, f"{path}.steps must be >= 1")
        _check_temp(self.temp, f"{path}.temp")
        _check(self.stride >= 1, f"{path}.stride must be >= 1 (got {self.stride})")
        _check_windows(self.windows, f"{path}.windows")
        _check(self.batch_windows >= 1, f"{path}.batch_windows must be >= 1 (got {self.batch_windows})")
        _check(math.isfinite(self.max_memory_gb) and self.max_memory_gb > 0, f"{path}.max_memory_gb must be positive")


@dataclass
class InpaintConfig:
    """`uvq inpaint` (docs/method.md section 5): regenerate regions, or grow the image (outpainting)."""

    sampler: str = "absorbing.v1"  # registry name in "samplers"
    options: dict[str, Any] = field(default_factory=dict)
    allow_other_vqgan: bool = False  # decode with a --vqgan that did not make the prior's latents (warns)
    n: int = 8  # completions per input
    steps: int | None = None  # step budget T of a full chain (None: the grid's N tokens)
    temp: float = 0.9
    dilate: int = 0  # grow the latent mask by k latents
    composite: bool = False  # paste the generated region into the original pixels
    feather: int = 0  # with composite: blend the edge over this many pixels
    stride: int = 1  # window stride when the grid is larger than the window
    windows: str = "all"
    batch_windows: int = 256
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_memory_gb: float = 64.0  # refuse a grid whose window mixture is estimated to need more

    def validate(self, path: str) -> None:
        _check(self.n >= 1, f"{path}.n must be >= 1 (got {self.n})")
        _check(self.steps is None or self.steps >= 1, f"{path}.steps must be >= 1")
        _check_temp(self.temp, f"{path}.temp")
        _check(self.dilate >= 0, f"{path}.dilate must be >= 0 (got {self.dilate})")
        _check(self.feather >= 0, f"{path}.feather must be >= 0 pixels (got {self.feather})")
        _check(not self.feather or self.composite,
               f"{path}.feather blends the pasted edge, so it needs {path}.composite (--composite)")
        _check(self.stride >= 1, f"{path}.stride must be >= 1 (got {self.stride})")
        _check_windows(self.windows, f"{path}.windows")
        _check(self.batch_windows >= 1, f"{path}.batch_windows must be >= 1 (got {self.batch_windows})")
        _check(math.isfinite(self.max_memory_gb) and self.max_memory_gb > 0, f"{path}.max_memory_gb must be positive")


@dataclass
class EvalConfig:
    """`eval` (docs/method.md section 6)."""

    metrics: list[str] = field(default_factory=lambda: ["fid", "prdc"])
    feature_extractor: str = "inception-v3-compat.v1"
    k: int = 5  # PRDC nearest_k (prdc's default; the paper's code used 3)
    batch_size: int = 64
    inception_weights: str | None = None

    def validate(self, path: str) -> None:
        valid = {"fid", "kid", "prdc", "recon", "elbo"}
        bad = [m for m in self.metrics if m not in valid]
        _check(not bad, f"{path}.metrics has unknown entries {_short(bad)}; valid: {sorted(valid)}")
        _range(f"{path}.k", self.k, 1)
        _range(f"{path}.batch_size", self.batch_size, 1)


# The step budgets of the paper's Table 3 (N = 256 tokens); other grids scale them to N.
TABLE3_STEPS = (50, 100, 150, 200, 256)


@dataclass
class SweepConfig:
    """`uvq eval sweep` (paper Table 3): FID / PRDC over a grid of steps x temperatures.

    The sampler, its options and the batch size are the `sample` section's; the extractor and k
    are the `eval` section's."""

    steps: list[int] | None = None  # None: Table 3's 50..256 scaled to the prior's N (the paper's at N = 256)
    temps: list[float] | None = None  # None: [sample.temp]
    n: int = 10_000  # samples per cell (the paper: 50k)
    metrics: list[str] = field(default_factory=lambda: ["fid", "prdc"])
    reference: str | None = None  # the reference set (the training images), as `uvq eval fid --reference`

    def validate(self, path: str) -> None:
        _check(self.steps is None or (len(self.steps) >= 1 and all(s >= 1 for s in self.steps)
                                      and len(set(self.steps)) == len(self.steps)),
               f"{path}.steps must be distinct step budgets >= 1 (got {_short(self.steps)})")
        if self.temps is not None:
            _check(len(self.temps) >= 1 and len(set(self.temps)) == len(self.temps),
                   f"{path}.temps must be distinct temperatures (got {_short(self.temps)})")
            for i, t in enumerate(self.temps):
                _check_temp(t, f"{path}.temps[{i}]")
        _range(f"{path}.n", self.n, 2, why="FID needs at least 2 samples per cell")
        valid = ("fid", "kid", "prdc")
        bad = [m for m in self.metrics if m not in valid]
        _check(bool(self.metrics) and not bad and len(set(self.metrics)) == len(self.metrics),
               f"{path}.metrics must be distinct entries of {list(valid)} (got {_short(self.metrics)})")


@dataclass
class BPDConfig:
    """`uvq eval bpd`: full-model bits per dimension (paper section 4.1.1; docs/evaluation.md)."""

    bits: int = 8  # pixel bit depth of the modelled data (the paper's FFHQ figure is at 5)
    finetune_split: str = "train"  # the split the likelihood head is fitted on
    finetune_steps: int = 200  # Adam steps on the head, everything else frozen
    finetune_lr: float = 1e-3
    batch_size: int = 16
    estimator: str = "full"  # the prior's ELBO of the codes: full (all t) or mc (`draws` single-t draws)
    draws: int = 16
    flip_copies: bool = False  # also evaluate each image's mirror copy, grouped with it for the error

    def validate(self, path: str) -> None:
        _range(f"{path}.bits", self.bits, 1, 8)
        _check(self.finetune_split in ("train", "val"),
               f"{path}.finetune_split must be train or val (got {_short(self.finetune_split)})")
        _range(f"{path}.finetune_steps", self.finetune_steps, 0)
        _range(f"{path}.finetune_lr", self.finetune_lr, 0.0, 1.0, lo_open=True)
        _range(f"{path}.batch_size", self.batch_size, 1)
        _check(self.estimator in ("full", "mc"), f"{path}.estimator must be full or mc (got {_short(self.estimator)})")
        _range(f"{path}.draws", self.draws, 1)


@dataclass
class RunConfig:
    """Periodic work of training loops."""

    seed: int = 0
    log_every: int = 100
    image_every: int = 1000  # reconstruction / sample grids
    ckpt_every: int = 5000
    keep_last: int = 3
    report: bool = False  # refresh RUN/report.html (uvq report) at each checkpoint; docs/reports.md
    # Under torchrun: how long a collective may wait for the other ranks before the job stops
    # with one line (torch.distributed's own default is 30 minutes for gloo, 10 for nccl).
    dist_timeout_s: float = 300.0
    # Stopping early (uvq.stopping, docs/reliability.md): a long command stops `stop_margin_s`
    # (plus one step and its longest checkpoint write so far) before `time_limit` after its start,
    # saves its state and exits 75. Seconds, or SLURM's "HH:MM:SS" / "D-HH:MM:SS"; null: no limit.
    time_limit: float | str | None = None
    stop_margin_s: float = 60.0
    # Under torchrun the ranks agree whether to stop with one all-reduce every this many steps.
    stop_check_every: int = 10

    @property
    def time_limit_s(self) -> float | None:
        """`time_limit` in seconds (None when unset)."""
        return None if self.time_limit is None else parse_time_limit(self.time_limit)

    def validate(self, path: str) -> None:
        _range(f"{path}.seed", self.seed, 0, SEED_MAX, why="seeds derived from it must fit torch's 64-bit seed")
        for name in ("log_every", "image_every", "ckpt_every", "keep_last", "stop_check_every"):
            _range(f"{path}.{name}", getattr(self, name), 1)
        _range(f"{path}.dist_timeout_s", self.dist_timeout_s, 1, 86400)
        _range(f"{path}.stop_margin_s", self.stop_margin_s, 0)
        if self.time_limit is not None:
            try:
                limit = parse_time_limit(self.time_limit, f"{path}.time_limit")
            except UserError as exc:
                raise ConfigError(str(exc)) from None
            _check(limit > self.stop_margin_s, f"{path}.time_limit ({limit:g} s) must exceed {path}.stop_margin_s "
                                               f"({self.stop_margin_s:g} s): lower the margin or raise the limit")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: VQGANTrainConfig = field(default_factory=VQGANTrainConfig)
    prior_train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bpd: BPDConfig = field(default_factory=BPDConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check every section, then the cross-section rules."""
        for f in _fields(Config):
            _validate_tree(getattr(self, f.name), f.name)
        vq, prior = self.model.vqgan, self.model.prior
        _check(prior.codebook_size == vq.codebook_size,
               f"model.prior.codebook_size ({prior.codebook_size}) must equal model.vqgan.codebook_size ({vq.codebook_size})")
        _check(tuple(prior.latent_shape) == vq.latent_shape,
               f"model.prior.latent_shape {list(prior.latent_shape)} must equal the VQGAN's latent shape "
               f"{list(vq.latent_shape)} (img_size / 2**(len(ch_mult)-1))")
        process = self.prior_train.process
        _check(process != "autoregressive.v1" or prior.causal,
               "prior_train.process autoregressive.v1 needs a causal network: set model.prior.causal: true")
        _check(process != "absorbing.v1" or not prior.causal,
               "prior_train.process absorbing.v1 needs a bidirectional network: set model.prior.causal: false "
               "(or prior_train.process: autoregressive.v1)")
        if process == "autoregressive.v1":  # the recipe's sample section travels with the prior
            check_autoregressive_sampling(None, self.sample.steps, self.sample.sampler, self.sample.options)
        return self


AR_SAMPLE_OPTIONS = ("top_k", "top_p")  # the sample.options an autoregressive prior takes


def check_autoregressive_sampling(n_tokens: int | None, steps: int | None, sampler: str, options: dict | None,
                                  path: str = "sample") -> None:
    """The one rule for sampling an autoregressive prior (recipe load, `uvq sample`, library calls).

    It draws one token per step in raster order, so the step count is N (`steps` unset, or N when
    known); `sampler` names an absorbing-chain sampler, so only the default is accepted; of the
    options, only the value filters apply. One ConfigError naming the key.
    """
    if steps is not None and int(steps) != n_tokens:
        raise ConfigError(f"{path}.steps is {steps}, but an autoregressive prior draws one token per step: set "
                          f"{path}.steps=null (N{'' if n_tokens is None else f' = {n_tokens}'} steps)")
    if sampler != "absorbing.v1":
        raise ConfigError(f"{path}.sampler {sampler} is an absorbing-chain sampler; an autoregressive prior is "
                          f"sampled token by token in raster order: leave {path}.sampler unset")
    bad = sorted(key for key in (options or {}) if key not in AR_SAMPLE_OPTIONS)
    if bad:
        raise ConfigError(f"{path}.options.{bad[0]} does not apply to an autoregressive prior; its options: "
                          f"{', '.join(AR_SAMPLE_OPTIONS)}")


# ---------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# Values quoted in error messages are shortened: a recipe's value may be huge (a long list, or an
# alias-expanded structure), and the message must stay one readable line.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 6, 6, 6
_REPR.maxstring, _REPR.maxother = 80, 80
_SHORT = 120  # characters of a quoted value, at most


def _short(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= _SHORT else text[:_SHORT - 3] + "..."


def _range(path: str, value: Any, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False, why: str = "") -> None:
    """Refuse `value` outside [lo, hi] (open ends when asked); None means "not set" and passes."""
    if value is None:
        return
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or (value < hi if hi_open else value <= hi))
    if ok:
        return
    if hi is None:
        valid = f"{'>' if lo_open else '>='} {lo}"
    elif lo is None:
        valid = f"{'<' if hi_open else '<='} {hi}"
    else:
        valid = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ConfigError(f"{path} must be {valid} (got {_short(value)}){'; ' + why if why else ''}")


def _optimiser_ranges(tc: Any, path: str) -> None:
    """The rules both train sections share: Adam's lr and betas, gradient clipping, weight EMA."""
    _range(f"{path}.lr", tc.lr, 0.0, lo_open=True)
    _check(len(tc.betas) == 2 and all(0.0 <= b < 1.0 for b in tc.betas),
           f"{path}.betas must be two numbers in [0, 1) (got {_short(tc.betas)})")
    _range(f"{path}.grad_clip", tc.grad_clip, 0.0, lo_open=True, why="null for no clipping")
    _range(f"{path}.ema_beta", tc.ema_beta, 0.0, 1.0, lo_open=True, hi_open=True)
    _range(f"{path}.ema_every", tc.ema_every, 1)
    _range(f"{path}.ema_start", tc.ema_start, 0)


def _fields(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def _validate_tree(obj: Any, path: str) -> None:
    if hasattr(obj, "validate") and not isinstance(obj, Config):
        obj.validate(path)
    if dataclasses.is_dataclass(obj):
        for f in _fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                _validate_tree(value, f"{path}.{f.name}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` (ints may become floats, nothing else converts)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message (a range or a finiteness rule, not just "wrong type")
            return _coerce(value, options[0], path)
        errors = []
        for arg in options:
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append((arg, exc))
        numeric = [exc for arg, exc in errors if arg in (int, float)]
        if numeric and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise numeric[0]  # a number out of a number's rules (inf, nan, > 64 bits): say which rule
        raise ConfigError(f"{path} has the wrong type: expected {' or '.join(_type_name(a) for a in args)}, got {_short(value)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(value, [str(a) for a in args], n=1) if isinstance(value, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path} must be one of {list(args)}, got {_short(value)}{hint}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path} must be a mapping of names to values, got {value!r}")
        return {k: _coerce(v, args[1] if args else Any, f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {_short(value)}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {_short(value)}")
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ConfigError(f"{path} must be a 64-bit integer, in [-2**63, 2**63 - 1] (got {_short(value)})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {_short(value)}")
        if isinstance(value, int) and abs(value) > INT64_MAX:
            raise ConfigError(f"{path} must be a finite number of at most 2**63 in size (got {_short(value)})")
        if not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number (got {_short(value)})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {_short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise ConfigError(f"{path}: unsupported config type {tp}")


def _build(cls, data: Any, path: str):
    """Build dataclass `cls` from a mapping, refusing unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'} must be a mapping of keys, got {_short(data)}")
    data = _drop_legacy(cls, data, path)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path or 'recipe'} has a key that is not a name: {_short(key)}")
        key_path = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key_path!r}{hint} (valid keys here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], key_path)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "").validate()


def section_from_dict(cls, data: dict[str, Any], path: str = ""):
    """Rebuild one section (e.g. a checkpoint's embedded VQGANConfig) strictly."""
    obj = _build(cls, data, path)
    _validate_tree(obj, path or cls.__name__)
    return obj


# ---------------------------------------------------------------------------------------------
# Legacy keys: removed options that saved configs still carry
# ---------------------------------------------------------------------------------------------

# Options removed because nothing read them. Checkpoints and run directories embed their config
# (config_from_dict / section_from_dict read it back), so those readers drop these keys; a recipe
# that still sets one is refused by load_config with a line saying to delete it.
# path -> (section class, key, the values it could legally hold (None: any), why it went)
_LEGACY_KEYS: dict[str, tuple[type, str, tuple[Any, ...] | None, str]] = {
    "model.prior.time_conditioning": (PriorConfig, "time_conditioning", (False,),
                                      "it had one legal value (false): the prior ignores t, as the authors'"),
    "eval.num_samples": (EvalConfig, "num_samples", None, "nothing read it"),
}


def _drop_legacy(cls, data: dict[Any, Any], path: str) -> dict[Any, Any]:
    for legacy_path, (owner, key, legal, why) in _LEGACY_KEYS.items():
        if owner is cls and key in data:
            if legal is not None and data[key] not in legal:
                raise ConfigError(f"{legacy_path} = {_short(data[key])} was never supported ({why}); "
                                  "the option has been removed")
            data = {k: v for k, v in data.items() if k != key}
    return data


def drop_legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict without the removed options (for comparing it with a new config)."""
    out = _deep_copy_dicts(config)
    for legacy_path in _LEGACY_KEYS:
        *parents, key = legacy_path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return out


def _deep_copy_dicts(data: Any) -> Any:
    return {k: _deep_copy_dicts(v) for k, v in data.items()} if isinstance(data, dict) else data


def _refuse_legacy(data: dict[str, Any], where: str) -> None:
    for legacy_path, (_, _, _, why) in _LEGACY_KEYS.items():
        *parents, key = legacy_path.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            raise ConfigError(f"{where}: {legacy_path} was removed ({why}); delete it "
                              "(checkpoints and run directories that carry it still load)")


# ---------------------------------------------------------------------------------------------
# YAML: a SafeLoader with YAML 1.2 numbers, no duplicate keys and bounded aliases
# ---------------------------------------------------------------------------------------------

# YAML 1.2 core-schema numbers (yaml.org/spec/1.2.2, section 10.3.2). PyYAML implements YAML 1.1,
# where `1e-4` is a string (a float needs a dot) and `012` is octal; a recipe follows 1.2. Digit
# groups with `_` (`1_500_000`), which PyYAML's 1.1 integers accept, stay accepted.
_INT_RE = re.compile(r"[-+]?[0-9]+(?:_[0-9]+)*|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT_RE = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# A recipe has a few hundred values; a file whose aliases (&a / *a) expand past this is refused
# before it is built (the "billion laughs" pattern: nine aliases of nine aliases of ...).
MAX_YAML_VALUES = 100_000


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no Python objects) with YAML 1.2 numbers."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# Integers before floats: the 1.2 float pattern also matches `12`.
_RecipeLoader.add_implicit_resolver(_INT_TAG, re.compile(f"^(?:{_INT_RE.pattern})$"), list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(_FLOAT_TAG, re.compile(f"^(?:{_FLOAT_RE.pattern})$"), list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if not _INT_RE.fullmatch(text):
        raise yaml.constructor.ConstructorError(None, None, f"{_short(text)} is not a YAML 1.2 integer", node.start_mark)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text.replace("_", ""), 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node)
    if not _FLOAT_RE.fullmatch(text) and not _INT_RE.fullmatch(text):
        raise yaml.constructor.ConstructorError(None, None, f"{_short(text)} is not a YAML 1.2 number", node.start_mark)
    if text.lstrip("+-").lower() == ".inf":
        return -math.inf if text.startswith("-") else math.inf
    if text.lower() == ".nan":
        return math.nan
    return float(_construct_int(loader, node)) if _INT_RE.fullmatch(text) else float(text)


_RecipeLoader.add_constructor(_INT_TAG, _construct_int)
_RecipeLoader.add_constructor(_FLOAT_TAG, _construct_float)


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Refuse duplicate keys, recursive aliases and alias expansions past MAX_YAML_VALUES.

    Walks the composed node graph once (aliases are shared nodes, so the graph stays small even
    when its expansion is huge), counting each node's expanded size from its children's.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, str, bool]] = [(root, "", False)]
    while stack:
        node, path, done = stack.pop()
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_YAML_VALUES:
                raise ConfigError(f"{where}:{node.start_mark.line + 1}: {path or 'the recipe'} expands to more than "
                                  f"{MAX_YAML_VALUES} values through YAML aliases (&name / *name); a recipe needs a few hundred")
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}: {path or 'the recipe'} contains itself through a YAML alias")
        on_path.add(id(node))
        stack.append((node, path, True))
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    stack += [(key, path, False), (value, path, False)]
                    continue
                key_path = f"{path}.{key.value}" if path else str(key.value)
                if (key.tag, key.value) in seen:
                    raise ConfigError(f"{where}:{key.start_mark.line + 1}: duplicate key {_short(key_path)} "
                                      f"(first at line {seen[(key.tag, key.value)]}); keep one")
                seen[(key.tag, key.value)] = key.start_mark.line + 1
                stack += [(key, key_path, False), (value, key_path, False)]
        else:
            stack += [(c, f"{path}[{i}]", False) for i, c in enumerate(children)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_yaml(text: str, where: str) -> Any:
    """YAML text to Python values with _RecipeLoader; every problem is one ConfigError line.

    `where` names the text in messages (a file name, or "override x=y").
    """
    loader = None
    try:
        loader = _RecipeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, where)
        return loader.construct_document(node)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"{where}: not valid YAML: unacceptable character #x{exc.character:04x} "
                          f"at character {exc.position} ({exc.reason})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        context = f" ({_one_line(exc.context)})" if exc.context else ""
        raise ConfigError(f"{where}{at}: not valid YAML: {_one_line(exc.problem or '')}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(str(exc))}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not usable YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


# ---------------------------------------------------------------------------------------------
# Recipes: packaged names and paths
# ---------------------------------------------------------------------------------------------


def _packaged_recipes():
    return importlib.resources.files(RECIPE_PACKAGE).joinpath(RECIPE_FOLDER)


def recipe_names() -> list[str]:
    """The packaged recipes' names (`demo`, `ffhq`, ...)."""
    folder = _packaged_recipes()
    return sorted(f.name[:-len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml")) if folder.is_dir() else []


def is_recipe_name(recipe: str | Path) -> bool:
    """A bare name (no `/`, no `.yaml`/`.yml` suffix) means a packaged recipe; anything else is a path."""
    text = str(recipe)
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text) is not None and not text.endswith((".yaml", ".yml"))


def read_recipe(recipe: str | Path) -> tuple[str, str]:
    """(where, text) of a recipe: a packaged one by bare name, else the file at that path.

    A path that does not exist is an error, never a packaged recipe of a similar name.
    """
    names = ", ".join(recipe_names())
    if is_recipe_name(recipe):
        resource = _packaged_recipes().joinpath(f"{recipe}.yaml")
        if not resource.is_file():
            raise ConfigError(f"no packaged recipe named {str(recipe)!r}; packaged recipes: {names} "
                              f"(for a file of that name, give its path, e.g. ./{recipe})")
        where, data = f"recipe {recipe}", resource.read_bytes()
    else:
        path = Path(recipe)
        if not path.is_file():
            what = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
            raise ConfigError(f"recipe {str(recipe)!r} {what}; give the path of a YAML file, or a packaged "
                              f"recipe by its bare name: {names}")
        try:
            where, data = str(path), path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"recipe {str(recipe)!r} cannot be read ({exc.strerror})") from None
    try:
        return where, data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); "
                          "save the recipe as UTF-8") from None


# ---------------------------------------------------------------------------------------------
# Overrides and loading
# ---------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], value), the value read as YAML (1.2 numbers)."""
    if "=" not in item:
        raise ConfigError(f"override {_short(item)} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {_short(item)} must name a section and a key, e.g. train.batch_size=4")
    value = parse_yaml(raw, f"override {_short(item)}") if raw.strip() != "" else ""
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {_short(item)}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(recipe: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a recipe (or the defaults when None), apply overrides, validate strictly."""
    data: dict[str, Any] = {}
    where = "the overrides"
    if recipe is not None:
        where, text = read_recipe(recipe)
        loaded = parse_yaml(text, where)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{where} must be a mapping of sections, got {_short(loaded)}")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    _refuse_legacy(data, where)
    return resolve_config(config_from_dict(data))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
