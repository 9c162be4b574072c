"""prepare -> ArrayRecord shards -> grain pipeline: determinism, exact resume, packing, hosts."""

import json

import numpy as np
import pytest

from cm3jax import text_tokenizer
from cm3jax.data import cm3, documents, pipeline, prepare
from cm3jax.vocab import Vocab
from cm3jax.vq import model as vq
from tests.helpers import random_vq_params

VQ = vq.VQConfig(resolution=8, ch=32, ch_mult=(1, 2), z_channels=8, embed_dim=4, num_codes=16)
WORDS = ['red', 'green', 'blue', 'circle', 'square', 'left', 'of', 'a', 'the', 'above']


def make_docs(n, seed=0, bad=()):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        caption = ' '.join(rng.choice(WORDS, int(rng.integers(2, 6))))
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        segments = [caption, image] if i % 3 else [caption]  # some text-only documents
        docs.append(documents.Document(segments, id=f'doc{i}'))
    return docs


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp('prepared')
    tok = text_tokenizer.train_bpe([' '.join(WORDS)] * 20, vocab_size=280)
    vocab = Vocab.build(num_text=tok.num_text, num_image_codes=VQ.num_codes)
    params = random_vq_params(VQ, 8)  # from numpy: compiling VQGAN.init costs half a minute
    manifest = prepare.prepare(make_docs(40), out, vocab=vocab, text_tokenizer=tok, vq_params=params, vq_cfg=VQ,
                               cfg=prepare.PrepareConfig(shard_size=10, batch=4, progress=False))
    return out, vocab, tok, params, manifest


def cfg(**kw):
    return pipeline.PipelineConfig(**{'seq_len': 48, 'batch': 4, 'seed': 3, **kw})


def batches(it, n):
    return [next(it) for _ in range(n)]


def test_prepare_writes_shards_and_a_manifest(prepared):
    out, vocab, tok, params, manifest = prepared
    assert manifest['documents'] == 40 and len(manifest['shards']) == 4
    assert manifest['vocab_fingerprint'] == vocab.fingerprint() and manifest['text_tokenizer'] == tok.fingerprint()
    # 26 of 40 documents hold an 8x8 image -> a 4x4 grid of codes each
    assert manifest['image_tokens'] == 26 * 16 and manifest['image_shape'] == [4, 4]
    # A record holds the document's ids: the caption through the BPE, the image through the VQ
    import grain
    record = grain.sources.ArrayRecordDataSource([str(out / 'shard-00000.array_record')])[1]
    segments, is_image, header = documents.decode_record(record)
    doc = make_docs(40)[1]
    assert header['id'] == 'doc1' and is_image == [False, True]
    assert segments[0].tolist() == tok.encode_joint(doc.segments[0], vocab).tolist()
    codes = vq.encode(params, doc.segments[1][None], VQ)
    assert segments[1].tolist() == vocab.image_ids(np.asarray(codes).reshape(-1)).tolist()


def test_same_seed_same_batches_and_packing_is_consistent(prepared):
    out, vocab, *_ = prepared
    a, b = batches(pipeline.Pipeline(out, vocab, cfg()), 6), batches(pipeline.Pipeline(out, vocab, cfg()), 6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = batches(pipeline.Pipeline(out, vocab, cfg(seed=4)), 1)[0]
    assert not np.array_equal(other['inputs'], a[0]['inputs'])
    for batch in a:
        seg, pos, w = batch['segment_ids'], batch['positions'], batch['weights']
        for row in range(seg.shape[0]):
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[row]])) != 0)
            for s in starts:  # positions restart at 0 where a segment starts and count up
                stop = s + np.argmax(np.append(seg[row, s:] != seg[row, s], True))
                if seg[row, s] > 0:
                    np.testing.assert_array_equal(pos[row, s:stop], np.arange(stop - s) + (pos[row, s]))
                    assert pos[row, s] == 0 or s == 0
            # no loss across a document boundary or on padding; sentinel targets weigh 0
            assert (w[row][seg[row] == 0] == 0).all()
            assert (w[row][np.isin(batch['targets'][row], vocab.sentinels)] == 0).all()
        np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
    assert all(b['inputs'].shape == (4, 48) for b in a)


def test_examples_are_the_cm3_transform_of_laid_out_documents(prepared):
    out, vocab, *_ = prepared
    p = pipeline.Pipeline(out, vocab, cfg(shuffle=False))
    tokens, weights = p.example(1)
    original = cm3.invert(tokens, vocab)
    assert original[-1] == vocab.eos and (original == vocab.break_).sum() == 1  # caption <break> image, or reverse
    assert (weights == 0).sum() == 2 * np.isin(tokens, vocab.sentinels).sum() // 2


