"""uvq: discrete absorbing diffusion over vector-quantized codes (Unleashing Transformers)."""

__version__ = "0.1.0"
