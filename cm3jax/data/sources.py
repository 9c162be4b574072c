"""Readers that yield `Document`s: Shapes, sklearn digits, an image folder (WebDataset tars and
TFDS: `cm3jax.data.archives`), and `make_source` for all of them.

Every source is an iterable of `Document` (caption text, then an RGB uint8 [H, W, 3] image) with
a `stats` attribute (`SourceStats`) describing the latest pass, and `report()`:

    src = folder_source('photos/')
    docs = list(src)
    src.report()  # 'read 998 documents, skipped 2: 1 undecodable image (a.png), 1 bad json line (captions.jsonl:7)'

Images of every mode come out as the 8-bit RGB they show (`cm3jax.data.images`: 16-bit
scaled, alpha composited on ``background``, palettes expanded, EXIF orientation applied).

Corrupt records (truncated or undecodable images, missing files, bad JSON lines, missing captions,
unreadable tars) never crash a source and are never lost silently: they are skipped, counted by
reason with their first few record ids, and each reason logs one warning per pass.

Sharding for several hosts: ``src.shard(index, count)`` is a copy that keeps record ``i`` iff
``i % count == index``, where ``i`` is the record's ordinal: the sample index (digits, Shapes,
TFDS), the non-blank captions.jsonl line (folder) or the tar file (WebDataset: give at least
``count`` tars). Shards are disjoint, cover the source, use no random state, and compose.
Sources yield in their natural order; shuffling is the pipeline's job.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import json
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from cm3jax.data import images
from cm3jax.data.documents import Document

log = logging.getLogger(__name__)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp')
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
MAX_EXAMPLES = 3  # record ids kept per skip reason


@dataclasses.dataclass
class SourceStats:
    """read: documents yielded; skipped: records dropped; reasons: reason -> count;
    examples: reason -> the first few record ids (file names, 'captions.jsonl:7', ...)."""
    read: int = 0
    skipped: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, record: str) -> bool:
        """Count one skipped record; True the first time this reason is seen."""
        self.skipped += 1
        first = reason not in self.reasons
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(record)
        return first

    def report(self) -> str:
        parts = [f'{n} {reason} ({", ".join(self.examples[reason])}{", ..." if n > MAX_EXAMPLES else ""})'
                 for reason, n in self.reasons.items()]
        out = f'read {self.read} document{"" if self.read == 1 else "s"}, skipped {self.skipped}'
        return out + (': ' + ', '.join(parts) if parts else '')


class Source:
    """Base class: an iterable of Documents with `stats`, `report()` and `shard()`.

    Subclasses implement `_records()`, yielding ``(ordinal, thunk)`` pairs. The thunk returns a
    Document (or several, as a list) or raises `Skip`; it runs only for this shard's ordinals, so a
    shard never decodes another shard's images.
    """
    kind = 'source'

    def __init__(self):
        self.stats = SourceStats()
        self._shard = (0, 1)

    def __iter__(self) -> Iterator[Document]:
        return (doc for _, _, doc in self.positioned())

    def positioned(self, start: int = 0) -> Iterator[tuple[int, int, Document]]:
        """One pass as ``(record, j, document)``: the document is the ``j``-th of this shard's
        ``record``-th record (0-based; a record gives several documents only in TFDS's
        captions='all'). The first ``start`` records of this shard are passed over without running
        their loaders, so a reader resumed at a position decodes nothing before it."""
        self.stats = stats = SourceStats()
        index, count = self._shard
        record = -1
        for ordinal, load in self._records():
            if ordinal % count != index:
                continue
            record += 1
            if record < start:
                continue
            try:
                docs = load()
            except Skip as s:
                self._skip(s.reason, s.record, s.detail)
                continue
            for j, doc in enumerate(docs if isinstance(docs, list) else [docs]):
                stats.read += 1
                yield record, j, doc
        if stats.skipped:
            log.warning('%s: %s', self.describe(), stats.report())

    def _records(self) -> Iterator[tuple[int, Callable[[], Any]]]:
        raise NotImplementedError

    def _skip(self, reason: str, record: str, detail: str = '') -> None:
        if self.stats.skip(reason, record):
            log.warning('%s: skipping %s %s%s (further ones are counted in report())', self.describe(),
                        reason, record, f': {detail}' if detail else '')

    def report(self) -> str:
        """One line about the latest pass, e.g. 'read 998 documents, skipped 2: 1 undecodable image (a.png), ...'."""
        return self.stats.report()

    def shard(self, index: int, count: int) -> 'Source':
        """A copy that keeps the records whose ordinal ``i % count == index`` (see the module doc)."""
        if not (isinstance(index, (int, np.integer)) and isinstance(count, (int, np.integer))
                and 0 <= index < count):
            raise ValueError(f'shard(index={index}, count={count}): need integers 0 <= index < count')
        old_index, old_count = self._shard
        out = copy.copy(self)
        out.stats = SourceStats()
        out._shard = (old_index + int(index) * old_count, old_count * int(count))
        return out

    def describe(self) -> str:
        index, count = self._shard
        return self.kind + (f' (shard {index}/{count})' if count > 1 else '')

    def __repr__(self) -> str:
        return f'<{self.describe()}: {self.report()}>'


class Skip(Exception):
    """Raised by a record's loader: skip this record for ``reason`` (counted, never fatal)."""

    def __init__(self, reason: str, record: str, detail: str = ''):
        super().__init__(f'{reason} ({record}): {detail}')
        self.reason, self.record, self.detail = reason, record, detail


