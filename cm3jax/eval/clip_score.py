"""CLIP score (Hessel et al. 2021, as torchmetrics defines it): ``100 * max(cos(image, caption), 0)``
per pair, averaged over pairs, with any CLIP the retriever loader reads (`cm3jax train-retriever`
workdirs, HF CLIP weights)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def clip_score(scorer, images, captions: Sequence[str], batch: int = 256) -> dict:
    """images UInt8[N, H, W, 3] paired with ``captions`` (N) -> {'value': mean, 'se', 'n',
    'per_item': Float[N] list}. ``scorer``: a `cm3jax.retrieval.load.Retriever` (or anything
    with ``.score(images, captions) -> Float[N]``, ``100 * max(cos, 0)``)."""
    if len(images) != len(captions):
        raise ValueError(f'clip_score pairs images with captions: got {len(images)} and {len(captions)}')
    if not len(images):
        raise ValueError('clip_score needs at least one (image, caption) pair')
    scores = np.concatenate([np.asarray(scorer.score(np.asarray(images[i:i + batch]), list(captions[i:i + batch])),
                                        np.float64) for i in range(0, len(images), batch)])
    return {'value': float(scores.mean()), 'se': float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1
            else float('nan'), 'n': int(len(scores)), 'per_item': scores.tolist()}
