"""Neighbour selection (relevance, modality, diversity, self-exclusion), query dropout, and the
neighbour-list files."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cm3jax import parallel
from cm3jax.data import neighbours
from cm3jax.retrieval import index, select

BOTH, TEXT, IMAGE = index.TEXT | index.IMAGE, index.TEXT, index.IMAGE


@pytest.fixture(scope='module')
def mesh():
    return parallel.create_mesh((2, 2, 2))


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered_bank(seed, n_clusters=12, per_cluster=5, dim=16, spread=0.25):
    """Clusters of near-duplicates (pairwise similarity mostly > 0.9) around random centres."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_clusters, dim)))
    emb = unit(np.repeat(centres, per_cluster, 0) + spread / np.sqrt(dim) * rng.standard_normal(
        (n_clusters * per_cluster, dim)))
    ids = rng.permutation(10 * len(emb))[:len(emb)]
    modality = rng.choice([TEXT, IMAGE, BOTH], len(emb)).astype(np.uint8)
    return index.MemoryBank.from_arrays(emb, ids, modality, fingerprint=f'clustered-{seed}')


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31), top_m=st.integers(1, 4), spread=st.sampled_from([0.1, 0.25, 0.6]),
       max_query=st.sampled_from([0.9, 0.95]), max_pair=st.sampled_from([0.5, 0.9]),
       prefer=st.booleans(), margin=st.sampled_from([0.0, 0.05, float('inf')]))
def test_selected_neighbours_obey_every_rule(mesh, seed, top_m, spread, max_query, max_pair, prefer, margin):
    check_selection(mesh, seed, top_m, spread, max_query, max_pair, prefer, margin)


def test_the_rules_are_exercised(mesh):
    # the property checks are not vacuous: candidates get skipped, and some rows come back short
    stats = [check_selection(mesh, seed, 4, spread, 0.9, 0.9, True, 0.0) for seed in range(2) for spread in (0.1, 0.25)]
    skipped, short = map(sum, zip(*stats))
    assert skipped >= 10 and short >= 1, (skipped, short)


def check_selection(mesh, seed, top_m, spread, max_query, max_pair, prefer, margin):
    """Select for 6 queries and check every rule; returns (candidates skipped, rows short of top_m)."""
    bank = clustered_bank(seed, spread=spread)
    rng = np.random.default_rng(seed + 1)
    q_rows = rng.choice(bank.count, 6, replace=False)
    # queries are bank documents, some nudged (as query dropout would), so self and near-copies score high
    queries = unit(bank.embeddings[q_rows] + 0.1 * rng.standard_normal((6, bank.dim)) * (np.arange(6) % 2)[:, None])
    query_ids = bank.ids[q_rows]
    cfg = select.SelectConfig(candidates=12, max_query_score=max_query, max_pair_similarity=max_pair,
                              prefer_multimodal=prefer, modality_margin=margin)
    ids, scores = select.neighbours(bank, queries, query_ids, top_m=top_m, cfg=cfg, mesh=mesh, block_rows=16)
    assert ids.shape == scores.shape == (6, top_m)
    row_of = {int(i): r for r, i in enumerate(bank.ids)}
    skipped = 0
    for q in range(6):
        got = [int(i) for i in ids[q] if i >= 0]
        assert (ids[q, len(got):] == -1).all() and np.isneginf(scores[q, len(got):]).all()  # padding at the end
        assert int(query_ids[q]) not in got and len(set(got)) == len(got)
        emb = bank.embeddings[[row_of[i] for i in got]]
        np.testing.assert_allclose(scores[q, :len(got)], emb @ queries[q], atol=1e-5)
        assert (scores[q, :len(got)] <= max_query).all()
        sim = emb @ emb.T
        assert (sim[np.triu_indices(len(got), 1)] <= max_pair + 1e-6).all()
        # nothing was skipped without a reason: every candidate (top 12 by score) that ranks
        # ahead of the last pick, or any candidate when fewer than top_m were picked, was
        # picked, the query itself, too close to the query, or too close to a pick
        all_s = bank.embeddings @ queries[q]
        both = ((bank.modality == BOTH) & prefer).astype(np.float32)

        def rank(r):  # smaller is better: the documented ranking rule
            bonus = both[r] * (margin if margin != float('inf') else 0)
            return (-both[r] if margin == float('inf') else 0, -(all_s[r] + bonus), -both[r], bank.ids[r])

        last = rank(row_of[got[-1]]) if len(got) == top_m else None
        for r in np.argsort(-all_s)[:12]:
            i = int(bank.ids[r])
            if i in got or (last is not None and rank(r) > last):
                continue
            skipped += 1
            reasons = [i == query_ids[q], all_s[r] > max_query, (emb @ bank.embeddings[r] > max_pair).any()]
            assert any(reasons), (q, i)
    return skipped, int((ids == -1).any(1).sum())


