"""Decode untrusted image bytes into RGB, or say precisely why not.

One function, `load_image`, shared by CapFilt (every record of a web corpus) and Serve (every request
body). Web images come in every mode PIL knows and in every state of damage, so the contract is narrow:
either a fully decoded RGB `PIL.Image.Image` comes back, or `ImageError` is raised with a short
machine-readable `reason` (one of `REASONS`) and a sentence for humans.

Limits are arguments, not PIL's process-wide `Image.MAX_IMAGE_PIXELS`: the header's size is checked
against them *before* any pixel is decoded (a decompression bomb is a small file that claims a huge
canvas), and PIL's own bomb warning/error, which fire on its global limit, are mapped to the same reason
so they never escape as anything else.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

REASONS = ("empty", "not_an_image", "truncated", "decompression_bomb", "too_large", "unsupported_mode")

# Modes whose alpha (or palette transparency) must be composited onto white rather than dropped:
# dropping alpha turns transparent pixels into whatever colour the encoder left there (often black).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageError(ValueError):
    """An image that cannot be used. `reason` is one of `REASONS`; `str(e)` explains it."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown image error reason {reason!r}")
        super().__init__(message)
        self.reason = reason


def load_image(data: bytes, *, max_pixels: int = 40_000_000, max_side: int = 16_384) -> Image.Image:
    """Verify and fully decode `data`; return it as an RGB image.

    Normalises CMYK, 16-bit and 32-bit integer/float greyscale (scaled, not clipped), RGBA/LA and
    palette images with transparency (composited on white), palette, 1-bit and greyscale images.
    Multi-frame files (GIF, APNG, TIFF) give their first frame.

    Raises ImageError with reason
      "empty"              — no bytes;
      "not_an_image"       — not a format PIL recognises, or a header that makes no sense;
      "decompression_bomb" — the header claims more than `max_pixels` pixels;
      "too_large"          — a side longer than `max_side`;
      "truncated"          — a valid header but the pixel data is cut short or corrupt;
      "unsupported_mode"   — decoded, but in a mode with no sensible RGB rendering.
    """
    if data is None or len(data) == 0:
        raise ImageError("empty", "the image is empty (0 bytes)")
    if max_pixels <= 0 or max_side <= 0:
        raise ValueError("max_pixels and max_side must be positive")
    with warnings.catch_warnings():
        # PIL warns (above its global limit) or raises (above twice that) on bombs; make both an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(bytes(data)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageError("decompression_bomb", f"decompression bomb refused by PIL: {error}") from None
        except UnidentifiedImageError:
            raise ImageError("not_an_image", f"not an image format PIL recognises ({len(data)} bytes)") from None
        except Exception as error:  # malformed headers raise SyntaxError, struct.error, ValueError, ...
            raise ImageError("not_an_image", f"unreadable image header: {type(error).__name__}: {error}") from None

        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError("not_an_image", f"the header claims an empty canvas {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(
                "decompression_bomb",
                f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
                f" ({len(data):,} bytes on disk)",
            )
        if max(width, height) > max_side:
            raise ImageError("too_large", f"{width}x{height} has a side longer than {max_side}")

        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageError("decompression_bomb", f"decompression bomb refused by PIL: {error}") from None
        except Exception as error:  # OSError("image file is truncated"), EOFError, decoder errors
            raise ImageError(
                "truncated", f"{image.format} image could not be decoded: {type(error).__name__}: {error}"
            ) from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(image)).convert("RGB")
    try:
        return image.convert("RGB")  # CMYK, YCbCr, L, 1, P
    except Exception as error:
        raise ImageError("unsupported_mode", f"cannot render mode {image.mode} as RGB: {error}") from None


def _scale_to_uint8(image: Image.Image) -> np.ndarray:
    """High-bit-depth greyscale to 8 bits by scaling its nominal range (PIL's convert would clip)."""
    values = np.asarray(image).astype(np.float64)  # (H, W)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        top = 1.0  # float images conventionally hold [0, 1]
    elif values.size and np.nanmax(values) > 255:
        top = 65535.0 if np.nanmax(values) <= 65535 else float(np.nanmax(values))
    else:
        top = 255.0
    scaled = np.nan_to_num(values / top * 255.0, nan=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
