"""FID's statistics and distance: the distance equals torchmetrics' `_compute_fid` on random and
rank-deficient covariances, batched statistics equal numpy's one-shot ones, and reference
statistics are cached by extractor, protocol and data."""

import numpy as np
import pytest

from cm3jax.eval import fid
from tests.helpers import torch_fidelity_inception


def _reference(mu1, s1, mu2, s2):
    torch = pytest.importorskip('torch')
    torch_fidelity_inception()  # torchmetrics' fid module imports torch-fidelity when it is installed
    from torchmetrics.image.fid import _compute_fid
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return float(_compute_fid(t(mu1), t(s1), t(mu2), t(s2)))


def _stats(rng, n, d, rank=None):
    x = rng.normal(size=(n, rank or d)) @ rng.normal(size=(rank or d, d)) + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize('d,n,rank', [(16, 200, None), (64, 500, None), (32, 20, None), (48, 400, 10)],
                         ids=['random-16', 'random-64', 'fewer-samples-than-dims', 'rank-10-of-48'])
def test_frechet_distance_equals_torchmetrics(d, n, rank):
    rng = np.random.default_rng(d + n)
    mu1, s1 = _stats(rng, n, d, rank)
    mu2, s2 = _stats(rng, n, d, rank)
    want = _reference(mu1, s1, mu2, s2)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-6)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_batched_statistics_equal_numpy_one_shot():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 24)) * 3 + 1e3  # a large mean: the shifted accumulation must not cancel
    mu, sigma = fid.statistics(x[i:i + 77] for i in range(0, len(x), 77))
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    mu1, sigma1 = fid.statistics(x)
    np.testing.assert_allclose(sigma1, sigma, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match='at least 2'):
        fid.statistics(x[:1])


def test_reference_statistics_are_cached_by_extractor_protocol_and_data(tmp_path):
    calls = []
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20, 8, 8, 3), np.uint8)

    def mean_colour(x):
        calls.append(len(x))
        return x.reshape(len(x), -1, 3).mean(1)
    ext = fid.callable_extractor(mean_colour, 'mean-colour', batch=8)
    a = fid.cached_statistics(ext, 'twenty', lambda: fid.batches(images, 16), tmp_path)
    assert calls == [8, 8, 4] and a[2] == 20  # batches of 16 and 4, in chunks of at most 8
    b = fid.cached_statistics(ext, 'twenty', lambda: fid.batches(images, 16), tmp_path)
    assert len(calls) == 3  # read back, not recomputed
    np.testing.assert_array_equal(a[1], b[1])
    other = fid.callable_extractor(mean_colour, 'mean-colour', batch=8, resize='none')
    fid.cached_statistics(other, 'twenty', lambda: fid.batches(images, 16), tmp_path)
    fid.cached_statistics(ext, 'other data', lambda: fid.batches(images, 16), tmp_path)
    assert len(calls) == 9 and len(list(tmp_path.glob('fid-*.npz'))) == 3
    # FID of a set against itself is 0, against another set it is not
    assert fid.fid(ext, images, images) == pytest.approx(0.0, abs=1e-6)
    assert fid.fid(ext, images, images[::-1] // 2) > 1.0


def test_bad_inputs_are_refused():
    ext = fid.callable_extractor(lambda x: x.reshape(len(x), -1), 'flat')
    with pytest.raises(ValueError, match='UInt8'):
        ext(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match='same extractor'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
