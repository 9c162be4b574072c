"""The CM3 transform and document layout: property tests (hypothesis) and the span-count law."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cm3jax.data import cm3, documents
from cm3jax.vocab import Vocab

VOCAB = Vocab.build(num_text=50, num_image_codes=30, num_sentinels=8)


@st.composite
def docs(draw):
    """Random documents: text and image segments joined by <break>, ending in <eos>."""
    n = draw(st.integers(1, 4))
    segments, is_image = [], []
    for k in range(n):
        image = draw(st.booleans()) if k == 0 else not is_image[-1]
        length = draw(st.integers(1, 12))
        lo, hi = (VOCAB.image_offset, VOCAB.image_offset + VOCAB.num_image_codes) if image else VOCAB.text_ranges[0]
        segments.append(np.array(draw(st.lists(st.integers(lo, hi - 1), min_size=length, max_size=length)), np.int32))
        is_image.append(image)
    return documents.layout(segments, is_image, VOCAB, np.random.default_rng(0), documents.LayoutConfig(text_first=0.5))


configs = st.builds(cm3.CM3Config, rate=st.floats(0.0, 4.0), min_spans=st.integers(0, 2),
                    max_spans=st.integers(2, 8), end_of_span=st.booleans())


@settings(max_examples=300, deadline=None)
@given(doc=docs(), cfg=configs, seed=st.integers(0, 2**31))
def test_cm3_properties(doc, cfg, seed):
    out, weights = cm3.transform(doc, VOCAB, np.random.default_rng(seed), cfg)
    in_place = np.flatnonzero(np.isin(out, VOCAB.sentinels))
    n = len(in_place) // 2
    # Invertible: the original comes back.
    np.testing.assert_array_equal(cm3.invert(out, VOCAB, cfg.end_of_span), doc)
    # Length grows by exactly the added sentinels (and end-of-span markers).
    assert len(out) == len(doc) + n * (2 + cfg.end_of_span)
    # Sentinels weigh 0, everything else 1.
    np.testing.assert_array_equal(weights == 0, np.isin(out, VOCAB.sentinels))
    # Enumerated in order, each twice; the document still ends in <eos>.
    assert out[in_place[:n]].tolist() == list(VOCAB.sentinels[:n]) == out[in_place[n:]].tolist()
    assert out[-1] == VOCAB.eos
    # No span crosses <break> or holds a special token: spans hold one modality.
    for i, j in cm3.sample_spans(doc, VOCAB, np.random.default_rng(seed), cfg):
        span = doc[i:j]
        assert not VOCAB.is_special(span).any()
        assert VOCAB.is_image(span).all() or VOCAB.is_text(span).all()
    # The number of <break>s is unchanged.
    assert (out == VOCAB.break_).sum() == (doc == VOCAB.break_).sum()


def test_no_spans_is_plain_causal():
    doc = documents.layout([np.arange(14, 24)], [False], VOCAB, np.random.default_rng(0))
    out, weights = cm3.transform(doc, VOCAB, np.random.default_rng(0), cm3.CM3Config(rate=0.0))
    np.testing.assert_array_equal(out, doc)
    assert weights.min() == 1.0


def test_span_count_follows_the_clamped_poisson_law():
    """On long documents (room for every span), n ~ Poisson(1) clamped to [0, 4]."""
    cfg = cm3.CM3Config(rate=1.0, min_spans=0, max_spans=4)
    doc = np.concatenate([np.arange(14, 64), [VOCAB.break_], VOCAB.image_offset + np.arange(30), [VOCAB.eos]])
    rng = np.random.default_rng(7)
    draws = 4000
    counts = np.bincount([len(cm3.sample_spans(doc, VOCAB, rng, cfg)) for _ in range(draws)], minlength=5)
    pmf = np.array([math.exp(-1) / math.factorial(k) for k in range(4)])
    pmf = np.append(pmf, 1 - pmf.sum())
    # 4 standard errors of a binomial proportion at 4,000 draws
    np.testing.assert_array_less(np.abs(counts / draws - pmf), 4 * np.sqrt(pmf * (1 - pmf) / draws) + 1e-3)


def test_the_papers_example_shape():
    """'Image of a chameleon: [image]' -> 'Image of <mask:0>: [image] <mask:0> a chameleon'
    is one of the outputs: a text span moved to the end, the image intact."""
    text, image = np.arange(14, 19), VOCAB.image_offset + np.arange(4)
    doc = documents.layout([text, image], [False, True], VOCAB, np.random.default_rng(0),
                           documents.LayoutConfig(text_first=1.0))
    seen = set()
    for seed in range(200):
        out, _ = cm3.transform(doc, VOCAB, np.random.default_rng(seed), cm3.CM3Config(rate=1, min_spans=1, max_spans=1))
        s = VOCAB.sentinel(0)
        body = out[:np.flatnonzero(out == s)[1]]
        seen.add('image' if VOCAB.is_image(out[np.flatnonzero(out == s)[1] + 1]) else 'text')
        assert (body == VOCAB.break_).sum() == 1
    assert seen == {'text', 'image'}  # spans fall in either modality


def test_layout_orders_breaks_and_caption_dropout():
    text, image = np.arange(14, 17).astype(np.int32), (VOCAB.image_offset + np.arange(4)).astype(np.int32)
    t2i = documents.layout([image, text], [True, False], VOCAB, np.random.default_rng(0),
                           documents.LayoutConfig(text_first=1.0))
    assert t2i.tolist() == [*text, VOCAB.break_, *image, VOCAB.eos]
    i2t = documents.layout([text, image], [False, True], VOCAB, np.random.default_rng(0),
                           documents.LayoutConfig(text_first=0.0))
    assert i2t.tolist() == [*image, VOCAB.break_, *text, VOCAB.eos]
    dropped = documents.layout([text, image], [False, True], VOCAB, np.random.default_rng(0),
                               documents.LayoutConfig(text_first=1.0, caption_dropout=1.0))
    assert dropped.tolist() == [VOCAB.mask, VOCAB.break_, *image, VOCAB.eos]
    rng = np.random.default_rng(1)
    orders = [documents.layout([text, image], [False, True], VOCAB, rng)[0] == text[0] for _ in range(2000)]
    assert abs(np.mean(orders) - 0.5) < 0.05
    with pytest.raises(ValueError, match='caption_dropout'):
        documents.LayoutConfig(caption_dropout=1.5)
    # a <break> wherever an image starts or ends, also between two images; text runs join as they are
    joined = documents.join([text, image, image, text, text], [False, True, True, False, False], VOCAB)
    assert joined.tolist() == [*text, VOCAB.break_, *image, VOCAB.break_, *image, VOCAB.break_, *text, *text]


def test_a_dropped_captions_mask_weighs_nothing():
    """Caption dropout leaves `<mask>` where the caption was: the unconditional stream's input,
    never a target, with or without CM3 spans elsewhere in the document."""
    text, image = np.arange(14, 20).astype(np.int32), (VOCAB.image_offset + np.arange(9)).astype(np.int32)
    for order in (1.0, 0.0):  # caption-first and image-first
        dropped = documents.layout([text, image], [False, True], VOCAB, np.random.default_rng(0),
                                   documents.LayoutConfig(text_first=order, caption_dropout=1.0))
        for seed in range(20):
            out, weights = cm3.transform(dropped, VOCAB, np.random.default_rng(seed), cm3.CM3Config(rate=2.0))
            assert (out == VOCAB.mask).sum() == 1 and weights[out == VOCAB.mask].tolist() == [0.0]
            assert (weights[~np.isin(out, (*VOCAB.sentinels, VOCAB.mask))] == 1).all()


def test_records_round_trip_and_corruption_is_detected():
    segments = [np.arange(14, 20, dtype=np.int32), VOCAB.image_offset + np.arange(9, dtype=np.int32)]
    record = documents.encode_record(segments, [False, True], 'doc-1', image_shape=(3, 3))
    back, is_image, header = documents.decode_record(record)
    assert [b.tolist() for b in back] == [s.tolist() for s in segments] and is_image == [False, True]
    assert header['id'] == 'doc-1' and header['image_shape'] == [3, 3]
    with pytest.raises(ValueError, match='corrupt'):
        documents.decode_record(record[:-3])
    with pytest.raises(ValueError, match='corrupt'):
        documents.decode_record(b'not json\n')
