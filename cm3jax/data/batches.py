"""Training batches straight from a document `Source`, endless and exactly resumable.

The image tokenizer and the retriever train on documents as a source gives them (Shapes, digits,
an image folder, WebDataset tars, TFDS), with no preparation step:

    source = make_source({'kind': 'folder', 'root': 'photos/', 'resize': 32})
    batches = SourceBatches(source, rows=32, example=first_image(32, 'data.source'))
    next(batches)  # {'images': UInt8[32, 32, 32, 3]}

``example(doc)`` turns a document into a dict of arrays named as the batch's fields, raises `Skip` to drop a document (counted
with the source's corrupt records, and reported), or raises a `ValueError` that stops the run
(an image of the wrong size: the message names the option to change). ``collate(examples)``
makes the batch (default: stack each field).

The source repeats when it ends (epochs). The position (`get_state`) is (epoch, record, document
within the record): resuming without a shuffle buffer passes over the records before it without
decoding them. A shuffle buffer (for sources in file order) mixes examples across the stream;
resuming then replays the stream up to the position, which is exact and costs a pass over the
examples already taken.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cm3jax.data.documents import Document
from cm3jax.data.sources import Skip, Source

Example = dict[str, Any]


def first_image(size: int, where: str, model_field: str, channels: int = 3) -> Callable[[Document], Example]:
    """``example`` giving {'images': UInt8[size, size, channels]}: a document's first image,
    which must already be that size (see `check_image`)."""
    def example(doc: Document) -> Example:
        images = doc.images
        if not images:
            raise Skip('document without an image', str(doc.id))
        check_image(images[0], size, where, model_field, doc.id, channels)
        return {'images': images[0]}
    return example


def check_image(image: np.ndarray, size: int, where: str, model_field: str, doc_id, channels: int = 3) -> None:
    """Refuse an image that is not uint8 [size, size, channels], naming the options that fix it:
    the model's ``model_field``, or the source ``where``'s own size option."""
    if image.shape != (size, size, channels) or image.dtype != np.uint8:
        raise ValueError(f'{where}: document {doc_id!r} has a {image.dtype} image of shape {image.shape} but the '
                         f'model takes uint8 {size}x{size}{f" with {channels} channels" if channels != 3 else ""}; '
                         f'set {model_field} or the source\'s size ({where}.resize for folder, webdataset and tfds, '
                         f'which scales and centre-crops; {where}.cfg.canvas for shapes; {where}.size for digits)')


def stack(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """The default ``collate``: each field stacked along a new batch axis."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def take(source: Source, n: int, example: Callable[[Document], Example], where: str) -> tuple[list, list]:
    """The first ``n`` usable (example, document) pairs of one pass, for fixed held-out sets."""
    examples, docs = [], []
    for _, _, doc in source.positioned():
        try:
            examples.append(example(doc))
        except Skip as s:
            source._skip(s.reason, s.record, s.detail)
            continue
        docs.append(doc)
        if len(examples) == n:
            return examples, docs
    raise ValueError(f'{where} holds {len(examples)} usable documents, fewer than the {n} needed; lower the eval '
                     f'size or point it at more data ({source.report()})')


class SourceBatches:
    """This host's batches of ``rows`` examples from ``source`` (already this host's shard),
    a `cm3jax.train.loop.DataIterator`; see the module docstring."""

    def __init__(self, source: Source, rows: int, example: Callable[[Document], Example], *,
                 collate: Callable[[Sequence[Example]], dict] = stack, shuffle_buffer: int = 0, seed: int = 0):
        if rows < 1 or shuffle_buffer < 0:
            raise ValueError(f'SourceBatches(rows={rows}, shuffle_buffer={shuffle_buffer}): need rows >= 1 and '
                             f'shuffle_buffer >= 0')
        self.source, self.rows, self.example, self.collate = source, rows, example, collate
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.set_state({'epoch': 0, 'record': 0, 'doc': 0, 'taken': 0})

    def _stream(self, epoch: int, record: int, doc: int) -> Iterator[tuple[tuple[int, int, int], Example]]:
        """(position after it, example) from (epoch, record, doc) on, forever."""
        for epoch in itertools.count(epoch):
            found = False
            for r, j, d in self.source.positioned(start=record):
                if r == record and j < doc:
                    continue
                try:
                    ex = self.example(d)
                except Skip as s:
                    self.source._skip(s.reason, s.record, s.detail)
                    continue
                found = True
                yield (epoch, r, j + 1), ex
            if not found and record == 0 and doc == 0:
                raise ValueError(f'{self.source.describe()} yielded no usable document in a whole pass '
                                 f'({self.source.report()})')
            self._epochs_done, record, doc = epoch + 1, 0, 0

    def _shuffled(self, stream):
        if not self.shuffle_buffer:
            yield from stream
            return
        rng, buffer = np.random.default_rng([self.seed, 7]), []
        for item in stream:  # endless: a full buffer swaps a random entry out for each newcomer
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            i = int(rng.integers(len(buffer)))
            yield buffer[i]
            buffer[i] = item

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        items = list(itertools.islice(self._items, self.rows))
        self.taken += self.rows
        self.position = items[-1][0]
        return self.collate([ex for _, ex in items])

    def get_state(self) -> dict:
        epoch, record, doc = self.position
        return {'epoch': epoch, 'record': record, 'doc': doc, 'taken': self.taken}

    def set_state(self, state: dict) -> None:
        self.taken, self._epochs_done = int(state['taken']), int(state['epoch'])
        self.position = (int(state['epoch']), int(state['record']), int(state['doc']))
        if self.shuffle_buffer:  # the buffer's contents depend on everything read: replay
            self._items = self._shuffled(self._stream(0, 0, 0))
            for _ in itertools.islice(self._items, self.taken):
                pass
        else:
            self._items = self._stream(*self.position)

    def report(self) -> str:
        """The source's count of read and skipped records in the current pass, with the epoch."""
        return f'epoch {self._epochs_done + 1}: {self.source.report()}'
