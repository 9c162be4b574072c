"""VQA accuracy: min(#humans / 3, 1) over the 10 leave-one-out subsets, with the official
normalisation (applied only when the humans disagree), on hand-made cases."""

import pytest

from cm3jax.eval import vqa


def test_the_leave_one_out_formula():
    assert vqa.accuracy('yes', ['yes'] * 10) == 1.0
    assert vqa.accuracy('no', ['yes'] * 10) == 0.0
    # 3 humans said it: subsets without one of them hold 2 (2/3), the 7 others hold 3 (1)
    assert vqa.accuracy('red', ['red'] * 3 + ['blue'] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa.accuracy('red', ['red'] * 2 + ['blue'] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa.accuracy('red', ['red'] + ['blue'] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa.accuracy('red', ['red'] * 4 + ['blue'] * 6) == 1.0


def test_normalisation():
    assert vqa.normalize('Two') == '2'
    assert vqa.normalize('the dog') == 'dog'
    assert vqa.normalize('dont know') == "don't know"
    assert vqa.normalize('yes.') == 'yes'
    assert vqa.normalize('1,000') == '1000'
    assert vqa.normalize('3.5') == '3.5'
    assert vqa.normalize('black/white') == 'black white'
    assert vqa.normalize('red, white') == 'red white'
    assert vqa.normalize('its') == 'its'  # an English word, not a missing apostrophe
    # 'two' -> '2' among humans who disagree: 3 match
    assert vqa.accuracy('2', ['two'] * 3 + ['3'] * 7) == pytest.approx(0.9)
    assert vqa.accuracy('A Dog', ['dog', 'the dog', 'dogs'] + ['cat'] * 7) == pytest.approx(0.6)


def test_unanimous_humans_skip_normalisation_as_the_official_script_does():
    assert vqa.accuracy('Yes', ['yes'] * 10) == 0.0
    assert vqa.accuracy('Yes', ['yes'] * 10, official=False) == 1.0
    assert vqa.accuracy(' yes\n', ['yes'] * 10) == 1.0  # whitespace is always cleaned


def test_corpus_accuracy_and_refusals():
    score, per = vqa.vqa_accuracy({1: 'yes', 2: '2'}, {1: ['yes'] * 10, 2: ['two'] * 3 + ['3'] * 7})
    assert per == {1: 1.0, 2: pytest.approx(0.9)} and score == pytest.approx(0.95)
    with pytest.raises(ValueError, match='no prediction'):
        vqa.vqa_accuracy({}, {1: ['yes'] * 10})
    with pytest.raises(ValueError, match='list of human answers'):
        vqa.accuracy('yes', 'yes')
