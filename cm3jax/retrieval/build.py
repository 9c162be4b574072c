"""`cm3jax build-index`: embed prepared documents into a memory bank and write every document's
neighbour list next to the shards (docs/paper.md, "Retrieval augmentation"; docs/architecture.md, "Data flow").

For each document of the bank's data (ids in manifest order, `cm3jax.data.neighbours`):
- its text segments are decoded to a string with the data's text tokenizer, its first image's
  codes to pixels with the data's VQ decoder (a document's other images are not embedded);
- the retriever embeds each part; the document's embedding is the normalised mean of the parts
  it has (`clip.embed_document`), stored in ``DATA/retrieval_bank`` with a modality byte;
- its query embedding drops 20% of its text tokens first (query dropout, seeded by the document
  id) and averages with the same image part;
- `select.neighbours` picks the top ``top_m`` after the paper's rules; the lists go to ``DATA``.

Held-out data (``queries``) gets its own lists against the same bank, with no query dropout and
no self-exclusion (its ids name other documents). Query embeddings are held in memory
(``4 * N * P`` bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Iterator, Sequence

import jax
import numpy as np
from tqdm import tqdm

from cm3jax.data import documents, neighbours, prepare, shards
from cm3jax.errors import DataError
from cm3jax.retrieval import clip, index, select
from cm3jax.retrieval.load import Retriever
from cm3jax.vq import model as vq

log = logging.getLogger(__name__)
BANK_DIR = 'retrieval_bank'


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    top_m: int = 8                      # neighbours kept per document
    select: select.SelectConfig = select.SelectConfig()
    dropout_seed: int = 0
    batch: int = 64                     # documents decoded and embedded at a time
    bank_dtype: str = 'float32'

    def __post_init__(self):
        if self.top_m < 1 or self.batch < 1:
            raise ValueError(f'build-index needs top_m >= 1 and batch >= 1; got {self.top_m}, {self.batch}')


def _chunks(data_dir: pathlib.Path, manifest: dict, batch: int, vocab_size: int) -> Iterator[list[tuple[list, list]]]:
    source = shards.ShardRecords(data_dir, manifest['shards'])
    for start in range(0, len(source), batch):
        yield [_decode(source, i, vocab_size) for i in range(start, min(start + batch, len(source)))]


def _decode(source: shards.ShardRecords, i: int, vocab_size: int) -> tuple[list, list]:
    # every document needs its bank row (neighbour ids are row numbers): a damaged one stops the build
    try:
        return documents.decode_record(source[i], vocab_size)[:2]
    except documents.CorruptRecord as e:
        raise DataError(f'build-index cannot embed document {i} of {source.data_dir}: {e}; prepare the data '
                        f'again (`cm3jax prepare`)') from None


def embed_documents(data_dir, retriever: Retriever, cfg: BuildConfig, *, dropout: float,
                    desc: str = 'embedding') -> dict[str, np.ndarray]:
    """{'documents', 'queries': Float32[N, P], 'modality': UInt8[N]} for the documents of
    ``data_dir`` in id order; queries drop ``dropout`` of each document's text tokens."""
    data_dir = pathlib.Path(data_dir)
    manifest, vocab, tok, vq_params, vq_cfg = prepare.load_tokenizers(data_dir)
    decode = jax.jit(lambda codes: vq.decode(vq_params, codes, vq_cfg))
    r = vq_cfg.latent_resolution
    docs, queries, modality = [], [], []
    start = 0
    for chunk in tqdm(_chunks(data_dir, manifest, cfg.batch, vocab.size), total=-(-manifest['documents'] // cfg.batch),
                      desc=desc, unit='batch'):
        n = len(chunk)
        text_ids = [np.concatenate([s for s, img in zip(segs, flags) if not img] or [np.zeros(0, np.int32)])
                    for segs, flags in chunk]
        codes = [next((s for s, img in zip(segs, flags) if img), None) for segs, flags in chunk]
        has_text = np.array([len(t) > 0 for t in text_ids])
        has_image = np.array([c is not None for c in codes])
        width = max(1, max(len(t) for t in text_ids))
        ids = np.zeros((n, width), np.int64)
        mask = np.zeros((n, width), bool)
        for i, t in enumerate(text_ids):
            ids[i, :len(t)], mask[i, :len(t)] = t, True
        dropped, dropped_mask = select.drop_query_tokens(ids, mask, np.arange(start, start + n), rate=dropout,
                                                         seed=cfg.dropout_seed, pad_id=vocab.pad)
        texts = [tok.decode_joint(t[m], vocab) for t, m in zip(ids, mask)]
        query_texts = [tok.decode_joint(t[m], vocab) for t, m in zip(dropped, dropped_mask)]
        p = retriever.cfg.projection_dim
        text_emb, query_emb, image_emb = (np.zeros((n, p), np.float32) for _ in range(3))
        if has_text.any():
            text_emb[has_text] = retriever.embed_texts([t for t, h in zip(texts, has_text) if h])
            query_emb[has_text] = retriever.embed_texts([t for t, h in zip(query_texts, has_text) if h])
        if has_image.any():
            grid = np.stack([np.asarray(c) - vocab.image_offset for c in codes if c is not None]).reshape(-1, r, r)
            image_emb[has_image] = retriever.embed_images(np.asarray(decode(grid)))
        docs.append(np.asarray(clip.embed_document(text_emb, image_emb, has_text, has_image), np.float32))
        queries.append(np.asarray(clip.embed_document(query_emb, image_emb, has_text, has_image), np.float32))
        modality.append((has_text * index.TEXT | has_image * index.IMAGE).astype(np.uint8))
        start += n
    return {'documents': np.concatenate(docs), 'queries': np.concatenate(queries),
            'modality': np.concatenate(modality)}


def build_index(data_dir, retriever: Retriever, cfg: BuildConfig = BuildConfig(),
                queries: Sequence[str | pathlib.Path] = ()) -> dict:
    """Write ``data_dir/retrieval_bank`` and the neighbour lists of ``data_dir`` (and of each
    held-out directory in ``queries``). Returns a summary."""
    data_dir = pathlib.Path(data_dir)
    fingerprint = prepare.params_fingerprint(retriever.params)
    own = embed_documents(data_dir, retriever, cfg, dropout=cfg.select.query_dropout, desc=f'embedding {data_dir.name}')
    n = len(own['documents'])
    with index.MemoryBank.writer(data_dir / BANK_DIR, own['documents'].shape[1], fingerprint=fingerprint,
                                 dtype=cfg.bank_dtype, with_modality=True, overwrite=True) as writer:
        writer.append(own['documents'], np.arange(n), own['modality'])
    bank = index.MemoryBank.open(data_dir / BANK_DIR)
    summary = {'bank': str(data_dir / BANK_DIR), 'documents': n, 'fingerprint': bank.fingerprint}
    sets = [(data_dir, own['queries'], np.arange(n))]
    for held_out in queries:
        embedded = embed_documents(held_out, retriever, cfg, dropout=0.0, desc=f'embedding {pathlib.Path(held_out).name}')
        m = len(embedded['documents'])
        sets.append((pathlib.Path(held_out), embedded['documents'], -1 - np.arange(m)))  # ids no bank row has
    for where, query_emb, query_ids in sets:
        found, scores = select.neighbours(bank, query_emb, query_ids, top_m=cfg.top_m, cfg=cfg.select,
                                          mesh=retriever.mesh)
        neighbours.write_neighbours(where, np.arange(len(query_ids)), found, scores=scores,
                                    select=dataclasses.asdict(cfg.select), bank_fingerprint=bank.fingerprint,
                                    bank_count=bank.count)
        short = int((found < 0).any(axis=1).sum())
        summary[str(where)] = {'queries': len(query_ids), 'short_lists': short,
                               'mean_top_score': float(np.nanmean(np.where(found[:, 0] >= 0, scores[:, 0], np.nan)))}
        if short:
            log.warning('%d of %d documents of %s have fewer than %d neighbours after selection: raise '
                        'select.candidates', short, len(query_ids), where, cfg.top_m)
    return summary
