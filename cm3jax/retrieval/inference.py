"""Retrieval at inference time and CLIP re-ranking (docs/paper.md, "Retrieval augmentation" and "Decoding").

- `retrieve`: a text prompt is embedded by the retriever and searched in the memory bank that
  `cm3jax build-index` wrote for the training data; the selected documents are read from that
  data's shards and laid out (caption, then image, as text-to-image documents are), each ending
  in ``<eos>``, ready for `cm3jax.sample.generate.text_to_image(..., retrieved=...)`.
- `score_fn` / `rerank`: CLIP score (``100 * max(cos, 0)``) of sampled images against their
  prompt; `text_to_image(..., score_fn=score_fn(retriever))` returns samples best first.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Sequence

import numpy as np

from cm3jax.data import documents, prepare, shards
from cm3jax.retrieval import index, select
from cm3jax.retrieval.build import BANK_DIR
from cm3jax.retrieval.load import Retriever
from cm3jax.vocab import Vocab

# text-to-image order and whole captions: what a prompt's retrieved context should show
RETRIEVED_LAYOUT = documents.LayoutConfig(text_first=1.0, caption_dropout=0.0)


def retrieve(retriever: Retriever, data_dir: str | pathlib.Path, prompts: Sequence[str], k: int, *,
             vocab: Vocab | None = None, cfg: select.SelectConfig = select.SelectConfig()) -> list[list[np.ndarray]]:
    """Per prompt, up to ``k`` laid-out token documents (Int32[T_i], each ending in ``<eos>``),
    best first, from the bank of ``data_dir``. ``vocab``: the generator's, checked against the
    data's (retrieved ids must mean what the LM learned)."""
    data_dir = pathlib.Path(data_dir)
    manifest = prepare.read_manifest(data_dir, vocab)
    vocab = vocab or Vocab.from_dict(manifest['vocab'])
    if k < 1:
        return [[] for _ in prompts]
    bank = index.MemoryBank.open(data_dir / BANK_DIR)
    if bank.fingerprint != prepare.params_fingerprint(retriever.params):
        raise ValueError(f'the bank in {data_dir / BANK_DIR} was built by another retriever (fingerprint '
                         f'{bank.fingerprint}): query it with that one, or run `cm3jax build-index` again')
    queries = retriever.embed_texts(list(prompts))
    found, _ = select.neighbours(bank, queries, -1 - np.arange(len(prompts)), top_m=k, cfg=cfg, mesh=retriever.mesh)
    source = shards.ShardRecords(data_dir, manifest['shards'])
    rng = np.random.default_rng(0)  # the layout draws nothing with text_first=1 and no dropout
    out = []
    for row in found:
        docs = []
        for doc_id in row[row >= 0]:
            segments, is_image, _ = documents.decode_record(source[int(doc_id)], vocab.size)
            docs.append(documents.layout(segments, is_image, vocab, rng, RETRIEVED_LAYOUT))
        out.append(docs)
    return out


def score_fn(retriever: Retriever) -> Callable[[np.ndarray, str], np.ndarray]:
    """``fn(images UInt8[N, H, H, 3], prompt) -> Float32[N]`` CLIP scores, for `text_to_image`."""
    return lambda images, prompt: retriever.score(images, [prompt] * len(images))


def rerank(retriever: Retriever, images: np.ndarray, prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best image [H, H, 3], order Int[N] best first, scores Float32[N]) of samples for a prompt."""
    scores = score_fn(retriever)(np.asarray(images), prompt)
    order = np.argsort(-scores, kind='stable')
    return np.asarray(images)[order[0]], order, scores
