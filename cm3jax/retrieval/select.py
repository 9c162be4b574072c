"""Which retrieved documents go before a query: the selection of CM3leon (and RA-CM3), docs/paper.md,
"Retrieval augmentation", and the neighbour lists that `cm3jax build-index` writes next to the data shards.

Selection, per query, over the ``candidates`` best documents by inner product:

1. exclusion: the query document itself (same id) is never its own neighbour;
2. diversity against the query: a candidate whose score to the query is above
   ``max_query_score`` (0.9) is a near copy of it and teaches nothing; dropped;
3. ranking: by score (relevance); with ``prefer_multimodal`` a document holding both image and
   text ranks as if its score were ``modality_margin`` higher, and wins ties of that adjusted
   score against a single-modality one; equal ranks go to the lower id. The paper gives no
   strength: the default margin 0 only breaks exact ties; a margin of 0.02 lets an image+text
   document beat a text-only one up to 0.02 more relevant; ``float('inf')`` puts every
   image+text candidate first (still in score order among themselves);
4. diversity among neighbours: greedily in rank order, a candidate whose cosine similarity to
   an already chosen neighbour is above ``max_pair_similarity`` (0.9) is skipped;
5. the first ``top_m`` survivors are the neighbours; rows with fewer are padded with id -1 and
   score -inf (raise ``candidates`` when that happens often).

Query dropout (`drop_query_tokens`): 20% of a query's text tokens are removed before the query
is embedded, so that retrieval at training time does not find the document from its exact words;
which tokens is a pure function of (seed, document id).

Neighbour lists are written with `cm3jax.data.neighbours.write_neighbours` (format there), next
to the shards, where the data pipeline reads them without importing the retriever.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from cm3jax.retrieval import index

EmbedText = Callable[[np.ndarray, np.ndarray], Any]  # (ids Int[B, T], mask Bool[B, T]) -> Float[B, D]


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """See the module docstring. candidates: MIPS results considered per query, before filters."""
    candidates: int = 16
    max_query_score: float = 0.9
    max_pair_similarity: float = 0.9
    prefer_multimodal: bool = True
    modality_margin: float = 0.0
    query_dropout: float = 0.2
    mode: str = 'exact'
    recall_target: float = 0.95

    def __post_init__(self):
        if self.candidates < 1:
            raise ValueError(f'retrieval.candidates must be >= 1; got {self.candidates}')
        if not 0.0 <= self.query_dropout < 1.0:
            raise ValueError(f'retrieval.query_dropout={self.query_dropout} must lie in [0, 1)')
        if self.modality_margin < 0 or math.isnan(self.modality_margin):
            raise ValueError(f'retrieval.modality_margin must be >= 0 (inf: image+text always first); '
                             f'got {self.modality_margin}')
        if self.mode not in index.MODES:
            raise ValueError(f'retrieval.mode must be one of {index.MODES}; got {self.mode!r}')


# ---- Query dropout ----

def drop_query_tokens(ids: np.ndarray, mask: np.ndarray, doc_ids: np.ndarray, *, rate: float = 0.2,
                      seed: int = 0, keep: np.ndarray | None = None,
                      pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Remove ``rate * n`` (rounded half up) of each row's n droppable tokens: (ids Int[B, T], mask Bool[B, T])
    with the kept tokens moved left in order and ``pad_id`` after them.

    ids, mask: Int[B, T], Bool[B, T] (True = a real token). doc_ids: Int[B] (>= 0), the query
    documents' ids; the dropped positions depend only on (seed, doc id), so a document's dropped
    query is the same wherever and whenever it is computed. keep: Bool[B, T], tokens never dropped
    (e.g. BOS and the end-of-text token a CLIP text tower pools at). At least one token survives.
    """
    ids, mask = np.asarray(ids), np.asarray(mask, bool)
    doc_ids = np.asarray(doc_ids, np.int64)
    if ids.shape != mask.shape or ids.ndim != 2 or doc_ids.shape != ids.shape[:1]:
        raise ValueError(f'need ids Int[B, T], mask Bool[B, T] and doc_ids Int[B]; got shapes '
                         f'{ids.shape}, {mask.shape}, {doc_ids.shape}')
    if not 0.0 <= rate < 1.0:
        raise ValueError(f'query dropout rate must lie in [0, 1); got {rate}')
    if len(doc_ids) and doc_ids.min() < 0:
        raise ValueError(f'document ids must be >= 0 to seed query dropout; got {doc_ids.min()}')
    droppable = mask if keep is None else mask & ~np.asarray(keep, bool)
    out_ids = np.full_like(ids, pad_id)
    out_mask = np.zeros_like(mask)
    for b in range(len(ids)):
        where = np.flatnonzero(droppable[b])
        n_drop = min(int(math.floor(rate * len(where) + 0.5)), int(mask[b].sum()) - 1)
        kept = mask[b].copy()
        if n_drop > 0:
            rng = np.random.default_rng([seed, int(doc_ids[b])])
            kept[rng.choice(where, n_drop, replace=False)] = False
        n = int(kept.sum())
        out_ids[b, :n], out_mask[b, :n] = ids[b, kept], True
    return out_ids, out_mask


