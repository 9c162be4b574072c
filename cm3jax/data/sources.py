"""Readers that yield `Document`s: Shapes, sklearn digits, an image folder, WebDataset tars, TFDS.

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
import glob
import inspect
import io
import json
import logging
import os
import tarfile
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


# ---- WebDataset tars ----

def expand_paths(paths) -> list[str]:
    """A path, a glob ('shards/*.tar', sorted) or a list of them -> the file list."""
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = os.fspath(p)
        if glob.has_magic(p):
            out += sorted(glob.glob(p))
        else:
            out.append(p)
    return out


def _split_key(member: str) -> tuple[str, str]:
    """'dir/000123.seg.jpg' -> ('dir/000123', 'seg.jpg'): the key ends at the basename's first dot."""
    d, base = os.path.split(member)
    stem, _, ext = base.partition('.')
    return (f'{d}/{stem}' if d else stem), ext.lower()


class WebDatasetSource(Source):
    """WebDataset tar shards, streamed with ``tarfile``. Members are grouped by key
    (``dir/KEY.ext``): an image (``KEY.jpg|jpeg|png|webp``) and a caption, ``KEY.txt`` or the
    ``caption_key`` field of ``KEY.json``. paths: see `expand_paths`. Skipped and counted: samples
    without an image or caption, undecodable images, bad JSON, unreadable (e.g. truncated) tars,
    where the rest of the tar is lost. Document ids are 'TAR:KEY'."""
    kind = 'webdataset'

    def __init__(self, paths, caption_key: str = 'caption', resize=None, background=images.WHITE):
        super().__init__()
        self.paths = expand_paths(paths)
        if not self.paths:
            raise ValueError(f'webdataset_source: no tar files match {paths!r}')
        self.caption_key, self.resize = caption_key, images.size_of(resize)
        self.background = images.background_of(background)

    def shard(self, index: int, count: int) -> 'WebDatasetSource':
        out = super().shard(index, count)
        if out._shard[1] > len(self.paths):
            raise ValueError(f'webdataset_source shards by tar file: {len(self.paths)} tars cannot feed '
                             f'{out._shard[1]} shards; write at least as many tars as hosts')
        return out

    def _sample(self, tar: str, key: str, fields: dict[str, bytes]) -> Document:
        where = f'{tar}:{key}'
        image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
        if image is None:
            raise Skip('missing image', where)
        if 'txt' in fields:
            try:
                caption = fields['txt'].decode('utf-8').strip()
            except UnicodeDecodeError:
                raise Skip('undecodable caption', where, 'txt is not UTF-8') from None
        elif 'json' in fields:
            try:
                rec = json.loads(fields['json'])
            except ValueError as e:
                raise Skip('bad json', where, str(e)) from None
            caption = rec.get(self.caption_key) if isinstance(rec, dict) else None
            if not isinstance(caption, str):
                raise Skip('missing caption', where, f'no string {self.caption_key!r} in {key}.json')
        else:
            raise Skip('missing caption', where, f'no {key}.txt or {key}.json')
        return _doc(caption, decode_image(bytes(image), where, self.resize, self.background), where, key=key, tar=tar)

    def _records(self):
        index, count = self._shard
        for ordinal, path in enumerate(self.paths):
            if ordinal % count == index:  # another shard's tars are never opened
                for load in self._samples(path):
                    yield ordinal, load

    def _samples(self, path: str):
        """Loaders for consecutive members sharing a key; a bad tar ends in one `Skip` for it."""
        tar = os.path.basename(path)
        if not os.path.isfile(path):
            yield lambda: _raise(Skip('missing tar', tar))
            return
        key, fields = None, {}
        try:
            with tarfile.open(path, mode='r|*') as tf:  # streaming: one pass, no seeking
                for m in tf:
                    if not m.isfile():
                        continue
                    k, ext = _split_key(m.name)
                    if k != key and key is not None:
                        yield lambda k=key, f=fields: self._sample(tar, k, f)
                        fields = {}
                    key = k
                    fields[ext] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            # the sample at the break is lost with the rest of the tar; counted once, for the tar
            err = Skip('unreadable tar', tar, f'{type(e).__name__}: {e}')
            yield lambda: _raise(err)
            return
        if key is not None:
            yield lambda: self._sample(tar, key, fields)


webdataset_source = WebDatasetSource


# ---- TFDS (array_record, no TensorFlow) ----

