"""Retrieval-augmented training rows: K retrieved documents, each ending in <eos>, before the
CM3-transformed query, read from neighbour lists next to the shards."""

import numpy as np
import pytest

from cm3jax import text_tokenizer
from cm3jax.data import augment, cm3, documents, neighbours, pipeline, prepare
from cm3jax.vocab import Vocab
from tests.helpers import random_vq_params
from tests.test_pipeline import VQ, WORDS, make_docs

N = 30


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp('ra')
    tok = text_tokenizer.train_bpe([' '.join(WORDS)] * 20, vocab_size=280)
    vocab = Vocab.build(num_text=tok.num_text, num_image_codes=VQ.num_codes)
    params = random_vq_params(VQ, 8)
    prepare.prepare(make_docs(N), out, vocab=vocab, text_tokenizer=tok, vq_params=params, vq_cfg=VQ,
                    cfg=prepare.PrepareConfig(shard_size=8, batch=4, progress=False))
    ids = np.arange(N)
    lists = np.stack([(ids + 1) % N, (ids + 2) % N, (ids + 5) % N, np.full(N, -1)], axis=1)
    neighbours.write_neighbours(out, ids, lists, bank_count=N)
    return out, vocab, lists


def records(out, vocab):
    import grain
    manifest = prepare.read_manifest(out, vocab)
    source = grain.sources.ArrayRecordDataSource([str(out / s['path']) for s in manifest['shards']])
    return [documents.decode_record(source[i])[:2] for i in range(len(source))]


def same_document(tokens, segments, is_image, vocab):
    """tokens are a layout of (segments, is_image) in one of its two orders."""
    return any(np.array_equal(tokens, np.r_[documents.join(s, f, vocab), vocab.eos])
               for s, f in ((segments, is_image), (segments[::-1], is_image[::-1])))


def test_a_sequence_with_two_retrieved_documents_decodes_as_the_paper_lays_it_out(data):
    out, vocab, lists = data
    docs = records(out, vocab)
    hook = augment.RetrievalAugment(out, vocab, augment.RetrievalConfig((2,)))
    p = pipeline.Pipeline(out, vocab, pipeline.PipelineConfig(seq_len=64, batch=2, shuffle=False, query_weight=2.0),
                          augment=hook)
    checked = 0
    for i in range(N):
        tokens, weights = p.example(i)
        eos = np.flatnonzero(tokens == vocab.eos)
        first, second, query = tokens[:eos[0] + 1], tokens[eos[0] + 1:eos[1] + 1], tokens[eos[1] + 1:]
        # two distinct neighbours of document i, best first, laid out whole
        found = [next(j for j in lists[i] if j >= 0 and same_document(part, *docs[j], vocab)) for part in (first, second)]
        assert found[0] != found[1] and list(lists[i]).index(found[0]) < list(lists[i]).index(found[1])
        # then the query, CM3-transformed: inverting it gives a layout of document i
        assert same_document(cm3.invert(query, vocab), *docs[i], vocab)
        checked += np.isin(query, vocab.sentinels).any()
        # retrieved tokens weigh 1, the query's 2 (0 on its sentinels)
        n = len(first) + len(second)
        np.testing.assert_array_equal(weights[:n], 1.0)
        assert set(np.unique(weights[n:])) <= {0.0, 2.0} and (weights[n:][np.isin(query, vocab.sentinels)] == 0).all()
    assert checked > N // 3  # CM3 masked spans in many queries
    assert hook.counts['retrieved'] == 2 * N and hook.counts['corrupt_neighbours'] == 0


def test_retrieved_weight_zero_leaves_the_loss_on_the_query(data):
    """data.retrieved_weight=0 (the ablation's query-document loss): the same tokens, the
    retrieved part weighing nothing; a negative weight is refused."""
    out, vocab, _ = data
    make = lambda **w: pipeline.Pipeline(out, vocab, pipeline.PipelineConfig(seq_len=64, batch=2, shuffle=False, **w),
                                         augment=augment.RetrievalAugment(out, vocab, augment.RetrievalConfig((2,))))
    full, query_only = make(), make(retrieved_weight=0.0)
    for i in range(5):
        (t1, w1), (t2, w2) = full.example(i), query_only.example(i)
        np.testing.assert_array_equal(t1, t2)
        n = np.flatnonzero(t1 == vocab.eos)[1] + 1  # the two retrieved documents
        assert (w2[:n] == 0).all() and (w1[:n] == 1).all()
        np.testing.assert_array_equal(w2[n:], w1[n:])
    with pytest.raises(ValueError, match='retrieved_weight=-1'):
        pipeline.PipelineConfig(seq_len=64, batch=2, retrieved_weight=-1.0)


def test_k_is_drawn_from_the_counts_and_batches_stay_deterministic(data):
    out, vocab, _ = data
    config = pipeline.PipelineConfig(seq_len=96, batch=2, seed=1)
    make = lambda: pipeline.Pipeline(out, vocab, config, augment=augment.RetrievalAugment(
        out, vocab, augment.RetrievalConfig((0, 1, 2))))
    p = make()
    ks = {int((p.example(i)[0] == vocab.eos).sum()) - 1 for i in range(40)}  # <eos> per document; CM3 keeps one
    assert ks == {0, 1, 2}
    a, b = make(), make()
    for _ in range(4):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert 'retrieval:' in a.report()


def test_bad_neighbour_lists_are_refused_or_skipped(data, tmp_path):
    out, vocab, lists = data
    neighbours.write_neighbours(tmp_path, np.arange(N), lists, bank_count=N + 1)
    with pytest.raises(ValueError, match='build-index'):
        augment.RetrievalAugment(out, vocab, neighbours_dir=tmp_path)
    with pytest.raises(neighbours.NeighbourFormatError, match='build-index'):
        augment.RetrievalAugment(out, vocab, neighbours_dir=tmp_path / 'none')
    with pytest.raises(ValueError, match='counts'):
        augment.RetrievalConfig((-1,))
    # a document without neighbours trains alone; ids past the lists have none
    empty = tmp_path / 'empty'
    neighbours.write_neighbours(empty, np.arange(N), np.full((N, 2), -1), bank_count=N)
    hook = augment.RetrievalAugment(out, vocab, neighbours_dir=empty)
    assert hook(3, np.random.default_rng(0)) == [] and hook.counts['no_neighbours'] == 1
