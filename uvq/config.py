"""Recipes: one typed dataclass per section, loaded strictly from YAML plus overrides.

A recipe is YAML whose top-level keys are the sections below. Unknown keys fail with their path
and the closest valid key; wrong types and impossible values fail at load time. Overrides are
`section.key=value` strings whose values are parsed as YAML scalars (`train.batch_size=4`,
`model.vqgan.ch_mult=[1,2]`). Derived values (latent shape, mask id, ...) are computed here and
only here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from uvq.registry import resolve_config
from uvq.runtime import UserError

# The recipes live at the top of the repository (`recipes/`), next to the package.
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(UserError):
    """A recipe or override that cannot be used; the message names the key path."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where images come from and how they are prepared (method section 1; official loaders)."""

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
        _check(0.0 <= self.val_fraction < 1.0, f"{path}.val_fraction must be in [0, 1)")
        _check(self.num_workers >= 0, f"{path}.num_workers must be >= 0")
        _check(self.max_images is None or self.max_images > 0, f"{path}.max_images must be positive")
        _check(self.demo_images >= 8, f"{path}.demo_images must be >= 8")
        _check(self.shuffle_buffer >= 1, f"{path}.shuffle_buffer must be >= 1")


@dataclass
class VQGANConfig:
    """Stage one autoencoder (method section 1). Defaults are the paper's 256x256 model."""

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
    likelihood_head: bool = False  # the official decoder's `logsigma` head (method 6); off by default

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
        _check(self.codebook_size >= 2, f"{path}.codebook_size must be >= 2 (got {self.codebook_size})")
        _check(self.codebook_size <= 65535, f"{path}.codebook_size must fit uint16 codes (<= 65535)")
        _check(len(self.ch_mult) >= 1 and all(m >= 1 for m in self.ch_mult), f"{path}.ch_mult must be positive integers")
        _check(self.img_size > 0 and self.img_size % self.downsample == 0,
               f"{path}.img_size {self.img_size} is not divisible by the downsampling factor {self.downsample} "
               f"(2**(len(ch_mult)-1)); pick an img_size that is a multiple of {self.downsample}")
        _check(self.nf >= 32 and self.nf % 32 == 0, f"{path}.nf must be a positive multiple of 32 (GroupNorm(32))")
        _check(self.res_blocks >= 1, f"{path}.res_blocks must be >= 1")
        _check(self.emb_dim >= 1, f"{path}.emb_dim must be >= 1")
        _check(self.in_channels >= 1, f"{path}.in_channels must be >= 1")
        _check(self.z_channels is None or self.z_channels >= 1, f"{path}.z_channels must be >= 1")
        _check(self.variant == "taming" or self.z_channels in (None, self.emb_dim),
               f"{path}.z_channels ({self.z_channels}) needs variant: taming (quant_conv); the official variant "
               f"has none, so leave z_channels unset or equal to emb_dim ({self.emb_dim})")
        _check(self.dec_res_blocks is None or self.dec_res_blocks >= 1, f"{path}.dec_res_blocks must be >= 1")


@dataclass
class DiscriminatorConfig:
    """PatchGAN discriminator (method section 1: 3 layers, ndf=64, BatchNorm)."""

    name: str = "patchgan.v1"
    ndf: int = 64
    n_layers: int = 3

    def validate(self, path: str) -> None:
        _check(self.ndf >= 1 and self.n_layers >= 1, f"{path}.ndf and {path}.n_layers must be >= 1")


@dataclass
class PriorConfig:
    """Stage two bidirectional transformer (method section 2). Defaults: the paper's 76.8M model."""

    name: str = "absorbing_transformer.v1"
    n_embd: int = 512
    n_head: int = 8
    n_layer: int = 24
    codebook_size: int = 1024  # K; must equal model.vqgan.codebook_size
    latent_shape: list[int] = field(default_factory=lambda: [16, 16])  # must equal the VQGAN's
    dropout: float = 0.0
    time_conditioning: bool = False  # the official code ignores t; so do we by default

    @property
    def n_tokens(self) -> int:
        return int(self.latent_shape[0]) * int(self.latent_shape[1])

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    def validate(self, path: str) -> None:
        _check(self.codebook_size >= 2, f"{path}.codebook_size must be >= 2 (got {self.codebook_size})")
        _check(len(self.latent_shape) == 2 and all(s >= 1 for s in self.latent_shape), f"{path}.latent_shape must be [h, w]")
        _check(self.n_head >= 1 and self.n_embd % self.n_head == 0,
               f"{path}.n_embd ({self.n_embd}) must be divisible by {path}.n_head ({self.n_head})")
        _check(self.n_layer >= 1, f"{path}.n_layer must be >= 1")
        _check(0.0 <= self.dropout < 1.0, f"{path}.dropout must be in [0, 1)")


@dataclass
class ModelConfig:
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)


