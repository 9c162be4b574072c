"""Byte-level BPE: exact round trips, determinism, files, and ids inside the joint vocab."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cm3jax.text_tokenizer import TextTokenizer, TokenizerTooLargeError, train_bpe
from cm3jax.vocab import Vocab

CORPUS = ['a red circle left of a blue square', 'a green triangle above a red circle',
          'two blue squares', 'what colour is the square?', 'a handwritten digit seven'] * 10
ODD = ['', ' ', '  a  b\r\n\t', 'héllo wörld 你好 🎉', '\x00\x01\x7f', 'ZZZ never seen', 'a' * 300,
       'ǅ\u200b\ufeff\U0010ffff', "it's   'quoted'  "]


@pytest.fixture(scope='module')
def tok():
    return train_bpe(CORPUS, vocab_size=300)


def test_train_learns_merges_and_has_no_specials(tok):
    assert 256 < tok.num_text <= 300
    assert tok.tokenizer.get_added_tokens_decoder() == {}
    assert len(tok.encode('a red circle')) < len('a red circle')  # merges help on the corpus
    assert tok.encode('x').dtype == np.int32


@pytest.mark.parametrize('text', ODD)
def test_round_trip_examples(tok, text):
    ids = tok.encode(text)
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < tok.num_text
    assert tok.decode(ids) == text


def test_round_trip_property(tok):
    hypothesis = pytest.importorskip('hypothesis')
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @hypothesis.given(st.text(alphabet=st.characters(codec='utf-8'), max_size=64))
    def check(s):
        assert tok.decode(tok.encode(s)) == s

    check()


def test_tiny_corpus_and_bytes_only():
    t = train_bpe(['ab'], vocab_size=256)  # the byte alphabet only: no merges fit
    assert t.num_text == 256
    assert t.decode(t.encode('日本 ab')) == '日本 ab'
    t = train_bpe(['ab ab ab'], vocab_size=1000)  # runs out of pairs long before 1000
    assert 256 < t.num_text < 1000
    with pytest.raises(ValueError, match='at least 256'):
        train_bpe(['ab'], vocab_size=200)


def test_deterministic(tok):
    again = train_bpe(iter(CORPUS), vocab_size=300)
    assert again.fingerprint() == tok.fingerprint()
    assert len(tok.fingerprint()) == 16
    other = train_bpe(CORPUS + ['zebra zebra zebra'] * 5, vocab_size=300)
    assert other.fingerprint() != tok.fingerprint()


def test_deterministic_across_processes(tok):
    # Rust hash maps are seeded per process: the trained BPE must not depend on that.
    code = ('from cm3jax.text_tokenizer import train_bpe; from tests.test_text_tokenizer import CORPUS; '
            'print(train_bpe(CORPUS, vocab_size=300).fingerprint())')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tok.fingerprint()


def test_save_load(tok, tmp_path):
    path = tmp_path / 'sub' / 'tokenizer.json'
    tok.save(path)
    back = TextTokenizer.load(path)
    assert back.fingerprint() == tok.fingerprint() and back.num_text == tok.num_text
    for s in ODD:
        np.testing.assert_array_equal(back.encode(s), tok.encode(s))
    with pytest.raises(FileNotFoundError, match='no tokenizer file'):
        TextTokenizer.load(tmp_path / 'missing.json')
    bad = tmp_path / 'bad.json'
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match='not a HuggingFace tokenizer'):
        TextTokenizer.load(bad)


def test_batch(tok):
    texts = ['a red circle', '', 'héllo']
    for got, s in zip(tok.encode_batch(texts), texts):
        np.testing.assert_array_equal(got, tok.encode(s))


@pytest.mark.parametrize('vocab', [Vocab.build(num_text=300, num_image_codes=64),
                                   Vocab.chameleon(num_image_codes=64)], ids=['cm3leon', 'chameleon'])
def test_joint_ids(tok, vocab):
    text = 'a red circle left of a blue square 🎉'
    ids = tok.encode_joint(text, vocab)
    assert ids.dtype == np.int32 and len(ids) == len(tok.encode(text))
    assert vocab.is_text(ids).all() and not vocab.is_special(ids).any() and not vocab.is_image(ids).any()
    assert tok.decode_joint(ids, vocab) == text
    batch = tok.encode_joint_batch([text, 'two'], vocab)
    np.testing.assert_array_equal(batch[0], ids)
    # non-text ids are refused by default, dropped on request
    mixed = np.concatenate([[vocab.bos], ids, [vocab.image_ids(3), vocab.eos]])
    with pytest.raises(ValueError, match='non-text ids'):
        tok.decode_joint(mixed, vocab)
    assert tok.decode_joint(mixed, vocab, non_text='drop') == text


def test_too_large_refused(tok):
    small = Vocab.build(num_text=tok.num_text - 1, num_image_codes=64)
    with pytest.raises(TokenizerTooLargeError, match='vocab.num_text'):
        tok.encode_joint('a', small)
    with pytest.raises(TokenizerTooLargeError):
        tok.decode_joint(np.array([], np.int32), small)
    # a vocab with room to spare works; its extra text ids are not the tokenizer's
    big = Vocab.build(num_text=tok.num_text + 10, num_image_codes=64)
    assert tok.decode_joint(tok.encode_joint('ok', big), big) == 'ok'
    with pytest.raises(ValueError, match='BPE ids must lie'):
        tok.decode_joint(big.text_ids([tok.num_text + 5]), big)
