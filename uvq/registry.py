"""A small registry of versioned component names (catalogue-style; see spaCy's registry).

Components register with a decorator under a category and a versioned name such as
`vqgan_encoder.v1`. A name's meaning never changes: a changed component gets a new version.
Third-party packages add components through the entry-point group `uvq.plugins`; each entry
point names a module (or a callable) that registers on import.

Each category holds entries of one call signature, stated in CATEGORIES below, so that one
contract test per category (tests/test_registry.py) builds and runs every entry, and a
recipe's names are resolved when it loads (`resolve_config`, called by uvq.config.load_config).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from uvq.runtime import UserError

# category -> the one signature its entries have (what `uvq ls` lists and the contract tests check).
CATEGORIES: dict[str, str] = {
    "encoders": "build(cfg: VQGANConfig) -> nn.Module; images [B, C, H, W] in [-1, 1] -> z [B, D, h, w] "
                "(model.vqgan.encoder)",
    "decoders": "build(cfg: VQGANConfig) -> nn.Module; z_q [B, D, h, w] -> images [B, C, H, W] (model.vqgan.decoder)",
    "quantizers": "build(cfg: VQGANConfig) -> nn.Module; z [B, D, h, w] -> (z_q, info with codes [B, h, w]) "
                  "(model.vqgan.quantizer)",
    "discriminators": "build(cfg: DiscriminatorConfig, in_channels: int = 3) -> nn.Module; images [B, C, H, W] -> "
                      "patch logits [B, 1, h', w'] (model.discriminator.name)",
    "prior_losses": "loss(ce: [B], n_masked: [B], t: [B], T: int, N: int) -> [B]; the per-image training loss "
                    "of the absorbing prior from its masked cross-entropy in nats (prior_train.loss)",
    "processes": "build(prior: PriorConfig, train: PriorTrainConfig) -> process; training_loss(model_fn, x0 [B, N]) "
                 "-> {loss, elbo}, state_dict(), load_state_dict() (prior_train.process)",
    "priors": "build(cfg: PriorConfig) -> nn.Module; tokens [B, N] (mask id = K) -> logits [B, N, K] "
              "(model.prior.name)",
    "samplers": "sampler(x [B, N], predict, *, mask_id, steps, temp, rng, t_start=None, **options) -> "
                "Iterator[ChainStep]; reveals every mask id of x (sample.sampler, sample.options)",
    "feature_extractors": "build(cfg: EvalConfig, device='cpu') -> extractor; uint8 images [B, 3, H, W] -> "
                          "float features [B, F] (eval.feature_extractor)",
    "streams": "build(cfg: DataConfig) -> image source (keys, load or a stream of images) (data.stream)",
}
ENTRY_POINT_GROUP = "uvq.plugins"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*(\.[a-z0-9_\-]+)*\.v\d+$")

# Modules of uvq itself that register components when imported; tests/test_registry.py proves the
# list complete by scanning uvq/ for `@register(`.
BUILTIN_MODULES = (
    "uvq.data.sources",
    "uvq.vqgan.model",
    "uvq.vqgan.discriminator",
    "uvq.prior.model",
    "uvq.prior.absorbing",
    "uvq.prior.autoregressive",
    "uvq.sampling.chain",
    "uvq.evaluation.features",
)


@dataclass(frozen=True)
class Entry:
    category: str
    name: str
    func: Callable
    plugin: str | None = None  # distribution that provided it, for third-party entries

    @property
    def where(self) -> str:
        """`module:qualname (file:line)`, for `uvq ls`."""
        func = inspect.unwrap(self.func)
        module = getattr(func, "__module__", "?")
        qualname = getattr(func, "__qualname__", repr(func))
        try:
            file = inspect.getsourcefile(func)
            line = inspect.getsourcelines(func)[1]
            loc = f"{file}:{line}"
        except (TypeError, OSError):
            loc = "?"
        return f"{module}:{qualname} ({loc})"


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {c: {} for c in CATEGORIES}
        self._loaded = False

    def register(self, category: str, name: str, *, plugin: str | None = None):
        """Decorator: `@register("samplers", "absorbing.v1")`."""
        self._check_category(category)
        if not _NAME.match(name):
            raise ValueError(f"registry name {name!r} must be lowercase and end in a version, e.g. 'thing.v1'")

        def decorate(func: Callable) -> Callable:
            existing = self._entries[category].get(name)
            if existing is not None and inspect.unwrap(existing.func) is not inspect.unwrap(func):
                same_origin = (getattr(existing.func, "__module__", None) == getattr(func, "__module__", None)
                               and getattr(existing.func, "__qualname__", None) == getattr(func, "__qualname__", None))
                if not same_origin:  # re-import of the same module is harmless
                    raise ValueError(f"{category} name {name!r} is already registered by {existing.where}; "
                                     "register a new version instead of changing a name's meaning")
            self._entries[category][name] = Entry(category, name, func, plugin)
            return func

        return decorate

    def get(self, category: str, name: str) -> Callable:
        self.load()
        self._check_category(category)
        entries = self._entries[category]
        if name not in entries:
            valid = sorted(entries)
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown {category} name {name!r}{hint}; valid names: {', '.join(valid) or 'none'}")
        return entries[name].func

    def entry(self, category: str, name: str) -> Entry:
        self.get(category, name)
        return self._entries[category][name]

    def names(self, category: str) -> list[str]:
        self.load()
        self._check_category(category)
        return sorted(self._entries[category])

    def entries(self) -> list[Entry]:
        self.load()
        return [e for c in CATEGORIES for e in sorted(self._entries[c].values(), key=lambda e: e.name)]

    def load(self) -> None:
        """Import uvq's registering modules, then the `uvq.plugins` entry points (once)."""
        if self._loaded:
            return
        self._loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break uvq; say which one
                raise UserError(f"plugin {ep.name!r} ({ep.value}) from entry-point group {ENTRY_POINT_GROUP} "
                                f"failed to load: {type(exc).__name__}: {exc}") from exc
            if callable(obj) and not inspect.ismodule(obj):
                obj(self)

    def _check_category(self, category: str) -> None:
        if category not in self._entries:
            raise UserError(f"unknown registry category {category!r}; valid: {', '.join(CATEGORIES)}")


