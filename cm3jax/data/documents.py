"""Multimodal documents, and how one becomes token ids.

A `Document` is an ordered list of segments: ``str`` for text, ``np.ndarray`` uint8
[H, W, C] for an image (or, once prepared, int [h, w] VQ codes). Sources (`cm3jax.data.sources`)
yield them; `prepare` tokenizes them; `tokens` lays them out as CM3leon does (docs/paper.md, "Tokenizers"):

    caption <break> [h*w image ids] <eos>          text-to-image order
    [h*w image ids] <break> caption <eos>          image-to-text order

with a ``<break>`` at every switch of modality and ``<eos>`` at the end.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Union

import numpy as np

Segment = Union[str, np.ndarray]
HEADER = 'header'  # Document.meta key: fields that `prepare` copies into the record's header


@dataclasses.dataclass
class Document:
    """segments: text (str) or image (uint8 [H, W, C] pixels, or int [h, w] codes); id: unique
    within its source; meta: free-form (e.g. the Shapes scene graph)."""
    segments: list[Segment]
    id: str = ''
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [s for s in self.segments if isinstance(s, str)]

    @property
    def images(self) -> list[np.ndarray]:
        return [s for s in self.segments if not isinstance(s, str)]

    @property
    def modalities(self) -> str:
        """'text', 'image' or 'image+text' (retrieval prefers documents with both)."""
        kinds = {'text' if isinstance(s, str) else 'image' for s in self.segments}
        return 'image+text' if len(kinds) > 1 else next(iter(kinds), 'text')


# ---- Prepared documents: segments as joint-vocab ids ----

@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """How a prepared document is laid out at training time (drawn per example, per epoch).

    text_first: probability that a text+image pair is laid out caption-first (text-to-image);
      otherwise image-first (image-to-text). Other documents keep their order.
    caption_dropout: probability that every text segment of a document with an image becomes
      one ``<mask>`` (classifier-free guidance needs T(y | <mask>); docs/paper.md, "Decoding").
    """
    text_first: float = 0.5
    caption_dropout: float = 0.0

    def __post_init__(self):
        for name in ('text_first', 'caption_dropout'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'data.layout.{name}={getattr(self, name)} must lie in [0, 1]')


def segment_ids(segment: Segment, vocab, text_tokenizer) -> np.ndarray:
    """One segment -> Int32[n] joint-vocab ids: text through the BPE, image codes Int[h, w]
    (already VQ-encoded) through ``vocab.image_ids``."""
    if isinstance(segment, str):
        return text_tokenizer.encode_joint(segment, vocab)
    codes = np.asarray(segment)
    if codes.dtype == np.uint8 and codes.ndim == 3:
        raise TypeError('segment_ids takes VQ codes Int[h, w], not pixels: encode images first (cm3jax.data.prepare)')
    if codes.size and (codes.min() < 0 or codes.max() >= vocab.num_image_codes):
        raise ValueError(f'image codes must lie in [0, {vocab.num_image_codes}); got [{codes.min()}, {codes.max()}]: '
                         f'the VQ tokenizer has more codes than vocab.num_image_codes')
    return np.asarray(vocab.image_ids(codes.reshape(-1)), np.int32)


def layout(segments: list[np.ndarray], is_image: list[bool], vocab, rng: np.random.Generator,
           cfg: LayoutConfig = LayoutConfig()) -> np.ndarray:
    """Joint-vocab segments -> Int32[T] tokens ``seg <break> seg ... <eos>``.

    A ``<break>`` goes wherever an image starts or ends (two text segments in a row are joined
    as they are). rng draws the order and the caption dropout.
    """
    if len(segments) != len(is_image) or not segments:
        raise ValueError(f'layout needs one is_image flag per segment and at least one segment; got '
                         f'{len(segments)} segments and {len(is_image)} flags')
    segments, is_image = list(segments), list(is_image)
    if len(segments) == 2 and is_image[0] != is_image[1]:
        text_first = rng.random() < cfg.text_first
        if text_first == is_image[0]:
            segments, is_image = segments[::-1], is_image[::-1]
    if cfg.caption_dropout and any(is_image) and rng.random() < cfg.caption_dropout:
        segments = [s if img else np.array([vocab.require_mask()], np.int32) for s, img in zip(segments, is_image)]
    return np.concatenate([join(segments, is_image, vocab), [vocab.eos]]).astype(np.int32)


def join(segments: list[np.ndarray], is_image: list[bool], vocab) -> np.ndarray:
    """Segments in the given order with ``<break>`` wherever an image starts or ends, also
    between two images (no ``<eos>``). Where the vocab closes images with a token of their own
    (Chameleon: ``<racm3:break>`` image ``<eoss>``), every image is wrapped in the two."""
    return join_owned(segments, is_image, vocab)[0]


def join_owned(segments: list[np.ndarray], is_image: list[bool], vocab) -> tuple[np.ndarray, np.ndarray]:
    """`join`, and which segment each token belongs to -> (tokens, owner), both Int32[T].

    A ``<break>`` between two segments belongs to the one before it (the break before an image
    to generate ends its prompt); Chameleon's image marks belong to their image."""
    pieces, owner = [], []
    wrap = vocab.end_image != vocab.break_
    for k, (seg, img) in enumerate(zip(segments, is_image)):
        seg = np.asarray(seg, np.int32)
        if wrap and img:
            seg = np.concatenate([[vocab.break_], seg, [vocab.end_image]]).astype(np.int32)
        elif not wrap and k and (img or is_image[k - 1]):
            pieces.append(np.array([vocab.break_], np.int32))
            owner.append(np.array([k - 1], np.int32))
        pieces.append(seg)
        owner.append(np.full(len(seg), k, np.int32))
    return np.concatenate(pieces).astype(np.int32), np.concatenate(owner).astype(np.int32)