def test_multimodal_documents_win_ties():
    # query e0; four candidates score exactly 0.6 and are mutually dissimilar (0.36)
    dim = 8
    basis = np.eye(dim, dtype=np.float32)
    emb = np.stack([0.6 * basis[0] + 0.8 * basis[j] for j in range(1, 5)] + [0.7 * basis[0] + 0.71414284 * basis[5]])
    ids = np.array([3, 5, 8, 9, 20])
    modality = np.array([TEXT, IMAGE, BOTH, BOTH, TEXT], np.uint8)
    cands = lambda x: np.broadcast_to(x, (1,) + x.shape)
    scores = emb @ basis[0]
    assert len(set(scores[:4].tolist())) == 1
    run = lambda **kw: select.select(cands(scores), cands(ids), cands(emb), cands(modality), np.array([99]),
                                     top_m=5, cfg=select.SelectConfig(**kw))[0][0].tolist()
    assert run(prefer_multimodal=False) == [20, 3, 5, 8, 9]        # relevance, then lower id
    assert run(prefer_multimodal=True) == [20, 8, 9, 3, 5]         # image+text first among equals
    assert run(prefer_multimodal=True, modality_margin=0.05) == [20, 8, 9, 3, 5]   # 0.1 apart: relevance wins
    assert run(prefer_multimodal=True, modality_margin=0.2) == [8, 9, 20, 3, 5]    # within the margin
    assert run(prefer_multimodal=True, modality_margin=float('inf')) == [8, 9, 20, 3, 5]


def test_modality_preference_end_to_end(tmp_path, mesh):
    dim = 8
    basis = np.eye(dim, dtype=np.float32)
    emb = np.stack([0.6 * basis[0] + 0.8 * basis[j] for j in range(1, 7)])
    modality = np.array([TEXT, IMAGE, TEXT, BOTH, IMAGE, BOTH], np.uint8)
    bank = index.MemoryBank.write(tmp_path / 'bank', emb, np.arange(6), modality=modality, fingerprint='m')
    ids, _ = select.neighbours(bank, basis[:1], [100], top_m=3, mesh=mesh)
    assert ids.tolist() == [[3, 5, 0]]
    ids, _ = select.neighbours(bank, basis[:1], [100], top_m=3, mesh=mesh,
                               cfg=select.SelectConfig(prefer_multimodal=False))
    assert ids.tolist() == [[0, 1, 2]]


def test_fewer_survivors_are_padded(mesh):
    emb = unit(np.array([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [0.0, 1.0]]))
    bank = index.MemoryBank.from_arrays(emb, [0, 1, 2, 3])
    ids, scores = select.neighbours(bank, emb[:1], [0], top_m=3, mesh=mesh)
    # 1 and 2 are near copies of the query (> 0.9); 3 is orthogonal (score 0) and survives
    assert ids.tolist() == [[3, -1, -1]] and scores[0, 0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(index.DimensionMismatchError, match='dim 3 but'):
        select.neighbours(bank, np.ones((1, 3)), [0], top_m=2, mesh=mesh)


# ---- Query dropout ----

def bag_of_tokens(vocab=50, dim=12, seed=0):
    """A stand-in for clip.embed_text: unit mean of per-token vectors over the mask."""
    table = np.random.default_rng(seed).standard_normal((vocab, dim)).astype(np.float32)

    def embed_text(ids, mask):
        return unit((table[ids] * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1))
    return embed_text


def token_batch(seed, b=16, t=20):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, t + 1, b)
    mask = np.arange(t)[None] < lengths[:, None]
    ids = np.where(mask, rng.integers(1, 50, (b, t)), 0)
    ids[np.arange(b), lengths - 1] = 49  # an end-of-text token to protect
    return ids, mask, rng.permutation(1000)[:b]


def test_query_dropout_removes_a_fifth_of_the_tokens():
    ids, mask, doc_ids = token_batch(0)
    keep = ids == 49
    out_ids, out_mask = select.drop_query_tokens(ids, mask, doc_ids, rate=0.2, seed=3, keep=keep)
    for b in range(len(ids)):
        n = mask[b].sum()
        kept = out_ids[b, out_mask[b]]
        assert len(kept) == n - int(np.floor(0.2 * (n - 1) + 0.5))  # the protected token is not counted
        assert kept[-1] == 49 and (out_ids[b, ~out_mask[b]] == 0).all()
        # the kept tokens are a subsequence of the original, in order
        it = iter(ids[b, mask[b]].tolist())
        assert all(tok in it for tok in kept.tolist())
    assert (out_mask.sum(1) < mask.sum(1)).any()


