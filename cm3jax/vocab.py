"""The joint vocabulary: text (BPE) ids, image codes and special tokens in one id space.

A `Vocab` is frozen and says where everything lives; it holds no tokenizer. Two layouts:

- `Vocab.build` (CM3leon style, the default): specials first, then the BPE's text ids, then the
  image codes. ``Vocab.build(num_text=56_320 - 14, num_image_codes=8192)`` gives 56,320 ids
  before the image codes (6 specials, 8 sentinels); the tiny configs use a few hundred text ids.
- `Vocab.chameleon`: Chameleon's 65,536 ids, image codes at 4..8195 inside the BPE's range;
  each image is wrapped in begin-image ``<racm3:break>`` and end-image ``<eoss>``. Given the
  tokenizer's ``vocabulary_map`` it *is* Chameleon's tokenizer: text ids are the BPE ids.

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
      ``mask`` is None where the layout has no CM3 mask (Chameleon's tokenizer).
    image_end: the id closing an image; None: ``break_`` (CM3leon's one ``<break>`` between
      modalities); Chameleon's ``<eoss>``, with ``break_`` its begin-of-image.
    text_is_bpe: the text tokenizer's ids are the vocab's ids (no shift; Chameleon's tokenizer,
      whose BPE also holds the image and special tokens).
    """
    size: int
    text_ranges: tuple[tuple[int, int], ...]
    image_offset: int
    num_image_codes: int
    pad: int
    bos: int
    eos: int
    break_: int
    mask: int | None
    eoss: int
    sentinels: tuple[int, ...]
    image_end: int | None = None
    text_is_bpe: bool = False

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
        if self.image_end is not None and self.image_end not in specials:
            raise ValueError(f'vocab image_end={self.image_end} is none of the special ids {self.named_specials()}')

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
                  pad: int = 1, eos: int = 2, break_: int = 8197, eoss: int = 8196, mask: int | None = 8198,
                  num_sentinels: int = 8, vocabulary_map: dict[str, int] | None = None,
                  cm3_ids: tuple[int, ...] = ()) -> 'Vocab':
        """Chameleon's layout: one 65,536-id BPE whose ids ``image_offset`` .. +8191 are the image
        codes (``IMGIMG...`` tokens). ``break_`` is its begin-of-image ``<racm3:break>`` and
        ``eoss`` (= ``image_end``) its end-of-image ``<eoss>``.

        vocabulary_map: the tokenizer's token -> id map (tokenizer.json's vocab, or the HF
          config's ``vocabulary_map``). Then the vocab is that tokenizer: every id the BPE has is
          its own id (``text_is_bpe``), image code c is the id of the ``IMGIMG...`` token spelling
          c (digits as letters A-J), bos/pad/eos are ``<s>``/``<pad>``/``</s>``, the other ``<...>``
          tokens are neither text nor special (as in Meta's inference: never sampled), and there
          is no CM3 mask or sentinel unless ``cm3_ids`` names reserved ids for them (mask first).
          ``size``, ``image_offset``, ``num_image_codes`` and the special ids are read from the
          map; the other arguments are ignored.
        Without it: a Chameleon-shaped vocab for a BPE of your own, whose ids are shifted
        around the image and special ids (every id not taken is text); ``mask`` and the
        sentinels after it take reserved ids.
        """
        if vocabulary_map is not None:
            return cls._from_vocabulary_map(vocabulary_map, tuple(cm3_ids))
        sentinels = tuple(range(mask + 1, mask + 1 + num_sentinels)) if mask is not None else ()
        taken = {bos, pad, eos, break_, eoss, *sentinels, *range(image_offset, image_offset + num_image_codes)}
        taken |= {mask} if mask is not None else set()
        return cls(size=size, text_ranges=_gaps(taken, size),
                   image_offset=image_offset, num_image_codes=num_image_codes, pad=pad, bos=bos, eos=eos,
                   break_=break_, mask=mask, eoss=eoss, sentinels=sentinels, image_end=eoss)

    @classmethod
    def _from_vocabulary_map(cls, vocabulary_map: dict[str, int], cm3_ids: tuple[int, ...]) -> 'Vocab':
        digits = str.maketrans('ABCDEFGHIJ', '0123456789')
        codes = {}
        for name, i in vocabulary_map.items():
            if name.startswith('IMGIMG') and name.endswith('Z'):
                code = name[len('IMGIMG'):-1].translate(digits)
                if not code.isdigit():
                    raise ValueError(f'vocabulary_map token {name!r} does not spell an image code (letters A-J)')
                codes[int(code)] = int(i)
        if not codes:
            raise ValueError('the vocabulary_map has no IMGIMG... image tokens: it is not a Chameleon tokenizer')
        k = len(codes)
        offset = codes.get(0, -1)
        if sorted(codes) != list(range(k)) or any(codes[c] != offset + c for c in codes):
            raise ValueError(f'the vocabulary_map\'s {k} image tokens are not codes 0..{k - 1} at consecutive ids; '
                             f'cm3jax needs image code c at id offset + c')
        named = {}
        for field, token in (('bos', '<s>'), ('pad', '<pad>'), ('eos', '</s>'), ('break_', '<racm3:break>'),
                             ('eoss', '<eoss>')):
            if token not in vocabulary_map:
                raise ValueError(f'the vocabulary_map has no {token!r} token ({field}): it is not a Chameleon tokenizer')
            named[field] = int(vocabulary_map[token])
        size = max(vocabulary_map.values()) + 1
        if len(set(vocabulary_map.values())) != size:
            raise ValueError(f'the vocabulary_map\'s ids are not 0..{size - 1} each once')
        mask, sentinels = (cm3_ids[0], tuple(cm3_ids[1:])) if cm3_ids else (None, ())
        # Meta's inference: every <...> token but "<" is special, never text; the ones cm3jax does not
        # name (<unk>, <image>, the <reservedNNNNN>) are in no group, so the sampler never draws them
        marked = {int(i) for name, i in vocabulary_map.items() if name.startswith('<') and name != '<'}
        taken = {*named.values(), *cm3_ids, *range(offset, offset + k), *marked}
        return cls(size=size, text_ranges=_gaps(taken, size), image_offset=offset, num_image_codes=k, mask=mask,
                   sentinels=sentinels, image_end=named['eoss'], text_is_bpe=True, **named)

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
    def bpe_capacity(self) -> int:
        """How many ids a text tokenizer may have: ``num_text`` (its ids are shifted into the text
        ranges), or ``size`` when the tokenizer is the vocab (``text_is_bpe``)."""
        return self.size if self.text_is_bpe else self.num_text

    @property
    def end_image(self) -> int:
        """The id that closes an image span: ``image_end``, else ``break_``."""
        return self.break_ if self.image_end is None else self.image_end

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.pad, self.bos, self.eos, self.break_, self.mask, self.eoss, *self.sentinels)
                     if i is not None)

    def named_specials(self) -> dict[str, int]:
        named = dict(zip(SPECIAL_NAMES, (self.pad, self.bos, self.eos, self.break_, self.mask, self.eoss)))
        return {**{k: v for k, v in named.items() if v is not None},
                **{f'<mask:{i}>': s for i, s in enumerate(self.sentinels)}}

    def require_mask(self) -> int:
        """The CM3 ``<mask>`` id, or an error saying this vocab has none."""
        if self.mask is None:
            raise ValueError('this vocab has no CM3 <mask> (Chameleon\'s tokenizer): name reserved ids for it with '
                             'Vocab.chameleon(vocabulary_map=..., cm3_ids=(mask, sentinel 0, ...))')
        return self.mask

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
        """Ids of the text tokenizer, [0, num_text) -> joint-vocab ids (numpy); unchanged, only
        range-checked, when ``text_is_bpe``."""
        bpe_ids = np.asarray(bpe_ids)
        if self.text_is_bpe:
            if bpe_ids.size and (bpe_ids.min() < 0 or bpe_ids.max() >= self.size):
                raise ValueError(f'text tokenizer ids must lie in [0, {self.size}); got [{bpe_ids.min()}, '
                                 f'{bpe_ids.max()}]: the tokenizer is larger than the vocab')
            return bpe_ids.astype(np.int32)
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
        if self.text_is_bpe:
            return ids.astype(np.int32)
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
        if d['image_end'] is None:  # absent when off: older vocabs keep their fingerprints
            del d['image_end']
        if not d['text_is_bpe']:
            del d['text_is_bpe']
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


def _gaps(taken: set[int], size: int) -> tuple[tuple[int, int], ...]:
    """The half-open ranges of [0, size) that hold no id of ``taken``."""
    ranges, start = [], 0
    for i in sorted(taken) + [size]:
        if i > start:
            ranges.append((start, i))
        start = i + 1
    return tuple(ranges)