def test_resume_mid_epoch_continues_with_exactly_the_next_batch(prepared):
    out, vocab, *_ = prepared
    full = batches(pipeline.Pipeline(out, vocab, cfg()), 30)  # 40 documents: crosses an epoch
    first = pipeline.Pipeline(out, vocab, cfg())
    batches(first, 17)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpointer stores it
    resumed = pipeline.Pipeline(out, vocab, cfg())
    resumed.set_state(state)
    for want, got in zip(full[17:], batches(resumed, 13)):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_two_hosts_read_disjoint_shards(prepared):
    out, vocab, *_ = prepared
    hosts = [pipeline.Pipeline(out, vocab, cfg(shuffle=False), process_index=i, process_count=2) for i in range(2)]
    assert [p.rows for p in hosts] == [2, 2]
    assert not set(hosts[0].shards) & set(hosts[1].shards)
    assert sorted(set(hosts[0].shards) | set(hosts[1].shards)) == sorted(out.glob('shard-*.array_record'))
    assert hosts[0].num_documents + hosts[1].num_documents == 40


def test_prepare_resumes_after_an_interruption(prepared, tmp_path):
    out, vocab, tok, params, manifest = prepared

    class Interrupted:
        def __iter__(self):
            for i, d in enumerate(make_docs(40)):
                if i == 25:
                    raise KeyboardInterrupt
                yield d

    kw = dict(vocab=vocab, text_tokenizer=tok, vq_params=params, vq_cfg=VQ,
              cfg=prepare.PrepareConfig(shard_size=10, batch=4, progress=False))
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(Interrupted(), tmp_path, **kw)
    assert not (tmp_path / 'manifest.json').exists() and len(list(tmp_path.glob('shard-*.array_record'))) == 2
    with pytest.raises(FileNotFoundError, match='partial run'):
        prepare.read_manifest(tmp_path)
    again = prepare.prepare(make_docs(40), tmp_path, **kw)
    assert again['shards'] == manifest['shards']
    for s in manifest['shards']:
        assert (tmp_path / s['path']).read_bytes() == (out / s['path']).read_bytes()


def test_mismatches_are_refused(prepared, tmp_path):
    out, vocab, tok, params, _ = prepared
    other = Vocab.build(num_text=tok.num_text + 1, num_image_codes=VQ.num_codes)
    with pytest.raises(ValueError, match='prepared for another vocab'):
        pipeline.Pipeline(out, other, cfg())
    with pytest.raises(ValueError, match='16 codes but vocab.num_image_codes is 32'):
        prepare.prepare(make_docs(2), tmp_path, vocab=Vocab.build(tok.num_text, 32), text_tokenizer=tok,
                        vq_params=params, vq_cfg=VQ)
    empty = prepare.prepare([documents.Document([]), *make_docs(2)], tmp_path / 'e', vocab=vocab, text_tokenizer=tok,
                            vq_params=params, vq_cfg=VQ, cfg=prepare.PrepareConfig(progress=False))
    assert empty['documents'] == 2 and empty['empty_documents_dropped'] == 1
    big = [documents.Document(['a red circle', np.zeros((16, 16, 3), np.uint8)])]
    with pytest.raises(ValueError, match='resize'):
        prepare.prepare(big, tmp_path / 'x', vocab=vocab, text_tokenizer=tok, vq_params=params, vq_cfg=VQ)
    with pytest.raises(ValueError, match='shards, fewer than the 8 processes'):
        pipeline.Pipeline(out, vocab, cfg(batch=8), process_index=0, process_count=8)


def test_corrupt_records_are_skipped_and_counted(prepared, tmp_path):
    out, vocab, tok, params, manifest = prepared
    from array_record.python.array_record_module import ArrayRecordWriter
    import shutil
    for s in manifest['shards']:
        shutil.copy(out / s['path'], tmp_path / s['path'])
    (tmp_path / 'manifest.json').write_text((out / 'manifest.json').read_text())
    w = ArrayRecordWriter(str(tmp_path / 'shard-00000.array_record'), 'group_size:1')
    w.write(b'{"broken": \n')
    w.write(b'{"id": "x", "lengths": [9], "image": [false]}\n' + b'\x00' * 8)
    w.close()
    p = pipeline.Pipeline(tmp_path, vocab, cfg(shuffle=False))
    batches(p, 12)
    assert p.counts['skipped'] >= 2 and 'corrupt records skipped' in p.report()
