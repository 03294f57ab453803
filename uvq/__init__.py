"""uvq: discrete absorbing diffusion over vector-quantized codes (Unleashing Transformers).

The front door for notebooks and scripts (docs/api.md): `uvq.load_pair` loads a trained or
imported prior with its VQGAN, then `uvq.sample_images`, `uvq.inpaint_tokens` and
`uvq.sample_canvases` / `uvq.decode_canvas` work on the loaded networks, and `uvq.write_samples`,
`uvq.inpaint_images` and `uvq.upscale_canvas` are the file-to-file calls behind the commands.

The names are resolved on first use (PEP 562 module `__getattr__`), so that `import uvq`, and
with it `uvq --help`, stays cheap: torch is imported by the first call that needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_FRONT_DOOR = {
    "load_pair": "uvq.checkpoint",
    "Pair": "uvq.checkpoint",
    "load_config": "uvq.config",
    "UserError": "uvq.errors",
    "sample_images": "uvq.sampling.chain",
    "sample_tokens": "uvq.sampling.chain",
    "write_samples": "uvq.sampling.outputs",
    "inpaint_tokens": "uvq.sampling.inpaint",
    "inpaint_images": "uvq.sampling.inpaint",
    "sample_canvases": "uvq.sampling.canvas",
    "decode_canvas": "uvq.sampling.canvas",
    "upscale_canvas": "uvq.sampling.canvas",
}

__all__ = ["__version__", *_FRONT_DOOR]


def __getattr__(name: str):
    if name in _FRONT_DOOR:
        value = getattr(importlib.import_module(_FRONT_DOOR[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'uvq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
