"""Image mode handling shared by preprocessing, training and serving (one set of rules everywhere).

Any Pillow image becomes 8-bit RGB: alpha is composited over white, 16-bit/32-bit/float grayscale is scaled
(never clipped), CMYK and palette images are converted. The serving bundle ships this file beside the handler.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to 0..255 (16-bit: divide by 257; never clip)."""
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        scaled = a / 257.0
    elif arr.dtype.kind in "iu" and lo >= 0 and hi <= 255:
        scaled = a
    elif arr.dtype.kind in "iu" and lo >= 0 and hi <= 65535:  # 16-bit samples held in a 32-bit mode "I" image
        scaled = a / 257.0
    elif arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        scaled = a * 255.0
    elif arr.dtype.kind == "f" and lo >= 0.0 and hi <= 255.0:
        scaled = a
    elif hi > lo:  # unknown range: stretch to 0..255
        scaled = (a - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(a)
    return np.round(scaled).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha over white, 16-bit/32-bit/float scaled, CMYK/palette converted.

    Raises ``ValueError`` for a mode Pillow cannot convert.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(to_uint8(np.asarray(img)), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported colour mode {mode!r}: {exc}") from exc
