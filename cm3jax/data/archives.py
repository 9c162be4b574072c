"""Sources that read archives and prepared datasets: WebDataset tar shards and TFDS. They are
`cm3jax.data.sources.Source`s like the others (skip-and-count, sharding, resize); `make_source`
builds them from ``{'kind': 'webdataset' | 'tfds', ...}``."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Any, Callable

import numpy as np

from cm3jax.data import images
from cm3jax.data.documents import Document
from cm3jax.data.sources import IMAGE_EXTS, Skip, Source, _array_image, _doc, _raise, decode_image

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
