"""VQA accuracy (Antol et al. 2015) with the official evaluation's answer normalisation.

An answer's accuracy against the 10 human answers is ``min(#humans that gave it / 3, 1)``,
averaged over the 10 subsets of 9 humans (leave one out):

    accuracy('2', ['two'] * 3 + ['3'] * 7)   # 0.9: 'two' becomes '2'; 2/3 in the 3 subsets without
                                             # one of them, 1 in the 7 others

Normalisation, as the official script does it: newlines and tabs become spaces and ends are
stripped; then, *only when the humans did not all agree*, both the prediction and every human
answer lose punctuation (kept inside numbers such as '1,000' and '2.5'), are lowercased, have
number words mapped to digits ('two' -> '2'), articles dropped and contractions restored
('dont' -> "don't"). With ``official=False`` normalisation always applies.
"""

from __future__ import annotations

import itertools
import re
from typing import Sequence

NUMBERS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5', 'six': '6',
           'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = {'a', 'an', 'the'}
PUNCT = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!')
_CONTRACTED = (
    "aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've "
    "he's how'd how'll how's isn't it'd it'd've it'll it's let's ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've she's should've shouldn't shouldn't've "
    "somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've").split()
# Spellings that are also ordinary English words are left alone ("its", "well", "were", "lets"); the
# official table has none of them (and its "Im", "Ive", "Id" never match the lowercased words).
_KEEP = {'its', 'ill', 'well', 'were', 'wed', 'hell', 'shell', 'shed', 'id', 'im', 'ive', 'lets'}


def _contractions() -> dict[str, str]:
    """Every spelling of a contraction with some of its apostrophes left out -> the full one."""
    table = {}
    for word in _CONTRACTED:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for k in range(1, len(cuts) + 1):
            for drop in itertools.combinations(cuts, k):
                short = ''.join(ch for i, ch in enumerate(word) if i not in drop)
                if short not in _KEEP:
                    table.setdefault(short, word)
    return table


CONTRACTIONS = _contractions()
_COMMA_IN_NUMBER = re.compile(r'(\d)(,)(\d)')
_PERIOD = re.compile(r'\.(?!\d)')  # the official pattern's look-behind is mistyped: any period not before a digit


def _strip_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        # a mark next to a space (or any comma inside a number) is deleted, else it separates words
        if p + ' ' in text or ' ' + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, '')
        else:
            out = out.replace(p, ' ')
    return _PERIOD.sub('', out)


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return ' '.join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize(answer: str) -> str:
    """The official normalisation of one answer (punctuation, case, numbers, articles, contractions)."""
    return _digits_articles(_strip_punctuation(_clean(answer)))


def _clean(answer: str) -> str:
    return answer.replace('\n', ' ').replace('\t', ' ').strip()


def accuracy(prediction: str, answers: Sequence[str], official: bool = True) -> float:
    """VQA accuracy of one prediction against the humans' answers (10 in VQA v2)."""
    if isinstance(answers, str) or not len(answers):
        raise ValueError('accuracy needs the list of human answers (10 in VQA v2)')
    pred, humans = _clean(prediction), [_clean(a) for a in answers]
    if not official or len(set(humans)) > 1:
        pred, humans = normalize(pred), [normalize(a) for a in humans]
    scores = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: dict, answers: dict, official: bool = True) -> tuple[float, dict]:
    """(mean accuracy, {question id: accuracy}) over ``answers``' questions."""
    missing = sorted(map(str, set(answers) - set(predictions)))[:3]
    if missing:
        raise ValueError(f'no prediction for questions {missing}')
    per = {q: accuracy(predictions[q], answers[q], official) for q in answers}
    return (sum(per.values()) / len(per) if per else float('nan')), per
