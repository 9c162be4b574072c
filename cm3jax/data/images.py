"""Decoded images of any mode -> the 8-bit RGB pixels they show, then the size a tokenizer takes.

``Image.convert('RGB')`` alone is wrong for several modes a user's folder holds: it clips 16-bit
greyscale (``I;16``, ``I``) to 255, drops alpha (showing whatever colour transparent pixels
happen to store) and ignores the EXIF orientation a camera writes. `to_rgb` handles each by what
it means:

- EXIF orientation: applied first (``ImageOps.exif_transpose``), so pixels are as displayed;
- 16-bit greyscale: scaled to 8 bits (``round(v / 257)``: 0 -> 0, 65535 -> 255, so an 8-bit
  image stored as 16 bits gives back exactly its 8-bit pixels);
- alpha (RGBA, LA, palettes or greyscale with a transparent colour): composited on
  ``background`` (an RGB triple; white by default, as a viewer shows it);
- palettes: expanded; CMYK: Pillow's conversion (no colour profile is applied);
- other modes (32-bit float, say): `UnusableImage`, which the sources skip and count.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')  # Pillow opens 16-bit greyscale PNGs as I;16 or I
_ALPHA = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
_PLAIN = ('RGB', 'L', '1', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV')


class UnusableImage(ValueError):
    """An image whose mode cannot be shown as 8-bit RGB without guessing."""


def background_of(background) -> tuple[int, int, int]:
    """An RGB triple of ints in [0, 255] (a config gives a list or tuple)."""
    bg = tuple(int(v) for v in background)
    if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
        raise ValueError(f'background={background!r}: give an RGB triple of ints in [0, 255], e.g. (255, 255, 255)')
    return bg


def to_rgb(img: Image.Image, background=WHITE) -> np.ndarray:
    """A decoded PIL image of any supported mode -> uint8 [H, W, 3]; see the module docstring."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnusableImage(f'mode {img.mode} with values in [{values.min()}, {values.max()}]: not a 16-bit image')
        img = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), 'L')  # round(v / 257)
    elif img.mode not in _ALPHA + _PLAIN:
        raise UnusableImage(f'mode {img.mode} has no 8-bit RGB meaning cm3jax knows; convert it to RGB first')
    if 'transparency' in img.info and img.mode in ('P', 'L', 'RGB'):
        img = img.convert('RGBA')  # a transparent palette entry or colour key is alpha
    if img.mode in _ALPHA:
        rgba = np.asarray(img.convert('RGBA'), np.int64)
        alpha = rgba[..., 3:]
        bg = np.asarray(background_of(background), np.int64)
        # exact round((c * a + bg * (255 - a)) / 255): 255 is odd, so no value lies on a half
        return ((rgba[..., :3] * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.asarray(img.convert('RGB'), np.uint8)


def size_of(resize) -> tuple[int, int] | None:
    """A source's ``resize``: None, 'none' or 'native' (keep each image's size), S, or (H, W)."""
    if resize is None or (isinstance(resize, str) and resize.strip().lower() in ('', 'none', 'native')):
        return None
    if isinstance(resize, str):
        try:
            resize = int(resize)
        except ValueError:
            raise ValueError(f'resize={resize!r}: give a positive int S, (height, width), or none') from None
    h, w = (resize, resize) if isinstance(resize, (int, np.integer)) else tuple(resize)
    if h < 1 or w < 1:
        raise ValueError(f'resize={resize!r}: give a positive int S, (height, width), or none')
    return int(h), int(w)


def fit(pixels: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [H, W, 3] -> with ``size=(h, w)``: scaled so the image covers h x w (bicubic), then
    centre-cropped to exactly h x w (aspect ratio kept, edges cut); None: unchanged."""
    if size is None:
        return pixels
    img = Image.fromarray(pixels)
    h, w = size
    scale = max(h / img.height, w / img.width)
    sw, sh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((sw, sh), Image.BICUBIC)
    left, top = (sw - w) // 2, (sh - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)), np.uint8)
