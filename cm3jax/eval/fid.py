"""Frechet distance between Gaussians fitted to image features (FID and its variants).

    ext = inception.load_inception('pt_inception-2015-12-05-6726825d.pth')  # or clip_extractor(dir), or
    ext = FeatureExtractor('my-net', fn, {'resize': 'none'})                 # any UInt8[N,H,W,3] -> Float[N,D]
    mu1, s1 = image_statistics(ext, batches_of_generated_images)
    mu2, s2 = cached_statistics(ext, 'coco-val2014-30k', lambda: batches_of_real_images, cache_dir)
    fid = frechet_distance(mu1, s1, mu2, s2)

Statistics are accumulated in float64 over batches (30k images never sit in memory at once),
shifted by the first batch's mean so that the covariance's ``E[xx^T] - mu mu^T`` does not
cancel. The distance is computed in float64; the matrix square root is scipy's ``sqrtm`` of
``sigma1 @ sigma2``, retried with ``eps * I`` added to both covariances when it is not finite
(near-singular covariances: fewer samples than dimensions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)


class RunningStatistics:
    """Mean and covariance of features seen batch by batch, in float64."""

    def __init__(self):
        self.n, self.shift, self.total, self.outer = 0, None, None, None

    def update(self, features) -> None:
        """features: Float[B, D]."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f'features have shape {x.shape}; expected [N, D]')
        if not len(x):
            return
        if self.shift is None:
            self.shift = x.mean(0)
            self.total = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(f'features of width {x.shape[1]} after width {self.shift.shape[0]}')
        d = x - self.shift
        self.n += len(x)
        self.total += d.sum(0)
        self.outer += d.T @ d

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu Float64[D], sigma Float64[D, D]), sigma unbiased (divided by N - 1, as np.cov)."""
        if self.n < 2:
            raise ValueError(f'FID statistics need at least 2 feature vectors, got {self.n}')
        mean_d = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mean_d, mean_d)) / (self.n - 1)
        return self.shift + mean_d, sigma


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of Float[N, D] features, or of an iterable of Float[B, D] batches."""
    acc = RunningStatistics()
    if isinstance(features, np.ndarray) or hasattr(features, 'shape'):
        acc.update(features)
    else:
        for batch in features:
            acc.update(batch)
    return acc.result()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` in float64."""
    from scipy import linalg
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'statistics do not fit: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs '
                         f'{sigma2.shape} (were they made by the same extractor?)')
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        log.warning('the FID matrix square root is not finite (near-singular covariances); adding %g to '
                    'their diagonals', eps)
        offset = np.eye(len(mu1)) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # the product of two PSD matrices has a real spectrum: imaginary parts are round-off
    trace_root = float(np.trace(root).real)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A named feature extractor: ``fn`` maps UInt8[N, H, W, 3] to Float[N, D]. ``protocol``
    describes how images become features (extractor, resize, input size, weights); it keys
    cached statistics and goes into every report next to the figures."""
    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    protocol: dict
    batch: int = 64

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f'{self.name} takes UInt8[N, H, W, 3] images; got {images.dtype} {images.shape}')
        out = [np.asarray(self.fn(images[i:i + self.batch]), np.float32) for i in range(0, len(images), self.batch)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps({'name': self.name, **self.protocol}, sort_keys=True).encode()).hexdigest()


def callable_extractor(fn: Callable[[np.ndarray], np.ndarray], name: str, batch: int = 64, **protocol):
    """Any ``UInt8[N, H, W, 3] -> Float[N, D]`` as a `FeatureExtractor`."""
    return FeatureExtractor(name, fn, {'extractor': name, **protocol}, batch)


def clip_extractor(path: str | pathlib.Path, batch: int = 64, retriever=None) -> FeatureExtractor:
    """The image tower of a `cm3jax train-retriever` workdir or of HF CLIP weights (``path``;
    or the already loaded ``retriever`` from there): unit-norm projected embeddings. Images are
    resized to the tower's side (bicubic, antialiased)."""
    if retriever is None:
        from cm3jax.retrieval import load
        retriever = load.load_retriever(path, batch_size=batch)
    return FeatureExtractor(f'clip:{pathlib.Path(path).name}', retriever.embed_images,
                            {'extractor': f'CLIP image tower ({pathlib.Path(path).absolute()})',
                             'resize': f'bicubic, antialiased, to {retriever.cfg.image_size}',
                             'features': retriever.cfg.projection_dim}, batch)


def image_statistics(extractor: FeatureExtractor, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, N) of the features of UInt8[B, H, W, 3] image batches, streamed."""
    acc = RunningStatistics()
    for batch in batches:
        acc.update(extractor(batch))
    mu, sigma = acc.result()
    return mu, sigma, acc.n


def batches(images, size: int = 256):
    """UInt8[N, ...] (an array or a sequence) -> arrays of ``size`` rows."""
    for i in range(0, len(images), size):
        yield np.asarray(images[i:i + size])


def cached_statistics(extractor: FeatureExtractor, data_key: str, make_batches: Callable[[], Iterable[np.ndarray]],
                      cache_dir: str | pathlib.Path | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Reference statistics, read from ``cache_dir/fid-<hash>.npz`` when the same extractor,
    protocol and data (``data_key``: what the images are, e.g. 'coco val2014 30000 seed 0')
    made them before; computed from ``make_batches()`` and saved otherwise."""
    digest = hashlib.sha256(f'{extractor.key}/{data_key}'.encode()).hexdigest()[:16]
    path = None if cache_dir is None else pathlib.Path(cache_dir) / f'fid-{digest}.npz'
    if path is not None and path.exists():
        with np.load(path) as f:
            return f['mu'], f['sigma'], int(f['n'])
    mu, sigma, n = image_statistics(extractor, make_batches())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({'extractor': extractor.name, 'protocol': extractor.protocol, 'data': data_key})
        np.savez(path, mu=mu, sigma=sigma, n=n, meta=meta)
    return mu, sigma, n


def fid(extractor: FeatureExtractor, images, reference) -> float:
    """FID of UInt8 images (array or batches) against ``reference``: (mu, sigma[, n]) or images."""
    mu1, s1, _ = image_statistics(extractor, batches(images) if hasattr(images, 'shape') else images)
    if isinstance(reference, tuple):
        mu2, s2 = reference[:2]
    else:
        mu2, s2, _ = image_statistics(extractor, batches(reference) if hasattr(reference, 'shape') else reference)
    return frechet_distance(mu1, s1, mu2, s2)
