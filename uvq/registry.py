"""A small registry of versioned component names (catalogue-style; see spaCy's registry).

Components register with a decorator under a category and a versioned name such as
`vqgan_encoder.v1`. A name's meaning never changes: a changed component gets a new version.
Third-party packages add components through the entry-point group `uvq.plugins`; each entry
point names a module (or a callable) that registers on import.
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

CATEGORIES = (
    "encoders",
    "decoders",
    "quantizers",
    "discriminators",
    "losses",
    "priors",
    "samplers",
    "feature_extractors",
    "streams",
)
ENTRY_POINT_GROUP = "uvq.plugins"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*(\.[a-z0-9_\-]+)*\.v\d+$")

# Modules of uvq itself that register components when imported.
BUILTIN_MODULES = (
    "uvq.data.sources",
    "uvq.data.streams",
    "uvq.vqgan.model",
    "uvq.vqgan.losses",
    "uvq.vqgan.discriminator",
    "uvq.prior.model",
    "uvq.prior.absorbing",
    "uvq.sampling.chain",
    "uvq.evaluation.features",
    "uvq.prior.latents",
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


def load_builtin() -> Registry:
    registry.load()
    return registry