def encode_record(segments: list[np.ndarray], is_image: list[bool], doc_id: str = '',
                  image_shape: tuple[int, int] | None = None, extra: dict | None = None) -> bytes:
    """A prepared document as one ArrayRecord record: a JSON header line, then int32 ids.
    ``extra``: more header fields (an instruction example's task and output segments,
    `cm3jax.sft`), read back by `decode_record`."""
    header = {**(extra or {}), 'id': doc_id, 'lengths': [int(len(s)) for s in segments],
              'image': [bool(i) for i in is_image]}
    if image_shape is not None:
        header['image_shape'] = list(image_shape)
    body = np.concatenate([np.asarray(s, np.int32) for s in segments]) if segments else np.zeros(0, np.int32)
    return json.dumps(header).encode() + b'\n' + body.astype('<i4').tobytes()


class CorruptRecord(ValueError):
    """A prepared record that cannot be trained on; skipped and counted by ``reason`` (and
    ``shard``, when known) by the pipeline, never fatal."""

    def __init__(self, reason: str, detail: str = '', shard: str = ''):
        super().__init__(f'{reason}: {detail}' if detail else reason)
        self.reason, self.detail, self.shard = reason, detail, shard


def decode_record(record: bytes, vocab_size: int | None = None) -> tuple[list[np.ndarray], list[bool], dict]:
    """Inverse of `encode_record` -> (segments, is_image, header). Raises `CorruptRecord` on a
    record that does not parse ('corrupt record') or, given ``vocab_size``, holds an id outside
    [0, vocab_size) ('id outside the vocab': it would index past the embedding table)."""
    try:
        head, _, body = record.partition(b'\n')
        header = json.loads(head)
        ids = np.frombuffer(body, '<i4').astype(np.int32)
        lengths = header['lengths']
        if not lengths:
            raise ValueError('no segments')
        if sum(lengths) != ids.size or len(header['image']) != len(lengths):
            raise ValueError(f'{ids.size} ids for segment lengths {lengths}')
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptRecord('corrupt record', f'{type(e).__name__}: {e}') from None
    if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise CorruptRecord('id outside the vocab', f'document {header.get("id", "")!r} holds id {int(bad[0])} '
                            f'({bad.size} such) but the vocab has {vocab_size}')
    return np.split(ids, np.cumsum(lengths)[:-1]), list(header['image']), header
