"""`Vocab.chameleon` as Chameleon's own tokenizer (text ids are BPE ids, image ids from the
``IMGIMG...`` names, images wrapped in ``<racm3:break>`` .. ``<eoss>``), and the decoder's image
state machine on that layout."""

import numpy as np
import pytest

from cm3jax.data import documents
from cm3jax.sample import decode as dec
from cm3jax.text_tokenizer import TextTokenizer, TokenizerTooLargeError
from cm3jax.vocab import Vocab
from tests import chameleon_refs


@pytest.fixture(scope='module')
def full():
    tok = chameleon_refs.tokenizer(65_536, 8192)
    return TextTokenizer(tok), Vocab.chameleon(vocabulary_map=tok.get_vocab())


def test_vocab_is_the_tokenizer(full):
    tok, v = full
    text = 'the cat sat on the mat and a red circle left of a blue square'
    want = tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert max(want) > 60_000  # ids a shifted layout (num_text 57,330) could not hold
    ids = tok.encode_joint(text, v)
    np.testing.assert_array_equal(ids, want)
    assert tok.decode_joint(ids, v) == tok.tokenizer.decode(want) == text
    assert v.is_text(ids).all() and not v.is_image(ids).any()
    vocab_map = tok.tokenizer.get_vocab()
    for code in (0, 7, 4095, 8191):
        assert v.image_ids(code) == vocab_map[chameleon_refs.code_name(code)]
    assert (v.size, v.image_offset, v.num_image_codes) == (65_536, 4, 8192)
    assert (v.bos, v.pad, v.eos, v.break_, v.end_image) == (0, 1, 2, 8197, 8196)
    assert v.mask is None and v.sentinels == () and v.text_is_bpe
    assert Vocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match='no CM3 <mask>'):
        v.require_mask()
    named = Vocab.chameleon(vocabulary_map=vocab_map, cm3_ids=(8198, 8199, 8200))
    assert named.mask == 8198 and named.sentinels == (8199, 8200) and not named.is_text(8199)


def test_older_layouts_keep_their_fingerprints():
    v = Vocab.build(num_text=300, num_image_codes=512)
    assert 'image_end' not in v.to_dict() and 'text_is_bpe' not in v.to_dict() and v.end_image == v.break_
    assert Vocab.chameleon().end_image == 8196  # Chameleon's images end at <eoss> in both forms


def test_tokenizer_of_another_size_is_named(full):
    _, v = full
    small = TextTokenizer(chameleon_refs.tokenizer(65_000, 8192))
    with pytest.raises(TokenizerTooLargeError, match='65000 ids but the vocab it should be has 65536'):
        small.encode_joint('a cat', v)


def test_bad_vocabulary_maps_are_refused():
    vocab_map = chameleon_refs.tokenizer(97, 32, num_text=50).get_vocab()
    with pytest.raises(ValueError, match='no IMGIMG'):
        Vocab.chameleon(vocabulary_map={k: i for k, i in vocab_map.items() if not k.startswith('IMGIMG')})
    gap = dict(vocab_map)
    gap[chameleon_refs.code_name(3)], gap['<eoss>'] = gap['<eoss>'], gap[chameleon_refs.code_name(3)]
    with pytest.raises(ValueError, match='consecutive ids'):
        Vocab.chameleon(vocabulary_map=gap)
    with pytest.raises(ValueError, match="no '<eoss>'"):
        Vocab.chameleon(vocabulary_map={k: i for k, i in vocab_map.items() if k != '<eoss>'})


def test_images_are_wrapped_in_begin_and_end():
    v = Vocab.chameleon(vocabulary_map=chameleon_refs.tokenizer(97, 32, num_text=50).get_vocab())
    text, image = np.array([90, 91]), v.image_ids(np.array([0, 1, 2]))
    got = documents.join([text, image, image, text], [False, True, True, False], v)
    b, e = v.break_, v.end_image
    np.testing.assert_array_equal(got, [90, 91, b, *image, e, b, *image, e, 90, 91])
    cm3leon = Vocab.build(num_text=10, num_image_codes=8)  # unchanged: one <break> between modalities
    t, i = np.array([20, 21]), cm3leon.image_ids(np.array([0, 1]))
    np.testing.assert_array_equal(documents.join([t, i, i, t], [False, True, True, False], cm3leon),
                                  [20, 21, 3, *i, 3, *i, 3, 20, 21])


def test_image_state_of_chameleon_prompts():
    """``... <racm3:break>`` owes a whole image; a prompt ending on a finished image owes its
    ``<eoss>``. (Decoding a whole image span against transformers: tests/test_convert_chameleon.py.)"""
    v = Vocab.chameleon(vocabulary_map=chameleon_refs.tokenizer(97, 32, num_text=50).get_vocab())
    hw = 4
    prompt = np.array([[v.bos, 90, 91, v.break_]], np.int32)
    remaining, pending = dec.initial_image_state(prompt, np.ones_like(prompt), v, hw)
    assert (remaining[0], pending[0]) == (hw, False)
    done = np.concatenate([prompt[0], v.image_ids(np.arange(hw))])[None]
    remaining, pending = dec.initial_image_state(done, np.ones_like(done), v, hw)
    assert (remaining[0], pending[0]) == (0, True)
    closed = np.concatenate([done[0], [v.end_image, v.break_]])[None]  # a second image begins
    remaining, pending = dec.initial_image_state(closed, np.ones_like(closed), v, hw)
    assert (remaining[0], pending[0]) == (hw, False)
