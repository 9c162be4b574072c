"""The memory bank on disk and sharded maximum inner product search on the (2, 2, 2) mesh,
against numpy brute force."""

import json
import time

import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import parallel
from cm3jax.retrieval import index


@pytest.fixture(scope='module')
def mesh():
    return parallel.create_mesh((2, 2, 2))


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_top_k(embeddings, ids, queries, k, block_rows=100_000):
    """Reference: (scores, ids) by descending score then ascending id, blockwise over the rows
    with argpartition so a 1M-row memmap is never scored whole."""
    best_s = np.zeros((len(queries), 0), np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(embeddings), block_rows):
        s = queries @ np.asarray(embeddings[start:start + block_rows], np.float32).T
        i = np.broadcast_to(np.asarray(ids[start:start + block_rows], np.int64), s.shape)
        if s.shape[1] > k:  # keep every row tied with the k-th, so the id tie-break is exact
            kth = -np.partition(-s, k - 1, axis=1)[:, k - 1:k]
            keep = s >= kth
            width = keep.sum(1).max()
            pick = np.argsort(~keep, axis=1, kind='stable')[:, :width]
            s = np.where(np.take_along_axis(keep, pick, 1), np.take_along_axis(s, pick, 1), -np.inf)
            i = np.take_along_axis(i, pick, 1)
        s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
        order = np.lexsort((i, -s), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_s, best_i


@pytest.mark.parametrize('n, block_rows, k', [(1003, 96, 10), (1003, 100, 7), (37, 1 << 17, 5), (5, 8, 10)])
def test_exact_search_equals_brute_force(mesh, n, block_rows, k):
    rng = np.random.default_rng(n + block_rows)
    emb = rng.standard_normal((n, 24)).astype(np.float32)
    ids = np.arange(n) * 3 + 11
    queries = rng.standard_normal((9, 24)).astype(np.float32)
    bank = index.MemoryBank.from_arrays(emb, ids)
    scores, got = index.search(bank, queries, k, mesh=mesh, block_rows=block_rows, query_batch=4)
    ref_s, ref_i = numpy_top_k(emb, ids, queries, k)
    found = min(k, n)
    np.testing.assert_array_equal(got[:, :found], ref_i)
    np.testing.assert_allclose(scores[:, :found], ref_s, rtol=1e-5, atol=1e-5)
    # a bank smaller than k pads with id -1 and score -inf, never with a padded row
    assert (got[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()
    # rows index the bank; ids are the documents' ids
    _, rows = index.search_rows(bank, queries, k, mesh=mesh, block_rows=block_rows)
    np.testing.assert_array_equal(index.ids_of_rows(bank, rows), got)


@pytest.mark.parametrize('ascending', [True, False])
def test_equal_scores_go_to_the_lower_id(mesh, ascending):
    rng = np.random.default_rng(3)
    base = unit(rng.standard_normal((6, 16)))
    emb = np.repeat(base, 7, axis=0)  # 6 groups of 7 identical rows, spread over devices and blocks
    ids = np.arange(42) * 2 if ascending else rng.permutation(1000)[:42]
    bank = index.MemoryBank.from_arrays(emb, ids)
    assert bank.header['ids_ascending'] == ascending
    queries = base[[0, 3]]
    scores, got = index.search(bank, queries, 10, mesh=mesh, block_rows=16)
    for q, g in enumerate([0, 3]):
        group = np.sort(ids[g * 7:(g + 1) * 7])
        np.testing.assert_array_equal(got[q, :7], group)
        assert np.all(scores[q, :7] == scores[q, 0])
    np.testing.assert_array_equal(got, numpy_top_k(emb, ids, queries, 10)[1])


def test_bank_written_in_chunks_round_trips(tmp_path, mesh):
    rng = np.random.default_rng(0)
    emb = unit(rng.standard_normal((300, 32)))
    ids = np.arange(300) + 1000
    modality = rng.integers(1, 4, 300).astype(np.uint8)
    bank = index.MemoryBank.write(tmp_path / 'bank', emb[:200], ids[:200], modality=modality[:200],
                                  fingerprint='clip-abc', chunk_rows=64)
    bank = index.MemoryBank.append(tmp_path / 'bank', emb[200:], ids[200:], modality=modality[200:],
                                   fingerprint='clip-abc', chunk_rows=64)
    assert isinstance(bank.embeddings, np.memmap) and isinstance(bank.ids, np.memmap)
    assert (bank.count, bank.dim, bank.fingerprint, bank.normalised) == (300, 32, 'clip-abc', True)
    np.testing.assert_array_equal(bank.embeddings, emb)
    np.testing.assert_array_equal(bank.ids, ids)
    np.testing.assert_array_equal(bank.modality, modality)
    # plain numpy files, readable without cm3jax
    np.testing.assert_array_equal(np.load(tmp_path / 'bank' / index.EMBEDDINGS), emb)
    header = json.loads((tmp_path / 'bank' / index.HEADER).read_text())
    assert header['dtype'] == 'float32' and header['ids_ascending'] and header['has_modality']

    with pytest.raises(FileExistsError, match='overwrite=True'):
        index.MemoryBank.write(tmp_path / 'bank', emb, ids, fingerprint='clip-abc')
    with pytest.raises(ValueError, match="built by embedder 'clip-abc'"):
        index.MemoryBank.append(tmp_path / 'bank', emb[:5], ids[:5], modality=modality[:5], fingerprint='other')
    with pytest.raises(ValueError, match='needs modality'):
        index.MemoryBank.append(tmp_path / 'bank', emb[:5], ids[:5])
    with pytest.raises(ValueError, match='>= 0'):
        index.MemoryBank.write(tmp_path / 'neg', emb[:2], [-1, 3], fingerprint='x')


def test_bfloat16_bank(tmp_path, mesh):
    rng = np.random.default_rng(1)
    emb = unit(rng.standard_normal((250, 16)))
    bank = index.MemoryBank.write(tmp_path / 'bf16', emb, np.arange(250), fingerprint='p', dtype='bfloat16',
                                  chunk_rows=100)
    assert bank.embeddings.dtype == jnp.bfloat16 and bank.normalised
    assert np.load(tmp_path / 'bf16' / index.EMBEDDINGS).dtype == np.uint16  # numpy has no bfloat16
    stored = np.asarray(emb.astype(jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(bank.embeddings, np.float32), stored)
    queries = unit(rng.standard_normal((6, 16)))
    scores, got = bank.search(queries, 8, mesh=mesh, block_rows=64)
    ref_s, ref_i = numpy_top_k(stored, np.arange(250), queries, 8)
    np.testing.assert_array_equal(got, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_query_width_must_match_the_bank(tmp_path, mesh):
    bank = index.MemoryBank.write(tmp_path / 'b', unit(np.ones((10, 8))), np.arange(10), fingerprint='f0')
    with pytest.raises(index.DimensionMismatchError, match='dim 12 but the memory bank at .* has dim 8'):
        bank.search(np.ones((2, 12), np.float32), 3, mesh=mesh)
    with pytest.raises(ValueError, match="mode must be one of"):
        bank.search(np.ones((2, 8), np.float32), 3, mesh=mesh, mode='fast')
    with pytest.raises(index.BankFormatError, match='MemoryBank.write'):
        index.MemoryBank.open(tmp_path / 'nowhere')
    # an append cut short (rows on disk, header not yet rewritten) is ignored, then overwritten
    with open(tmp_path / 'b' / index.EMBEDDINGS, 'ab') as f:
        np.full((3, 8), 7, np.float32).tofile(f)
    with open(tmp_path / 'b' / index.IDS, 'r+b') as f:
        f.write(index._npy_preamble(np.dtype('<i8'), (13,)))
    assert index.MemoryBank.open(tmp_path / 'b').count == 10
    bank = index.MemoryBank.append(tmp_path / 'b', unit(np.full((2, 8), -1.0)), [10, 11])
    assert bank.count == 12 and (np.load(tmp_path / 'b' / index.EMBEDDINGS)[10:] < 0).all()
    # a truncated file is refused
    with open(tmp_path / 'b' / index.EMBEDDINGS, 'r+b') as f:
        f.truncate(200)
    with pytest.raises(index.BankFormatError, match='truncated'):
        index.MemoryBank.open(tmp_path / 'b')


def test_approx_mode_recall(mesh):
    rng = np.random.default_rng(7)
    emb = unit(rng.standard_normal((20_000, 64)))
    queries = unit(rng.standard_normal((32, 64)))
    _, exact = index.search(emb, queries, 10, mesh=mesh, block_rows=8192)
    _, approx = index.search(emb, queries, 10, mesh=mesh, block_rows=8192, mode='approx', recall_target=0.95)
    got = index.recall(approx, exact)
    print(f'approx_max_k recall@10 = {got:.3f}')
    assert got >= 0.95


def test_million_row_bank_on_disk(tmp_path, mesh):
    n, d, chunk = 1_000_000, 256, 65_536
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with index.MemoryBank.writer(tmp_path / 'big', d, fingerprint='random') as w:
        for start in range(0, n, chunk):  # never more than one chunk in memory
            rows = min(chunk, n - start)
            w.append(unit(rng.standard_normal((rows, d), dtype=np.float32)), np.arange(start, start + rows))
    t1 = time.perf_counter()
    bank = index.MemoryBank.open(tmp_path / 'big')
    assert bank.count == n and bank.normalised and bank.header['ids_ascending']
    # two queries near bank rows (their row must come first), three random ones
    near = np.asarray(bank.embeddings[[17, 876_543]])
    queries = unit(np.concatenate([near + 0.05 * unit(rng.standard_normal((2, d))),
                                   rng.standard_normal((3, d))]))
    scores, got = bank.search(queries, 10, mesh=mesh)
    t2 = time.perf_counter()
    ref_s, ref_i = numpy_top_k(bank.embeddings, bank.ids, queries, 10)
    print(f'1M x 256 bank: write {t1 - t0:.1f}s, sharded search of 5 queries {t2 - t1:.1f}s, '
          f'numpy brute force {time.perf_counter() - t2:.1f}s')
    np.testing.assert_array_equal(got, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    assert got[0, 0] == 17 and got[1, 0] == 876_543