def embed_queries(embed_text: EmbedText, ids: np.ndarray, mask: np.ndarray, doc_ids: np.ndarray, *,
                  rate: float = 0.2, seed: int = 0, keep: np.ndarray | None = None,
                  pad_id: int = 0) -> np.ndarray:
    """Float32[B, D]: ``embed_text`` (e.g. ``partial(clip.embed_text, params, cfg)``) of the query
    text after `drop_query_tokens`. Combine with the image part as the bank's documents were."""
    ids, mask = drop_query_tokens(ids, mask, doc_ids, rate=rate, seed=seed, keep=keep, pad_id=pad_id)
    return np.asarray(embed_text(ids, mask), np.float32)


# ---- Selection ----

def select(scores: np.ndarray, ids: np.ndarray, embeddings: np.ndarray, modality: np.ndarray | None,
           query_ids: np.ndarray, top_m: int, cfg: SelectConfig = SelectConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``top_m`` neighbours per query from its candidates (module docstring, steps 1-5).

    scores Float[Q, C] (inner product with the query), ids Int[Q, C] (-1: no candidate),
    embeddings Float[Q, C, D] (the candidates'), modality UInt8[Q, C] or None (index.TEXT |
    index.IMAGE bits), query_ids Int[Q]. Returns (ids Int64[Q, M], scores Float32[Q, M]).
    """
    scores = np.asarray(scores, np.float32)
    ids = np.asarray(ids, np.int64)
    q, c = ids.shape
    if top_m < 1:
        raise ValueError(f'top_m must be >= 1; got {top_m}')
    both = np.zeros((q, c), bool) if modality is None else (np.asarray(modality) & 3) == (index.TEXT | index.IMAGE)
    both = both.astype(np.float32) if cfg.prefer_multimodal else np.zeros((q, c), np.float32)
    # np.lexsort: the last key is the primary one
    if math.isinf(cfg.modality_margin):
        order = np.lexsort((ids, -scores, -both), axis=1)
    else:
        order = np.lexsort((ids, -both, -scores, -(scores + np.float32(cfg.modality_margin) * both)), axis=1)
    take = lambda x: np.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    scores, ids, embeddings = take(scores), take(ids), take(np.asarray(embeddings, np.float32))

    valid = (ids >= 0) & (ids != np.asarray(query_ids, np.int64)[:, None])
    valid &= np.isfinite(scores) & (scores <= cfg.max_query_score)
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    unit = embeddings / np.maximum(norms, 1e-12)
    similar = np.einsum('qcd,qed->qce', unit, unit) > cfg.max_pair_similarity
    chosen = np.zeros((q, c), bool)
    count = np.zeros(q, np.int64)
    for j in range(c):  # greedy in rank order, all queries at once
        ok = valid[:, j] & (count < top_m) & ~(chosen & similar[:, j, :]).any(axis=1)
        chosen[:, j] = ok
        count += ok
    slot = np.cumsum(chosen, axis=1) - 1
    out_ids = np.full((q, top_m), -1, np.int64)
    out_scores = np.full((q, top_m), -np.inf, np.float32)
    qi, ci = np.nonzero(chosen)
    out_ids[qi, slot[qi, ci]] = ids[qi, ci]
    out_scores[qi, slot[qi, ci]] = scores[qi, ci]
    return out_ids, out_scores


def neighbours(bank: index.MemoryBank, query_emb: np.ndarray, query_ids: np.ndarray, *, top_m: int,
               cfg: SelectConfig = SelectConfig(), mesh=None, block_rows: int = 1 << 17,
               query_batch: int = 4096, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search the bank for queries Float[Q, D] (document ids Int[Q]) and `select` their
    neighbours: (ids Int64[Q, M], scores Float32[Q, M]), -1 / -inf padded.

    Queries go ``query_batch`` at a time, each batch one pass over the bank (search streams it
    in ``block_rows`` blocks split over ``mesh``); candidates' embeddings are gathered from the
    bank for the pairwise diversity check.
    """
    query_emb = bank.check_queries(query_emb)
    query_ids = np.asarray(query_ids, np.int64)
    if query_ids.shape != query_emb.shape[:1]:
        raise ValueError(f'query_ids must be Int[{len(query_emb)}]; got shape {query_ids.shape}')
    out_ids, out_scores = [], []
    for s in range(0, len(query_emb), query_batch):
        scores, rows = index.search_rows(bank, query_emb[s:s + query_batch], cfg.candidates, mesh=mesh,
                                         mode=cfg.mode, recall_target=cfg.recall_target,
                                         block_rows=block_rows, progress=progress)
        modality = None if bank.modality is None else index.rows_of(bank, bank.modality, rows)
        ids, sc = select(scores, index.ids_of_rows(bank, rows), index.rows_of(bank, bank.embeddings, rows),
                         modality, query_ids[s:s + query_batch], top_m, cfg)
        out_ids.append(ids)
        out_scores.append(sc)
    if not out_ids:
        return np.zeros((0, top_m), np.int64), np.zeros((0, top_m), np.float32)
    return np.concatenate(out_ids), np.concatenate(out_scores)