# ---- Images (modes and sizes: cm3jax.data.images) ----

def decode_image(data: bytes | str | os.PathLike, record: str, resize=None, background=images.WHITE) -> np.ndarray:
    """Bytes or a path -> uint8 [H, W, 3] (`images.to_rgb`, then `images.fit` to ``resize``);
    raises `Skip` for a missing, truncated or undecodable image, or one of an unusable mode."""
    if not isinstance(data, (bytes, bytearray)) and not os.path.isfile(data):
        raise Skip('missing image', record)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as img:
            img.load()  # decode now: truncated files fail here, not later
            pixels = images.to_rgb(img, background)
    except images.UnusableImage as e:
        raise Skip('unsupported image', record, str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise Skip('undecodable image', record, f'{type(e).__name__}: {e}') from None
    return images.fit(pixels, images.size_of(resize))


def _array_image(x, record: str, resize=None, background=images.WHITE) -> np.ndarray:
    """A decoded image array (uint8 [H, W], [H, W, 1|3|4]) -> uint8 [H, W, 3]."""
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise Skip('unsupported image', record, f'dtype {a.dtype}, shape {a.shape}')
    if a.ndim == 3 and a.shape[-1] == 3 and resize is None:
        return a
    return images.fit(images.to_rgb(Image.fromarray(a), background), images.size_of(resize))


def _doc(caption: str, image: np.ndarray, id: str, **meta) -> Document:
    return Document(segments=[caption, image], id=id, meta=meta)


# ---- Shapes ----

class ShapesSource(Source):
    """The procedural Shapes world (`cm3jax.data.worlds.shapes`): document ``i`` is
    ``scene_document(cfg, seed, i, split)``. cfg: a ``ShapesConfig``, a dict of its fields, or None
    (defaults). count: number of documents; None streams forever."""
    kind = 'shapes'

    def __init__(self, cfg=None, split: str = 'train', seed: int = 0, count: int | None = None):
        super().__init__()
        from cm3jax.data.worlds import shapes
        if cfg is None:
            cfg = shapes.ShapesConfig()
        elif isinstance(cfg, dict) or hasattr(cfg, 'to_dict'):
            cfg = shapes.ShapesConfig(**(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg))
        if count is not None and count < 0:
            raise ValueError(f'count={count} must be >= 0 (or None for an endless stream)')
        self._scene = shapes.scene_document
        self.cfg, self.split, self.seed, self.count = cfg, split, seed, count

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError('an endless shapes_source (count=None) has no length')
        return self.count

    def _records(self):
        i = 0
        while self.count is None or i < self.count:
            yield i, (lambda i=i: self._scene(self.cfg, self.seed, i, self.split))
            i += 1


shapes_source = ShapesSource


# ---- sklearn digits ----

class DigitsSource(Source):
    """sklearn's 1,797 handwritten digits (bundled, no network): 8x8 upscaled to ``size`` px RGB
    uint8 (bright ink on black), captioned 'a handwritten digit seven'. The train/test split is
    fixed (a permutation with seed 0; ``test_fraction`` of it is test); ``seed`` only shuffles the
    order within the split (None: sklearn's order). meta: {'label', 'index' into load_digits()}."""
    kind = 'digits'

    def __init__(self, split: str = 'train', seed: int | None = 0, size: int = 32,
                 test_fraction: float = 0.2, resample: str = 'bilinear'):
        super().__init__()
        filters = {'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
        if split not in ('train', 'test') or size < 8 or not 0 < test_fraction < 1 or resample not in filters:
            raise ValueError(f"digits_source(split={split!r}, size={size}, test_fraction={test_fraction}, "
                             f"resample={resample!r}): need split 'train' or 'test', size >= 8 (8x8 upscaled), "
                             f"0 < test_fraction < 1, resample in {list(filters)}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError('digits_source needs scikit-learn: pip install scikit-learn') from e
        data = load_digits()
        self._images, self._labels = data.images, data.target  # float 0..16 [N, 8, 8]; int [N]
        n = len(self._labels)
        order = np.random.default_rng(0).permutation(n)  # the split is fixed, whatever ``seed``
        n_test = int(round(n * test_fraction))
        idx = np.sort(order[:n_test] if split == 'test' else order[n_test:])
        if seed is not None:
            idx = np.random.default_rng(seed).permutation(idx)
        self._idx = idx
        self.split, self.size = split, size
        self._resample = filters[resample]

    def __len__(self) -> int:
        return len(self._idx)

    def _load(self, k: int) -> Document:
        pixels = np.round(self._images[k] * (255 / 16)).astype(np.uint8)  # ink is bright
        img = Image.fromarray(pixels).resize((self.size, self.size), self._resample)
        rgb = np.repeat(np.asarray(img, np.uint8)[..., None], 3, axis=-1)
        label = int(self._labels[k])
        return _doc(f'a handwritten digit {NUMBER_WORDS[label]}', rgb, f'digits/{k}', label=label, index=k)

    def _records(self):
        for i, k in enumerate(self._idx):
            yield i, (lambda k=int(k): self._load(k))


digits_source = DigitsSource


# ---- An image folder with captions.jsonl ----

def _caption_of(rec: dict, keys: Sequence[str]):
    for k in keys:
        if k in rec:
            return rec[k]
    return None


class FolderSource(Source):
    """Images under ``root`` listed in ``root/captions.jsonl``, one JSON object a line:
    ``{"image": "a.png", "caption": "..."}`` (aliases: ``file_name``/``file`` and ``text``; the
    image path is relative to ``root``). resize: None or 'none' (native size), S or (H, W): scale to cover,
    then centre-crop. background: the RGB that transparent pixels are composited on
    (`cm3jax.data.images`). Skipped and counted: bad JSON lines, records without image or caption,
    missing files, truncated or undecodable images. Document ids are the image paths."""
    kind = 'folder'

    def __init__(self, root, captions: str = 'captions.jsonl', resize=None,
                 image_keys: Sequence[str] = ('image', 'file_name', 'file'),
                 caption_keys: Sequence[str] = ('caption', 'text'), background=images.WHITE):
        super().__init__()
        self.root = os.fspath(root)
        self.captions = captions if os.path.isabs(captions) else os.path.join(self.root, captions)
        if not os.path.isfile(self.captions):
            raise FileNotFoundError(f'folder_source: no {self.captions!r}; write one JSON object per line, '
                                    f'like {{"image": "a.png", "caption": "..."}}')
        self.resize, self.background = images.size_of(resize), images.background_of(background)
        self.image_keys, self.caption_keys = tuple(image_keys), tuple(caption_keys)

    def _load(self, line: bytes, where: str) -> Document:
        try:
            rec = json.loads(line)  # bytes: UTF-8 errors are ValueErrors too
            if not isinstance(rec, dict):
                raise ValueError(f'a JSON {type(rec).__name__}, not an object')
        except ValueError as e:
            raise Skip('bad json line', where, str(e)) from None
        image, caption = _caption_of(rec, self.image_keys), _caption_of(rec, self.caption_keys)
        if not isinstance(image, str) or not image:
            raise Skip('record without image', where, f'expected one of {self.image_keys}')
        if not isinstance(caption, str):
            raise Skip('missing caption', where, f'expected a string in one of {self.caption_keys}')
        pixels = decode_image(os.path.join(self.root, image), image, self.resize, self.background)
        return _doc(caption, pixels, image, path=os.path.join(self.root, image))

    def _records(self):
        name = os.path.basename(self.captions)
        with open(self.captions, 'rb') as f:
            lines = ((f'{name}:{n}', raw) for n, raw in enumerate(f, 1) if raw.strip())  # blank: no record
            for ordinal, (where, raw) in enumerate(lines):
                yield ordinal, (lambda r=raw, w=where: self._load(r, w))


def _raise(e: Exception):
    raise e


folder_source = FolderSource


# ---- From a config ----

def sources() -> dict[str, Callable[..., Source]]:
    """kind -> constructor; the archive readers live in `cm3jax.data.archives`, which builds on this module."""
    from cm3jax.data import archives
    return {'shapes': shapes_source, 'digits': digits_source, 'folder': folder_source,
            'webdataset': archives.webdataset_source, 'tfds': archives.tfds_source}


def make_source(config) -> Source:
    """A source from ``{'kind': 'shapes'|'digits'|'folder'|'webdataset'|'tfds', **its arguments}``
    (a dict or ml_collections ConfigDict), plus an optional ``'shard': (index, count)``."""
    cfg = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
    kind, known = cfg.pop('kind', None), sources()
    if kind not in known:
        raise ValueError(f'data source kind={kind!r}; choose one of {sorted(known)}')
    shard = cfg.pop('shard', None)
    fn = known[kind]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise ValueError(f'{kind} source does not take {unknown}; it takes {list(params)}')
    src = fn(**cfg)
    return src.shard(*shard) if shard is not None else src
