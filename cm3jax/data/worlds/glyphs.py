"""Glyphs: the how-to-write task of the Shapes world -- text drawn in a tiny pixel font, and read back.

Instruction tuning asks the model to 'draw "{text}"' and expects an image of that text; this module
makes the target images (`render_text`, `sample_text`) and grades the model's ones (`read_text`,
`legible`). The font is a 3x5 bitmap per character of `ALPHABET` (lowercase letters and digits),
designed here so every two glyphs differ in at least 2 font pixels.

Reading is template matching, not a learned OCR: the font, scale and spacing are known exactly, so
the best explanation of the ink as a line of glyphs is cheap to find, needs no training, and cannot
itself be a source of error when it grades a model.

numpy only. Shapes: a glyph is bool [5, 3] (rows, columns); images are uint8 [H, W, 3].
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cm3jax.data.worlds.shapes import BACKGROUND, PALETTE

ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789'

# One line per character: its five rows, top first, '#' = ink. Lowercase letters with no ascender
# leave the top row blank, so the reader cannot assume the ink's bounding box is the glyph box.
_FONT = """
a ... ##. .## #.# .##    b #.. ##. #.# #.# ##.    c ... .## #.. #.. .##    d ..# .## #.# #.# .##
e .#. #.# ### #.. .##    f .## #.. ### #.. #..    g .## #.# .## ..# ##.    h #.. #.. ##. #.# #.#
i .#. ... .#. .#. .#.    j ..# ... ..# #.# .#.    k #.. #.# ##. ##. #.#    l ##. .#. .#. .#. ###
m ... ### ### #.# #.#    n ... ##. #.# #.# #.#    o ... .#. #.# #.# .#.    p ##. #.# ##. #.. #..
q .## #.# .## ..# ..#    r ... #.# ##. #.. #..    s .## #.. .#. ..# ##.    t .#. ### .#. .#. ..#
u ... #.# #.# #.# .##    v ... #.# #.# .#. .#.    w ... #.# #.# ### #.#    x #.# #.# .#. #.# #.#
y #.# #.# .## ..# ##.    z ... ### .#. #.. ###    0 ### #.# #.# #.# ###    1 .#. ##. .#. .#. ###
2 ##. ..# .#. #.. ###    3 ##. ..# .#. ..# ##.    4 #.# #.# ### ..# ..#    5 ### #.. ##. ..# ##.
6 .## #.. ### #.# ###    7 ### ..# .#. .#. .#.    8 .#. #.# .#. #.# .#.    9 ### #.# ### ..# ##.
"""
_WORDS = _FONT.split()
_ROWS = {_WORDS[i]: _WORDS[i + 1:i + 6] for i in range(0, len(_WORDS), 6)}
GLYPHS = np.array([[[p == '#' for p in row] for row in _ROWS[c]] for c in ALPHABET])  # bool [36, 5, 3]
GLYPHS.flags.writeable = False  # shared by every caller; `glyph` hands out copies
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
# Ink is a soft mask, 0 below INK_THRESHOLD - _RAMP and 1 above INK_THRESHOLD + _RAMP (brightest
# channel): far above the black background plus noise, below every palette colour (>= 210), and
# soft so that a font pixel a blur has dimmed still counts for part of a pixel rather than nothing.
INK_THRESHOLD = 96
_RAMP = 64


def glyph(ch: str) -> np.ndarray:
    """bool [5, 3]: the bitmap of one character of `ALPHABET`."""
    if not isinstance(ch, str) or ch not in _INDEX:
        raise ValueError(f'glyph: {ch!r} is not a character of ALPHABET {ALPHABET!r}')
    return GLYPHS[_INDEX[ch]].copy()


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    """canvas: image side in pixels. scale: each font pixel is a scale x scale block.
    spacing: blank font pixels between glyphs (before scaling). min_chars / max_chars: length of
    sampled strings. colours: names from `PALETTE`. align: the line's top-left corner is the
    centred one rounded down to a multiple of ``align`` pixels. Set it to the image tokenizer's
    patch side (a multiple of ``scale``) so that no font pixel straddles two patches; a centred
    line of odd offset puts every 2x2 font pixel across four 4x4 patches, and the quickstart's
    VQ-GAN then rebuilds only a quarter of the strings legibly (docs/sft.md).
    """
    canvas: int = 32
    scale: int = 2
    spacing: int = 1
    min_chars: int = 1
    max_chars: int = 3
    colours: tuple[str, ...] = ('red', 'green', 'blue', 'yellow', 'purple', 'cyan')
    align: int = 1

    def __post_init__(self):
        # A tuple keeps the config hashable whatever container the caller (a config file) used.
        object.__setattr__(self, 'colours', tuple(self.colours))

        def fail(field, msg):
            raise ValueError(f'WriteConfig.{field}: {msg}')
        if self.scale < 1:
            fail('scale', f'must be >= 1, got {self.scale}')
        if self.spacing < 0:
            fail('spacing', f'must be >= 0, got {self.spacing}')
        if self.align < 1:
            fail('align', f'must be >= 1, got {self.align}')
        if self.canvas < 5 * self.scale:
            fail('canvas', f'{self.canvas} pixels is shorter than one glyph ({5 * self.scale} at scale '
                           f'{self.scale}); raise canvas or lower scale')
        if not 1 <= self.min_chars <= self.max_chars:
            fail('min_chars', f'need 1 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}')
        if self.max_chars > self.max_fit:
            fail('max_chars', f'{self.max_chars} glyphs need {self.width(self.max_chars)} pixels at scale '
                              f'{self.scale} and spacing {self.spacing}, but the canvas is {self.canvas} '
                              f'(at most {self.max_fit} fit); lower max_chars, scale or spacing, or raise canvas')
        if not self.colours or len(set(self.colours)) != len(self.colours):
            fail('colours', f'need distinct names, got {self.colours}')
        bad = [c for c in self.colours if c not in PALETTE]
        if bad:
            fail('colours', f'unknown {bad}; known: {sorted(PALETTE)}')
        dim = [c for c in self.colours if max(PALETTE[c]) < INK_THRESHOLD + _RAMP]
        if dim:
            fail('colours', f'{dim} too dark for the reader (needs a channel >= {INK_THRESHOLD + _RAMP})')

    def width(self, n: int) -> int:
        """Pixels taken by a line of n glyphs."""
        return (n * (3 + self.spacing) - self.spacing) * self.scale

    @property
    def max_fit(self) -> int:
        """How many glyphs fit on one line of the canvas."""
        return (self.canvas + self.spacing * self.scale) // ((3 + self.spacing) * self.scale)


def _check_text(text: str, max_fit: int) -> None:
    if not isinstance(text, str) or not text:
        raise ValueError(f'render_text: need a non-empty string, got {text!r}')
    bad = sorted({c for c in text if c not in _INDEX})
    if bad:
        raise ValueError(f'render_text: {bad} in {text!r} are not characters of ALPHABET {ALPHABET!r}')
    if len(text) > max_fit:
        raise ValueError(f'render_text: {text!r} has {len(text)} characters; at most {max_fit} fit this canvas')


def render_text(text: str, colour: str, cfg: WriteConfig = WriteConfig()) -> np.ndarray:
    """uint8 [canvas, canvas, 3]: `text` on one line in a `PALETTE` colour on `BACKGROUND`, centred
    (down to a multiple of ``cfg.align``)."""
    _check_text(text, cfg.max_fit)
    if colour not in PALETTE:
        raise ValueError(f'render_text: unknown colour {colour!r}; known: {sorted(PALETTE)}')
    pitch = 3 + cfg.spacing
    line = np.zeros((5, len(text) * pitch - cfg.spacing), bool)
    for i, c in enumerate(text):
        line[:, i * pitch:i * pitch + 3] = GLYPHS[_INDEX[c]]
    line = line.repeat(cfg.scale, 0).repeat(cfg.scale, 1)
    img = np.empty((cfg.canvas, cfg.canvas, 3), np.uint8)
    img[:] = BACKGROUND
    a = cfg.align
    y0, x0 = (cfg.canvas - line.shape[0]) // 2 // a * a, (cfg.canvas - line.shape[1]) // 2 // a * a
    img[y0:y0 + line.shape[0], x0:x0 + line.shape[1]][line] = PALETTE[colour]
    return img


def sample_text(rng: np.random.Generator, cfg: WriteConfig = WriteConfig()) -> tuple[str, str]:
    """(text, colour): min_chars..max_chars uniform characters of `ALPHABET`, a colour of cfg.colours."""
    n = int(rng.integers(cfg.min_chars, cfg.max_chars + 1))
    text = ''.join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), n))
    return text, cfg.colours[int(rng.integers(len(cfg.colours)))]


def read_text(image: np.ndarray, cfg: WriteConfig = WriteConfig()) -> str:
    """The string drawn on uint8 [H, W, 3] `image` at cfg's scale and spacing; '' if there is no ink.

    Each candidate cell is downsampled to its 5x3 font pixels (ink per scale x scale block) and
    scored against every glyph by the pixels they disagree on: Hamming distance after a majority
    vote per font pixel, but one that keeps each vote's margin. The reader picks
    the line (n glyphs, top-left corner, characters) that disagrees with the image least, ink
    outside every cell counting against it. It searches every translation, not the ink's bounding
    box, because that box is not the glyph box (blank top rows, the blank sides of 'i') and a
    model's drawing need not be centred; ties go to the layout nearest the centre.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'read_text: need an [H, W, 3] image, got shape {image.shape}')
    ink = np.clip((image.max(-1).astype(np.float32) - (INK_THRESHOLD - _RAMP)) / (2 * _RAMP), 0, 1)
    if not ink.any():
        return ''
    s, (h, w) = cfg.scale, ink.shape
    pitch = (3 + cfg.spacing) * s
    # A glyph's blank outer row or column (plus a pixel of shift) may fall off the image; an image
    # smaller than a glyph gets room for one.
    py, px = max(s + 1, 5 * s - h), max(s + 1, 3 * s - w)
    padded = np.pad(ink, ((py, py), (px, px))).astype(np.float64)
    summed = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    blocks = summed[s:, s:] - summed[:-s, s:] - summed[s:, :-s] + summed[:-s, :-s]  # s x s ink sums
    cells = sliding_window_view(blocks, (4 * s + 1, 2 * s + 1))[:, :, ::s, ::s]  # [Y, X, 5, 3] from (y, x)
    ny, nx = cells.shape[:2]
    font = GLYPHS.reshape(len(ALPHABET), 15).astype(np.float64)
    inside = cells.sum((2, 3))
    # Disagreement = ink the glyph lacks + glyph pixels without ink = inside + |glyph| - 2 overlap.
    mismatch = inside[..., None] + s * s * font.sum(1) - 2 * np.einsum('yxk,gk->yxg', cells.reshape(ny, nx, 15), font)
    best, which, total = mismatch.min(-1), mismatch.argmin(-1), ink.sum(dtype=np.float64)
    top, left = np.arange(ny)[:, None] - py, np.arange(nx)[None] - px  # cell origin -> image coordinates
    choice = (np.inf, np.inf, '')
    for n in range(1, max(1, (w + cfg.spacing * s) // pitch) + 1):
        m = nx - (n - 1) * pitch  # first-cell columns whose last cell is still on the padded image
        if m <= 0:
            break
        cols = [slice(k * pitch, k * pitch + m) for k in range(n)]
        cost = sum(best[:, c] for c in cols) + total - sum(inside[:, c] for c in cols)
        off_centre = np.abs(top - (h - 5 * s) // 2) + np.abs(left[:, :m] - (w - cfg.width(n)) // 2)
        off_centre = np.where(cost <= cost.min() + 1e-6, off_centre, np.inf)
        y, x = np.unravel_index(np.argmin(off_centre), cost.shape)
        if cost[y, x] < choice[0] - 1e-6 or (cost[y, x] <= choice[0] + 1e-6 and off_centre[y, x] < choice[1]):
            choice = (cost[y, x], off_centre[y, x], ''.join(ALPHABET[which[y, x + k * pitch]] for k in range(n)))
    return choice[2]


def legible(image: np.ndarray, text: str, cfg: WriteConfig = WriteConfig()) -> bool:
    """Whether `image` reads as exactly `text`."""
    return read_text(image, cfg) == text
