"""The joint vocabulary: text (BPE) ids, image codes and special tokens in one id space.

A `Vocab` is frozen and says where everything lives; it holds no tokenizer. Two layouts:

- `Vocab.build` (CM3leon style, the default): specials first, then the BPE's text ids, then the
  image codes. ``Vocab.build(num_text=56_320 - 14, num_image_codes=8192)`` gives 56,320 ids
  before the image codes (6 specials, 8 sentinels); the tiny configs use a few hundred text ids.
- `Vocab.chameleon`: Chameleon's 65,536 ids, image codes at 4..8195 inside the BPE's range.

Token groups (text / image / special) are predicates on id arrays that work on numpy and jax
arrays alike: the loss splits its metrics by them, the data pipeline uses them to keep CM3
spans inside one modality, and the sampler turns them into logits masks (`allowed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

PAD_MULTIPLE = 128  # embedding rows are padded to this (TPU lane width); see `padded_size`
SPECIAL_NAMES = ('pad', 'bos', 'eos', 'break', 'mask', 'eoss')  # eoss: end of a CM3 span
GROUPS = ('text', 'image', 'special')


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Where every kind of id lives.

    size: real ids; ids in [size, padded_size) exist only as padding of the embedding.
    text_ranges: half-open [start, stop) ranges of text ids.
    image_offset, num_image_codes: image code c is id ``image_offset + c``.
    pad .. eoss: the special ids (`SPECIAL_NAMES`); sentinels: CM3's enumerated ``<mask:i>``.
    """
    size: int
    text_ranges: tuple[tuple[int, int], ...]
    image_offset: int
    num_image_codes: int
    pad: int
    bos: int
    eos: int
    break_: int
    mask: int
    eoss: int
    sentinels: tuple[int, ...]

    def __post_init__(self):
        specials = self.special_ids
        if len(set(specials)) != len(specials):
            raise ValueError(f'vocab special ids must be distinct; got {self.named_specials()}')
        spans = [(a, b, 'text') for a, b in self.text_ranges]
        spans.append((self.image_offset, self.image_offset + self.num_image_codes, 'image'))
        for a, b, what in spans:
            if not 0 <= a < b <= self.size:
                raise ValueError(f'vocab {what} range [{a}, {b}) is empty or outside [0, size={self.size})')
        spans.sort()
        for (_, b0, w0), (a1, _, w1) in zip(spans, spans[1:]):
            if a1 < b0:
                raise ValueError(f'vocab {w0} and {w1} ranges overlap at id {a1}')
        for name, i in self.named_specials().items():
            if not 0 <= i < self.size:
                raise ValueError(f'vocab special {name}={i} is outside [0, size={self.size})')
            if any(a <= i < b for a, b, _ in spans):
                raise ValueError(f'vocab special {name}={i} falls inside a text or image range')

    # ---- Layouts ----

    @classmethod
    def build(cls, num_text: int, num_image_codes: int, num_sentinels: int = 8) -> 'Vocab':
        """CM3leon's layout: [specials | sentinels | text (num_text BPE ids) | image codes]."""
        if num_text < 1 or num_image_codes < 1 or num_sentinels < 1:
            raise ValueError(f'vocab needs num_text, num_image_codes and num_sentinels >= 1; got '
                             f'{num_text}, {num_image_codes}, {num_sentinels}')
        n = len(SPECIAL_NAMES)
        text = n + num_sentinels
        image = text + num_text
        return cls(size=image + num_image_codes, text_ranges=((text, image),), image_offset=image,
                   num_image_codes=num_image_codes, pad=0, bos=1, eos=2, break_=3, mask=4, eoss=5,
                   sentinels=tuple(range(n, n + num_sentinels)))

    @classmethod
    def chameleon(cls, size: int = 65_536, num_image_codes: int = 8192, image_offset: int = 4, bos: int = 0,
                  pad: int = 1, eos: int = 2, break_: int = 8197, eoss: int = 8196, mask: int = 8198,
                  num_sentinels: int = 8) -> 'Vocab':
        """Chameleon's layout: one 65,536-id BPE whose ids ``image_offset`` .. +8191 are the image
        codes (``IMGIMG...`` tokens). ``break_`` is its begin-of-image ``<racm3:break>`` and
        ``eoss`` its end-of-image ``<eoss>``. Chameleon has no CM3 mask, so ``mask`` and the
        sentinels after it take reserved ids: check them against your tokenizer.json."""
        sentinels = tuple(range(mask + 1, mask + 1 + num_sentinels))
        taken = sorted({bos, pad, eos, break_, eoss, mask, *sentinels, *range(image_offset,
                                                                                image_offset + num_image_codes)})
        ranges, start = [], 0
        for i in taken + [size]:  # text = every id not taken
            if i > start:
                ranges.append((start, i))
            start = i + 1
        return cls(size=size, text_ranges=tuple(ranges), image_offset=image_offset,
                   num_image_codes=num_image_codes, pad=pad, bos=bos, eos=eos, break_=break_, mask=mask,
                   eoss=eoss, sentinels=sentinels)

    @classmethod
    def from_config(cls, config) -> 'Vocab':
        """From a config block ``{layout: 'cm3leon' | 'chameleon', num_text, num_image_codes,
        num_sentinels}``."""
        layout = config.get('layout', 'cm3leon')
        if layout == 'cm3leon':
            return cls.build(config.num_text, config.num_image_codes, config.get('num_sentinels', 8))
        if layout == 'chameleon':
            return cls.chameleon(num_image_codes=config.num_image_codes,
                                 num_sentinels=config.get('num_sentinels', 8))
        raise ValueError(f"vocab.layout={layout!r}; choose 'cm3leon' or 'chameleon'")

    # ---- Sizes and ids ----

    @property
    def padded_size(self) -> int:
        """``size`` rounded up to a multiple of 128 (the model may pad further for its mesh)."""
        return -(-self.size // PAD_MULTIPLE) * PAD_MULTIPLE

    @property
    def num_text(self) -> int:
        return sum(b - a for a, b in self.text_ranges)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad, self.bos, self.eos, self.break_, self.mask, self.eoss, *self.sentinels)

    def named_specials(self) -> dict[str, int]:
        return {**dict(zip(SPECIAL_NAMES, self.special_ids)),
                **{f'<mask:{i}>': s for i, s in enumerate(self.sentinels)}}

    def sentinel(self, i: int) -> int:
        if not 0 <= i < len(self.sentinels):
            raise ValueError(f'sentinel {i} does not exist: this vocab has {len(self.sentinels)} '
                             f'(raise vocab.num_sentinels or clamp the CM3 span count)')
        return self.sentinels[i]

    def image_ids(self, codes):
        """Image codes Int[...] in [0, num_image_codes) -> token ids."""
        return codes + self.image_offset

    def image_codes(self, ids):
        """Image token ids -> codes (ids outside the image range give values outside [0, K))."""
        return ids - self.image_offset

    def text_ids(self, bpe_ids):
        """Ids of the text tokenizer, [0, num_text) -> joint-vocab ids (numpy)."""
        bpe_ids = np.asarray(bpe_ids)
        if bpe_ids.size and (bpe_ids.min() < 0 or bpe_ids.max() >= self.num_text):
            raise ValueError(f'text tokenizer ids must lie in [0, {self.num_text}); got '
                             f'[{bpe_ids.min()}, {bpe_ids.max()}]: the tokenizer is larger than vocab.num_text')
        starts = np.array([a for a, _ in self.text_ranges])
        cum = np.cumsum([0] + [b - a for a, b in self.text_ranges])
        which = np.searchsorted(cum, bpe_ids, side='right') - 1
        return (starts[which] + bpe_ids - cum[which]).astype(np.int32)

    def bpe_ids(self, ids):
        """Joint-vocab text ids -> the text tokenizer's ids (numpy); inverse of `text_ids`."""
        ids = np.asarray(ids)
        if not np.all(self.is_text(ids)):
            raise ValueError(f'bpe_ids takes text ids only; got {ids[~self.is_text(ids)][:8].tolist()}')
        out = np.zeros(ids.shape, np.int32)
        base = 0
        for a, b in self.text_ranges:
            inside = (ids >= a) & (ids < b)
            out = np.where(inside, ids - a + base, out)
            base += b - a
        return out

    # ---- Groups (numpy or jax arrays) ----

    def is_image(self, ids):
        return (ids >= self.image_offset) & (ids < self.image_offset + self.num_image_codes)

    def is_text(self, ids):
        out = ids < 0  # all False, in the array's own library
        for a, b in self.text_ranges:
            out = out | ((ids >= a) & (ids < b))
        return out

    def is_special(self, ids):
        out = ids < 0
        for s in self.special_ids:
            out = out | (ids == s)
        return out

    def groups(self, ids) -> dict[str, Any]:
        """{'text', 'image', 'special'} -> Bool[...] masks of ``ids`` (for the loss's group metrics)."""
        return {'text': self.is_text(ids), 'image': self.is_image(ids), 'special': self.is_special(ids)}

    def allowed(self, *groups: str, extra: tuple[int, ...] = ()) -> np.ndarray:
        """Bool[padded_size]: True for ids in ``groups`` (and the ``extra`` ids); padding ids are
        never allowed. The sampler's modality masks."""
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f'unknown token groups {sorted(unknown)}; choose from {GROUPS}')
        ids = np.arange(self.padded_size)
        keep = np.zeros(self.padded_size, bool)
        for g in groups:
            keep |= getattr(self, f'is_{g}')(ids)
        keep[list(extra)] = True
        keep[self.size:] = False
        return keep

    # ---- Serialisation (data manifests, checkpoints) ----

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d['text_ranges'] = [list(r) for r in self.text_ranges]
        d['sentinels'] = list(self.sentinels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'Vocab':
        return cls(**{**d, 'text_ranges': tuple(tuple(r) for r in d['text_ranges']),
                      'sentinels': tuple(d['sentinels'])})

    def fingerprint(self) -> str:
        """A short hash of the layout, to refuse data prepared for another vocab."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self, ids) -> list[str]:
        """Readable names for ids (debugging and docs): specials by name, image codes as
        ``img:c``, text as ``t:i`` (the BPE id)."""
        names = {v: (k if k.startswith('<') else f'<{k}>') for k, v in self.named_specials().items()}
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i in names:
                out.append(names[i])
            elif self.is_image(i):
                out.append(f'img:{i - self.image_offset}')
            elif self.is_text(i):
                out.append(f't:{int(self.bpe_ids(np.array([i]))[0])}')
            else:
                out.append(f'?{i}')
        return out