registry = Registry()
register = registry.register


# Where a recipe names registry entries: (key path, category). `data.stream` may also be "auto".
CONFIG_NAMES = (
    ("data.stream", "streams"),
    ("model.vqgan.encoder", "encoders"),
    ("model.vqgan.decoder", "decoders"),
    ("model.vqgan.quantizer", "quantizers"),
    ("model.discriminator.name", "discriminators"),
    ("model.prior.name", "priors"),
    ("prior_train.loss", "prior_losses"),
    ("prior_train.process", "processes"),
    ("eval.feature_extractor", "feature_extractors"),
)
# Sections that name a sampler and its options (sample.sampler, sample.options, ...).
SAMPLER_SECTIONS = ("sample", "canvas", "inpaint")


def _lookup(cfg, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_name(category: str, name: str, path: str) -> Callable:
    """The entry `name` of `category`, or a UserError naming the recipe key and the valid names."""
    try:
        return registry.get(category, name)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def resolve_config(cfg):
    """Resolve every registry name of a Config (and bind each sampler section's options), so that a
    recipe naming an unknown or wrong-category entry fails when it loads, with the valid names.

    Needs the registering modules (they import torch): called at the end of uvq.config.load_config.
    """
    for path, category in CONFIG_NAMES:
        name = _lookup(cfg, path)
        if path == "data.stream" and name == "auto":
            continue
        resolve_name(category, name, path)
    from uvq.sampling.chain import bind_sampler  # registers the samplers; imports torch

    for section in SAMPLER_SECTIONS:
        if hasattr(cfg, section):
            bind_sampler(getattr(cfg, section).sampler, getattr(cfg, section).options, section)
    return cfg
