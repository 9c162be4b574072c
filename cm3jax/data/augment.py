"""Retrieval augmentation at training time (docs/paper.md, "Retrieval augmentation"): put retrieved documents before
each query document.

For an example, K is drawn uniformly from ``RetrievalConfig.counts`` (CM3leon: always 2;
RA-CM3: {0, 1, 2}), then K distinct documents from the example's neighbour list (written by
`cm3jax build-index`, read through `cm3jax.data.neighbours`), kept best first. Each is laid out
like a training document (`documents.layout`: its own `<break>`s, ending in `<eos>`), with no
caption dropout and no CM3 transform: the pipeline puts them, as they are, before the
CM3-transformed query, and weights all their tokens 1 (docs/paper.md: CM3leon weights every token
equally; `PipelineConfig.query_weight` up-weights the query as RA-CM3 did).

A neighbour whose record is corrupt is skipped and counted (`counts`); the example keeps the
others. This module reads shards and neighbour lists only: it never imports the retriever.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np

from cm3jax.data import documents, neighbours, prepare, shards
from cm3jax.vocab import Vocab

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    counts: tuple[int, ...] = (2,)   # K per example, drawn uniformly from these

    def __post_init__(self):
        if not self.counts or min(self.counts) < 0:
            raise ValueError(f'retrieval counts {self.counts}: give one or more K >= 0, e.g. (2,) or (0, 1, 2)')


class RetrievalAugment:
    """The pipeline's augmentation hook: ``augment(doc_id, rng) -> [Int32[T_i], ...]``, the laid-out
    retrieved documents (each ending in ``<eos>``) to put before document ``doc_id``."""

    def __init__(self, bank_dir: str | pathlib.Path, vocab: Vocab, cfg: RetrievalConfig = RetrievalConfig(),
                 layout: documents.LayoutConfig = documents.LayoutConfig(), *, neighbours_dir=None):
        """bank_dir: the prepared data the retrieved documents come from (the memory bank's
        documents); neighbours_dir: where the queries' neighbour lists are (default bank_dir, i.e.
        training data retrieving from itself; a held-out set keeps its own lists)."""
        self.vocab, self.cfg = vocab, cfg
        self.layout = dataclasses.replace(layout, caption_dropout=0.0)  # retrieved documents stay whole
        bank_dir = pathlib.Path(bank_dir)
        manifest = prepare.read_manifest(bank_dir, vocab)
        self.lists = neighbours.read_neighbours(neighbours_dir or bank_dir)
        bank_count = self.lists.header.get('bank_count')
        if bank_count is not None and bank_count != manifest['documents']:
            raise ValueError(f'the neighbour lists in {neighbours_dir or bank_dir} index a bank of {bank_count} '
                             f'documents but {bank_dir} holds {manifest["documents"]}: run `cm3jax build-index` '
                             f'again for this data')
        # every shard, in manifest order: a document's id is its index here (neighbours.global_ids)
        self.source = shards.ShardRecords(bank_dir, manifest['shards'])
        self.counts = {'retrieved': 0, 'corrupt_neighbours': 0, 'no_neighbours': 0}

    def __call__(self, doc_id: int, rng: np.random.Generator) -> list[np.ndarray]:
        k = int(rng.choice(self.cfg.counts))
        if k == 0:
            return []
        candidates = self.lists.lookup(doc_id)[0]
        candidates = candidates[candidates >= 0]
        if not len(candidates):
            self.counts['no_neighbours'] += 1
            return []
        picked = np.sort(rng.choice(len(candidates), size=min(k, len(candidates)), replace=False))
        docs = []
        for neighbour in candidates[picked]:
            try:
                segments, is_image, _ = documents.decode_record(self.source[int(neighbour)], self.vocab.size)
                docs.append(documents.layout(segments, is_image, self.vocab, rng, self.layout))
            except ValueError as e:
                self.counts['corrupt_neighbours'] += 1
                log.warning('skipping retrieved document %d of document %d: %s', neighbour, doc_id, e)
        self.counts['retrieved'] += len(docs)
        return docs
