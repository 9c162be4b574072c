"""CIDEr-D equals pycocoevalcap's `Cider` (its pure-Python CiderScorer) on 60 candidate/reference
sets with ties, repeats and empty candidates, corpus-level and per item, both given the same
pre-tokenised strings; the PTB-style tokeniser is tested on its own."""

import numpy as np
import pytest

from cm3jax.eval import cider

WORDS = 'a an the red blue green circle square man dog riding horse on of left small large two'.split()


def _corpus(seed=0, n=60):
    rng = np.random.default_rng(seed)
    sentence = lambda k: ' '.join(rng.choice(WORDS, k))  # noqa: E731
    cands, refs = {}, {}
    for i in range(n):
        r = [sentence(int(rng.integers(3, 10))) for _ in range(int(rng.integers(1, 6)))]
        kind = i % 6
        if kind == 0:
            c = r[0]                                    # a reference itself
        elif kind == 1:
            c = ''                                      # an empty candidate
        elif kind == 2:
            c = ' '.join([r[0].split()[0]] * 6)         # one word repeated (clipping)
        elif kind == 3:
            c = r[0] + ' ' + r[0]                       # a reference twice (length penalty)
        elif kind == 4:
            r = r[:1] * 3                               # repeated references; a tie with item 5
            c = sentence(5)
        else:
            c = sentence(int(rng.integers(1, 12)))
        cands[i], refs[i] = c, r
    refs[5], cands[5] = list(refs[4]), cands[4]
    return cands, refs


def test_cider_d_equals_pycocoevalcap():
    Cider = pytest.importorskip('pycocoevalcap.cider.cider').Cider
    cands, refs = _corpus()
    want_score, want_items = Cider().compute_score(refs, {i: [c] for i, c in cands.items()})
    score, per_item = cider.cider_d(cands, refs, tokenize=False)
    assert score == pytest.approx(want_score, rel=1e-6, abs=1e-9)
    np.testing.assert_allclose([per_item[i] for i in cands], want_items, rtol=1e-6, atol=1e-9)
    assert per_item[1] == 0.0 and per_item[4] == per_item[5] and per_item[0] > per_item[2]
    assert score > 0.1


def test_ptb_tokenize_drops_punctuation_and_lowercases():
    assert cider.ptb_tokenize('A man, riding (a horse).') == 'a man riding a horse'
    assert cider.ptb_tokenize('The dog\'s ball isn\'t RED!') == "the dog 's ball is n't red"
    assert cider.ptb_tokenize('"Two" cats... on a sofa; one-eyed?') == 'two cats on a sofa one-eyed'
    assert cider.ptb_tokenize('3.5 kg of U.S. rice, 1,000 grains') == '3.5 kg of u.s. rice 1,000 grains'
    assert cider.ptb_tokenize('  ') == ''


def test_tokenising_makes_case_and_punctuation_irrelevant():
    refs = {0: ['A red circle.', 'a red circle'], 1: ['Two dogs!']}
    a, _ = cider.cider_d({0: 'A RED circle!', 1: 'two dogs'}, refs)
    b, _ = cider.cider_d({0: 'a red circle', 1: 'two dogs'}, {k: [cider.ptb_tokenize(r) for r in v]
                                                             for k, v in refs.items()}, tokenize=False)
    assert a == pytest.approx(b)


def test_mismatched_ids_are_refused():
    with pytest.raises(ValueError, match='same ids'):
        cider.cider_d({0: 'a'}, {1: ['a']})
    with pytest.raises(ValueError, match='non-empty list'):
        cider.cider_d({0: 'a'}, {0: 'a'})