@dataclass
class VQGANTrainConfig:
    """`fit-vqgan` (method section 1, the authors' training settings)."""

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
        _check(self.batch_size >= 1, f"{path}.batch_size must be >= 1")
        _check(self.steps >= 1, f"{path}.steps must be >= 1")
        _check(self.lr is None or self.lr > 0, f"{path}.lr must be positive")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"{path}.betas must be two numbers in [0, 1)")
        _check(self.grad_clip is None or self.grad_clip > 0, f"{path}.grad_clip must be positive (or null for none)")
        _check(self.disc_lr_mult > 0, f"{path}.disc_lr_mult must be positive")
        _check(self.perceptual_weight >= 0 and self.l1_weight >= 0, f"{path} loss weights must be >= 0")
        _check(0.0 < self.ema_beta < 1.0, f"{path}.ema_beta must be in (0, 1)")
        _check(self.ema_every >= 1, f"{path}.ema_every must be >= 1")
        _check(self.disc_weight_max > 0, f"{path}.disc_weight_max must be positive")
        valid = {"color", "translation", "cutout", ""}
        bad = [p for p in self.diffaug_policy.split(",") if p.strip() not in valid]
        _check(not bad, f"{path}.diffaug_policy has unknown parts {bad}; valid: color, translation, cutout")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 4.5e-6 * self.batch_size


@dataclass
class PriorTrainConfig:
    """`fit-prior` (method section 2)."""

    batch_size: int = 20
    steps: int = 1_400_000
    lr: float = 1e-4
    warmup_steps: int = 30_000
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float | None = None
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    loss: str = "reweighted_elbo.v1"  # registry name in "prior_losses"
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
        _check(self.batch_size >= 1 and self.steps >= 1, f"{path}.batch_size and {path}.steps must be >= 1")
        _check(self.lr > 0, f"{path}.lr must be positive")
        _check(self.warmup_steps >= 0, f"{path}.warmup_steps must be >= 0")
        _check(self.T is None or self.T >= 1, f"{path}.T must be >= 1")
        _check(0.0 < self.ema_beta < 1.0, f"{path}.ema_beta must be in (0, 1)")
        _check(self.val_every >= 1 and self.val_batches >= 1, f"{path}.val_every and val_batches must be >= 1")
        _check(self.val_draws >= 2, f"{path}.val_draws must be >= 2 (a standard error needs two draws)")


@dataclass
class EncodeConfig:
    """`encode`: images to latent shards."""

    batch_size: int = 32
    shard_size: int = 10_000  # samples per shard
    flip_copies: bool = False  # also write horizontally flipped copies (the paper's option)
    weights: Literal["default", "ema", "model"] = "default"

    def validate(self, path: str) -> None:
        _check(self.batch_size >= 1 and self.shard_size >= 1, f"{path}.batch_size and shard_size must be >= 1")


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
    """`uvq sample` (method section 3). `options` go to the sampler, bound against its signature
    when the recipe loads (uvq.registry.resolve_sampler)."""

    sampler: str = "absorbing.v1"  # registry name in "samplers"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {top_k: 50}; see docs/sampling.md
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
    """`uvq upscale-canvas` (method section 4, Eq. 8): canvases larger than the training window."""

    sampler: str = "absorbing.v1"  # registry name in "samplers"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {order: raster}, the authors' order
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
    """`uvq inpaint` (method section 5): regenerate regions, or grow the image (outpainting)."""

    sampler: str = "absorbing.v1"  # registry name in "samplers"
    options: dict[str, Any] = field(default_factory=dict)
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
    """`eval` (method section 6)."""

    metrics: list[str] = field(default_factory=lambda: ["fid", "prdc"])
    feature_extractor: str = "inception-v3-compat.v1"
    k: int = 5  # PRDC nearest_k (prdc's default; the paper's code used 3)
    batch_size: int = 64
    num_samples: int = 50_000
    inception_weights: str | None = None

    def validate(self, path: str) -> None:
        valid = {"fid", "kid", "prdc", "recon", "elbo"}
        bad = [m for m in self.metrics if m not in valid]
        _check(not bad, f"{path}.metrics has unknown entries {bad}; valid: {sorted(valid)}")
        _check(self.k >= 1, f"{path}.k must be >= 1")


@dataclass
class RunConfig:
    """Periodic work of training loops."""

    seed: int = 0
    log_every: int = 100
    image_every: int = 1000  # reconstruction / sample grids
    ckpt_every: int = 5000
    keep_last: int = 3

    def validate(self, path: str) -> None:
        _check(min(self.log_every, self.image_every, self.ckpt_every) >= 1, f"{path} intervals must be >= 1")
        _check(self.keep_last >= 1, f"{path}.keep_last must be >= 1")


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
        return self


# ---------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path} has the wrong type: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}{hint}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path} must be a mapping of names to values, got {value!r}")
        return {k: _coerce(v, args[1] if args else Any, f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise ConfigError(f"{path}: unsupported config type {tp}")


def _build(cls, data: Any, path: str):
    """Build dataclass `cls` from a mapping, refusing unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
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


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe is a YAML path, or the name of a packaged recipe (`demo`, `ffhq`, ...)."""
    p = Path(recipe)
    if p.is_file():
        return p
    packaged = RECIPES_DIR / f"{p.stem}.yaml"
    if p.suffix in ("", ".yaml", ".yml") and packaged.is_file() and len(p.parts) <= 2:
        return packaged
    names = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {str(recipe)!r} not found; give a YAML path or a packaged recipe name: {', '.join(names)}")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {item!r} must name a section and a key, e.g. train.batch_size=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.problem})") from exc
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
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(recipe: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a recipe (or the defaults when None), apply overrides, validate strictly."""
    data: dict[str, Any] = {}
    if recipe is not None:
        path = resolve_recipe_path(recipe)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    return resolve_config(config_from_dict(data))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
