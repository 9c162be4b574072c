"""Neighbour lists: for each prepared document, the ids of the documents retrieved for it.

`cm3jax build-index` (`cm3jax.retrieval`) writes them next to the ArrayRecord shards; the data
pipeline's retrieval-augmentation step (`cm3jax.data.augment`) reads them. They live here, in
the data layer, so that the pipeline never imports the retriever. A document's id is its index
in the concatenation of the manifest's shards, in manifest order (`global_ids`).

Files, in the data directory (or the directory given):

    neighbours.json        {"format": "cm3jax.neighbours", "version": 1, "count": N, "m": M,
                            "bank_fingerprint", "bank_count", "select": {SelectConfig fields},
                            "has_scores"}
    neighbours.ids.npy     Int64[N] query document ids, ascending (a lookup is a binary search)
    neighbours.npy         Int64[N, M] neighbour ids of each query, best first, -1 padded
    neighbours.scores.npy  Float32[N, M] their scores, -inf padded (optional)

The arrays are written under temporary names and renamed, and the JSON goes last, so a reader
never sees half a file set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from cm3jax.errors import Cm3jaxError

NEIGHBOURS_HEADER, QUERY_IDS, NEIGHBOURS, SCORES = (
    'neighbours.json', 'neighbours.ids.npy', 'neighbours.npy', 'neighbours.scores.npy')
FORMAT, VERSION = 'cm3jax.neighbours', 1


def global_ids(manifest: dict, shard_paths: list[str]) -> np.ndarray:
    """Int64[n]: the document id of each record of ``shard_paths`` (manifest 'path' entries, in
    the order read), i.e. its index over all the manifest's shards in manifest order."""
    offsets, start = {}, 0
    for shard in manifest['shards']:
        offsets[shard['path']] = (start, shard['documents'])
        start += shard['documents']
    missing = [p for p in shard_paths if p not in offsets]
    if missing:
        raise ValueError(f'shards {missing[:3]} are not in the manifest')
    return np.concatenate([np.arange(offsets[p][0], sum(offsets[p]), dtype=np.int64) for p in shard_paths]
                          or [np.zeros(0, np.int64)])


class NeighbourFormatError(Cm3jaxError, ValueError):
    """Neighbour lists that are missing, inconsistent, or built from another bank."""


@dataclasses.dataclass(frozen=True)
class NeighbourLists:
    """ids Int64[N] ascending, neighbours Int64[N, M], scores Float32[N, M] or None (memory-mapped)."""
    ids: np.ndarray
    neighbours: np.ndarray
    scores: np.ndarray | None
    header: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, doc_ids) -> np.ndarray:
        """Int64[B, M] neighbours of documents Int[B]; a row of -1 for a document not listed."""
        doc_ids = np.atleast_1d(np.asarray(doc_ids, np.int64))
        pos = np.clip(np.searchsorted(self.ids, doc_ids), 0, max(len(self.ids) - 1, 0))
        out = np.full((len(doc_ids), self.neighbours.shape[1]), -1, np.int64)
        if len(self.ids):
            found = np.asarray(self.ids[pos]) == doc_ids
            out[found] = self.neighbours[pos[found]]
        return out


def write_neighbours(directory, ids, neighbours, *, scores=None, select: dict | None = None,
                     bank_fingerprint: str = '', bank_count: int | None = None) -> pathlib.Path:
    """Write neighbour lists: ids Int[N] of the query documents (unique), neighbours Int[N, M],
    optional scores Float[N, M]; rows are stored sorted by id. ``select``: the selection settings,
    kept in the header for the record. Returns the header's path."""
    path = pathlib.Path(directory)
    ids = np.asarray(ids, np.int64)
    neighbours = np.asarray(neighbours, np.int64)
    if neighbours.ndim != 2 or ids.shape != neighbours.shape[:1]:
        raise ValueError(f'need ids Int[N] and neighbours Int[N, M]; got shapes {ids.shape}, {neighbours.shape}')
    if scores is not None and np.shape(scores) != neighbours.shape:
        raise ValueError(f'scores must have the neighbours\' shape {neighbours.shape}; got {np.shape(scores)}')
    order = np.argsort(ids, kind='stable')
    ids, neighbours = ids[order], neighbours[order]
    if len(ids) > 1 and not np.all(np.diff(ids) > 0):
        dup = ids[np.flatnonzero(np.diff(ids) == 0)[:5]]
        raise ValueError(f'query document ids must be unique; repeated: {dup.tolist()}')
    path.mkdir(parents=True, exist_ok=True)
    (path / NEIGHBOURS_HEADER).unlink(missing_ok=True)  # readers see no lists while they change
    arrays = {QUERY_IDS: ids, NEIGHBOURS: neighbours}
    if scores is not None:
        arrays[SCORES] = np.asarray(scores, np.float32)[order]
    else:
        (path / SCORES).unlink(missing_ok=True)
    for name, array in arrays.items():
        tmp = path / (name + '.tmp')
        with open(tmp, 'wb') as f:
            np.save(f, array)
        os.replace(tmp, path / name)
    header = {'format': FORMAT, 'version': VERSION, 'count': len(ids), 'm': int(neighbours.shape[1]),
              'bank_fingerprint': bank_fingerprint, 'bank_count': bank_count, 'has_scores': scores is not None,
              'select': select}
    tmp = path / (NEIGHBOURS_HEADER + '.tmp')
    tmp.write_text(json.dumps(header, indent=1))
    os.replace(tmp, path / NEIGHBOURS_HEADER)
    return path / NEIGHBOURS_HEADER


def read_neighbours(directory, *, bank_fingerprint: str | None = None) -> NeighbourLists:
    """The neighbour lists in ``directory``, memory-mapped. With ``bank_fingerprint``, refuse
    lists built from another bank (another retriever or another set of documents)."""
    path = pathlib.Path(directory)
    if not (path / NEIGHBOURS_HEADER).exists():
        raise NeighbourFormatError(f'no neighbour lists in {path} ({NEIGHBOURS_HEADER} is missing): run '
                                   f'`cm3jax build-index` for this data, or train without retrieval')
    header = json.loads((path / NEIGHBOURS_HEADER).read_text())
    if header.get('format') != FORMAT or header.get('version') != VERSION:
        raise NeighbourFormatError(f'{path / NEIGHBOURS_HEADER} is not a {FORMAT} v{VERSION} header; '
                                   f'rebuild the neighbour lists')
    if bank_fingerprint is not None and header['bank_fingerprint'] != bank_fingerprint:
        raise NeighbourFormatError(f'neighbour lists in {path} come from bank {header["bank_fingerprint"]!r}, '
                                   f'not {bank_fingerprint!r}: rebuild them with `cm3jax build-index`')
    ids = np.load(path / QUERY_IDS, mmap_mode='r')
    nbrs = np.load(path / NEIGHBOURS, mmap_mode='r')
    scores = np.load(path / SCORES, mmap_mode='r') if header['has_scores'] else None
    n, m = header['count'], header['m']
    for name, got, want in ((QUERY_IDS, ids.shape, (n,)), (NEIGHBOURS, nbrs.shape, (n, m)),
                            (SCORES, None if scores is None else scores.shape, None if scores is None else (n, m))):
        if got != want:
            raise NeighbourFormatError(f'{path / name} has shape {got} but {NEIGHBOURS_HEADER} says {want}; '
                                       f'rebuild the neighbour lists')
    return NeighbourLists(ids, nbrs, scores, header)
