"""The joint vocabulary: layouts, groups, masks, round trips and bad layouts."""

import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax.vocab import Vocab


def test_cm3leon_layout_groups_and_padding():
    v = Vocab.build(num_text=1000, num_image_codes=256, num_sentinels=8)
    assert v.size == 6 + 8 + 1000 + 256 and v.padded_size == 1280 and v.padded_size % 128 == 0
    ids = np.arange(v.size)
    g = v.groups(ids)
    assert g['text'].sum() == 1000 and g['image'].sum() == 256 and g['special'].sum() == 14
    assert not (g['text'] & g['image']).any() and (g['text'] | g['image'] | g['special']).all()
    # The same predicates work on jax arrays (the loss and the sampler use them under jit).
    np.testing.assert_array_equal(np.asarray(v.is_image(jnp.asarray(ids))), g['image'])
    assert v.image_codes(v.image_ids(np.arange(256))).tolist() == list(range(256))
    assert v.describe([v.break_, v.sentinel(2), v.image_offset + 5]) == ['<break>', '<mask:2>', 'img:5']


def test_allowed_masks_for_the_sampler():
    v = Vocab.build(num_text=100, num_image_codes=64)
    image_only = v.allowed('image')
    assert image_only.shape == (v.padded_size,) and image_only.sum() == 64
    text = v.allowed('text', 'special', extra=())
    assert text.sum() == v.size - 64 and not text[v.size:].any()
    assert v.allowed('image', extra=(v.break_,))[v.break_]
    with pytest.raises(ValueError, match='unknown token groups'):
        v.allowed('audio')


def test_chameleon_layout_is_expressible():
    v = Vocab.chameleon()
    assert v.size == 65_536 and v.num_image_codes == 8192 and v.image_offset == 4
    assert v.is_image(4) and v.is_image(8195) and not v.is_image(8196)
    assert v.is_special(v.break_) and v.break_ == 8197 and v.bos == 0 and v.eos == 2
    # text = every id that is neither image nor special; BPE ids map in and out exactly
    assert v.num_text == 65_536 - 8192 - len(v.special_ids)
    bpe = np.arange(v.num_text)
    joint = v.text_ids(bpe)
    assert v.is_text(joint).all() and (v.bpe_ids(joint) == bpe).all()


def test_serialisation_and_fingerprint():
    v = Vocab.build(num_text=300, num_image_codes=512)
    assert Vocab.from_dict(v.to_dict()) == v
    assert v.fingerprint() == Vocab.from_dict(v.to_dict()).fingerprint()
    assert v.fingerprint() != Vocab.build(num_text=300, num_image_codes=1024).fingerprint()


def test_bad_layouts_and_ids_are_refused():
    v = Vocab.build(num_text=10, num_image_codes=8)
    with pytest.raises(ValueError, match='overlap'):
        Vocab(**{**v.to_dict(), 'text_ranges': ((14, 30),), 'sentinels': tuple(v.sentinels)})
    with pytest.raises(ValueError, match='distinct'):
        Vocab(**{**v.to_dict(), 'text_ranges': tuple(v.text_ranges), 'mask': v.eos, 'sentinels': tuple(v.sentinels)})
    with pytest.raises(ValueError, match='larger than vocab.num_text'):
        v.text_ids(np.array([10]))
    with pytest.raises(ValueError, match='sentinel 8 does not exist'):
        v.sentinel(8)