def test_query_dropout_is_deterministic_per_seed_and_document():
    ids, mask, doc_ids = token_batch(1)
    embed = bag_of_tokens()
    full = embed(ids, mask)
    a = select.embed_queries(embed, ids, mask, doc_ids, rate=0.2, seed=0)
    b = select.embed_queries(embed, ids, mask, doc_ids, rate=0.2, seed=0)
    c = select.embed_queries(embed, ids, mask, doc_ids, rate=0.2, seed=1)
    np.testing.assert_array_equal(a, b)
    dropped = mask.sum(1) >= 3  # round(0.2 * n) >= 1
    assert (np.abs(a - full).max(1)[dropped] > 1e-4).all()  # dropout changes the query embedding
    assert (np.abs(a - c).max(1) > 1e-6).sum() >= len(ids) // 2  # another seed, other tokens
    # the same document drops the same tokens wherever it sits in a batch
    perm = np.random.default_rng(2).permutation(len(ids))
    d = select.embed_queries(embed, ids[perm], mask[perm], doc_ids[perm], rate=0.2, seed=0)
    np.testing.assert_allclose(d, a[perm], atol=1e-6)
    np.testing.assert_array_equal(select.embed_queries(embed, ids, mask, doc_ids, rate=0.0), full)
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        select.drop_query_tokens(ids, mask, doc_ids, rate=1.0)


# ---- Neighbour lists on disk ----

def test_neighbour_lists_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.permutation(500)[:40]
    nbrs = rng.integers(-1, 500, (40, 3))
    scores = rng.random((40, 3)).astype(np.float32)
    cfg = select.SelectConfig(candidates=8, max_query_score=0.85)
    neighbours.write_neighbours(tmp_path, ids, nbrs, scores=scores, select=dataclasses.asdict(cfg), bank_fingerprint='bank-1', bank_count=500)
    lists = neighbours.read_neighbours(tmp_path, bank_fingerprint='bank-1')
    order = np.argsort(ids)
    assert len(lists) == 40 and isinstance(lists.neighbours, np.memmap)
    np.testing.assert_array_equal(lists.ids, ids[order])
    np.testing.assert_array_equal(lists.neighbours, nbrs[order])
    np.testing.assert_array_equal(lists.scores, scores[order])
    assert lists.header['m'] == 3 and lists.header['bank_count'] == 500
    assert select.SelectConfig(**lists.header['select']) == cfg
    missing = next(i for i in range(1000) if i not in set(ids.tolist()))
    np.testing.assert_array_equal(lists.lookup([ids[5], missing, ids[0]]),
                                  np.stack([nbrs[5], np.full(3, -1), nbrs[0]]))

    with pytest.raises(neighbours.NeighbourFormatError, match="come from bank 'bank-1', not 'bank-2'"):
        neighbours.read_neighbours(tmp_path, bank_fingerprint='bank-2')
    with pytest.raises(ValueError, match='unique'):
        neighbours.write_neighbours(tmp_path / 'dup', [1, 2, 1], np.zeros((3, 2)))
    with pytest.raises(neighbours.NeighbourFormatError, match='build-index'):
        neighbours.read_neighbours(tmp_path / 'nowhere')
    # rewritten without scores: the old scores file goes
    neighbours.write_neighbours(tmp_path, ids[:5], nbrs[:5])
    assert neighbours.read_neighbours(tmp_path).scores is None and not (tmp_path / neighbours.SCORES).exists()


def test_neighbours_for_a_bank_on_disk_round_trip(tmp_path, mesh):
    bank = clustered_bank(5)
    bank = index.MemoryBank.write(tmp_path / 'bank', bank.embeddings, bank.ids, modality=bank.modality,
                                  fingerprint=bank.fingerprint)
    cfg = dataclasses.replace(select.SelectConfig(), candidates=10)
    ids, scores = select.neighbours(bank, bank.embeddings, bank.ids, top_m=2, cfg=cfg, mesh=mesh, query_batch=25)
    assert (ids != bank.ids[:, None]).all() and (ids[:, 0] >= 0).all()
    neighbours.write_neighbours(tmp_path / 'data', bank.ids, ids, scores=scores, select=dataclasses.asdict(cfg),
                                bank_fingerprint=bank.fingerprint, bank_count=bank.count)
    lists = neighbours.read_neighbours(tmp_path / 'data', bank_fingerprint=bank.fingerprint)
    np.testing.assert_array_equal(lists.lookup(bank.ids), ids)
