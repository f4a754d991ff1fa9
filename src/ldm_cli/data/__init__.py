"""Images in: data sources, decoding, the uint8 cache with its held-out split, and
`builtin:faces`. `load_images(cfg.data)` is the entry point training uses."""

from __future__ import annotations

from ldm_cli.data.cache import ImageSet
from ldm_cli.data.decoding import load_image_file
from ldm_cli.data.pixels import random_flip, to_float, to_uint8
from ldm_cli.data.prepare import load_images

__all__ = ["ImageSet", "load_images", "load_image_file", "random_flip", "to_float", "to_uint8"]