def _get_path(example: dict, path: str):
    """'captions.text' -> example['captions']['text'] (an exact key such as 'image/id' wins)."""
    if path in example:
        return example[path]
    head, dot, rest = path.partition('.')
    if dot and isinstance(example.get(head), dict):
        return _get_path(example[head], rest)
    raise KeyError(path)


def _texts(value) -> list[str]:
    """A caption value (str, bytes, or an array/list of them) -> a list of str."""
    if isinstance(value, (str, bytes, np.bytes_, np.str_)):
        value = [value]
    out = []
    for v in np.asarray(value, dtype=object).reshape(-1).tolist():
        if isinstance(v, bytes):
            v = v.decode('utf-8')
        if not isinstance(v, str):
            raise TypeError(f'caption is {type(v).__name__}, not text')
        out.append(v)
    return out


class TfdsSource(Source):
    """A prepared TFDS dataset (array_record), read with ``tfds.data_source`` (random access,
    decoded numpy, no TensorFlow, never downloads). image_key / caption_key: dotted paths into
    the example (``'captions.text'`` for coco_captions), or a callable ``example -> str | [str]``
    for caption_key (e.g. to caption a class label). captions: 'first' or 'all' (one document per
    caption, ids suffixed '#j'). Needs ``pip install cm3jax[tf]``."""
    kind = 'tfds'

    def __init__(self, name: str, split: str = 'train', data_dir=None, image_key: str = 'image',
                 caption_key: str | Callable[[dict], Any] = 'caption', captions: str = 'first', resize=None,
                 background=images.WHITE):
        super().__init__()
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError('tfds_source needs tensorflow-datasets, grain and array-record: '
                              'pip install cm3jax[tf]') from e
        if captions not in ('first', 'all'):
            raise ValueError(f"captions={captions!r}; choose 'first' (one document per example) or 'all' "
                             f"(one per caption)")
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
                                        download=False)
        except Exception as e:
            raise ValueError(f'tfds_source could not open {name!r} split {split!r} in data_dir={data_dir!r} '
                             f'({type(e).__name__}: {e}); prepare it first (tfds build, or '
                             f"builder.download_and_prepare(file_format='array_record'))") from e
        self.name, self.split, self.image_key = name, split, image_key
        self.caption_key, self.captions, self.resize = caption_key, captions, images.size_of(resize)
        self.background = images.background_of(background)

    def __len__(self) -> int:
        return len(self._ds)

    def _load(self, i: int):
        where = f'{self.name}/{self.split}[{i}]'
        try:
            ex = self._ds[i]
        except Exception as e:
            raise Skip('unreadable record', where, f'{type(e).__name__}: {e}') from None
        try:
            image = _get_path(ex, self.image_key)
        except KeyError:
            raise Skip('missing image', where, f'no {self.image_key!r} in {sorted(ex)}') from None
        try:
            value = self.caption_key(ex) if callable(self.caption_key) else _get_path(ex, self.caption_key)
            texts = _texts(value)
        except (KeyError, TypeError, UnicodeDecodeError) as e:
            raise Skip('missing caption', where, f'{type(e).__name__}: {e}') from None
        if not texts:
            raise Skip('missing caption', where, 'no captions')
        pixels = _array_image(image, where, self.resize, self.background)
        if self.captions == 'first':
            return _doc(texts[0], pixels, where, index=i)
        return [_doc(t, pixels, f'{where}#{j}', index=i) for j, t in enumerate(texts)]

    def _records(self):
        index, count = self._shard
        for i in range(index, len(self._ds), count):
            yield i, (lambda i=i: self._load(i))


tfds_source = TfdsSource


# ---- From a config ----

SOURCES = {'shapes': shapes_source, 'digits': digits_source, 'folder': folder_source,
           'webdataset': webdataset_source, 'tfds': tfds_source}


def make_source(config) -> Source:
    """A source from ``{'kind': 'shapes'|'digits'|'folder'|'webdataset'|'tfds', **its arguments}``
    (a dict or ml_collections ConfigDict), plus an optional ``'shard': (index, count)``."""
    cfg = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
    kind = cfg.pop('kind', None)
    if kind not in SOURCES:
        raise ValueError(f'data source kind={kind!r}; choose one of {sorted(SOURCES)}')
    shard = cfg.pop('shard', None)
    fn = SOURCES[kind]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise ValueError(f'{kind} source does not take {unknown}; it takes {list(params)}')
    src = fn(**cfg)
    return src.shard(*shard) if shard is not None else src
