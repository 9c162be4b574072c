"""CIDEr-D (Vedantam et al. 2015, as the MS-COCO caption server computes it) and a PTB-style
tokeniser in Python.

    score, per_item = cider_d({1: 'a red circle'}, {1: ['a red circle', 'one red circle']})

Each caption becomes counts of its 1- to 4-grams, weighted by TF-IDF: term frequency times
``log(N) - log(max(1, df))``, where N is the number of items and df the number of items whose
references contain the n-gram (document frequencies come from the references only). For each
n, the candidate's and each reference's vectors are compared by a clipped cosine: the
numerator sums ``min(cand, ref) * ref`` over n-grams (a candidate cannot gain by repeating an
n-gram), over the product of the two full norms. The similarity is multiplied by the Gaussian
length penalty ``exp(-delta^2 / (2 * 6^2))``, averaged over n and over references, and scaled
by 10. As in the reference implementation, ``delta`` is the difference of the two captions'
bigram counts (one less than their word counts, for captions of at least one word).

Candidates and references are tokenised by `ptb_tokenize` unless ``tokenize=False`` (then they
are split on spaces as given).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Hashable, Mapping, Sequence

N = 4
SIGMA = 6.0

# Tokens the COCO caption tools drop after PTB tokenisation (quotes, brackets, punctuation).
PUNCTUATION = {"''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!', ',', ':', '-', '--', '...',
               ';'}
_BRACKETS = {'(': '-LRB-', ')': '-RRB-', '{': '-LCB-', '}': '-RCB-', '[': '-LSB-', ']': '-RSB-'}
# PTB splits clitics off their word: "don't" -> "do n't", "it's" -> "it 's", "we'll" -> "we 'll".
_CLITIC = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# Abbreviations ("u.s.") and numbers ("1,000", "3.5") stay whole, as PTB keeps them.
_TOKEN = re.compile(r"\.\.\.|--|(?:[A-Za-z]\.){2,}|\d+(?:[.,]\d+)+|[A-Za-z0-9]+(?:[.'&/-][A-Za-z0-9]+)*'?|``|''|\S")


def ptb_tokenize(text: str) -> str:
    """A caption -> its lowercased PTB tokens joined by spaces, punctuation dropped (what the
    COCO tools feed CIDEr): ``'A man, riding (a horse).'`` -> ``'a man riding a horse'``."""
    tokens = []
    for tok in _TOKEN.findall(text.replace('\n', ' ').replace('"', " '' ")):
        tok = _BRACKETS.get(tok, tok)
        m = _CLITIC.match(tok) if "'" in tok else None
        if m:
            tokens += [m[1], m[2]]
        elif tok.endswith("'") and len(tok) > 1:  # a plural possessive: "dogs'" -> "dogs '"
            tokens += [tok[:-1], "'"]
        else:
            tokens.append(tok)
    return ' '.join(t.lower() for t in tokens if t not in PUNCTUATION)


def _ngrams(text: str) -> Counter:
    words = text.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, N + 1) for i in range(len(words) - k + 1))


def _vector(counts: Counter, df: Counter, log_items: float):
    """TF-IDF per n (a dict per n), their norms, and the bigram count (the length the penalty uses)."""
    vec = [dict() for _ in range(N)]
    norm = [0.0] * N
    for gram, tf in counts.items():
        w = tf * (log_items - math.log(max(1.0, df[gram])))
        vec[len(gram) - 1][gram] = w
        norm[len(gram) - 1] += w * w
    bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, [math.sqrt(x) for x in norm], bigrams


def _similarity(cand, ref) -> float:
    (cv, cn, cl), (rv, rn, rl) = cand, ref
    penalty = math.exp(-((cl - rl) ** 2) / (2 * SIGMA ** 2))
    total = 0.0
    for n in range(N):
        dot = sum(min(w, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, w in cv[n].items())
        if cn[n] != 0 and rn[n] != 0:
            dot /= cn[n] * rn[n]
        total += dot * penalty
    return total / N


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
            tokenize: bool = True) -> tuple[float, dict]:
    """(corpus CIDEr-D, {id: CIDEr-D of that item}). Both maps must have the same ids; every
    item needs at least one reference. The corpus score is the mean over items."""
    if set(candidates) != set(references):
        extra = sorted(map(str, set(candidates) ^ set(references)))[:3]
        raise ValueError(f'candidates and references must have the same ids; these are in only one: {extra}')
    if not candidates:
        raise ValueError('cider_d needs at least one item')
    ids = list(candidates)
    prep = ptb_tokenize if tokenize else (lambda s: s)
    cand = {i: _ngrams(prep(candidates[i])) for i in ids}
    refs = {}
    for i in ids:
        if isinstance(references[i], str) or not len(references[i]):
            raise ValueError(f'item {i!r}: references must be a non-empty list of strings')
        refs[i] = [_ngrams(prep(r)) for r in references[i]]
    df = Counter(g for i in ids for g in set().union(*refs[i]))
    log_items = math.log(float(len(ids)))
    per_item = {}
    for i in ids:
        c = _vector(cand[i], df, log_items)
        per_item[i] = 10.0 * sum(_similarity(c, _vector(r, df, log_items)) for r in refs[i]) / len(refs[i])
    return sum(per_item.values()) / len(ids), per_item
