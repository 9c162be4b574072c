"""Task mixtures: how often each instruction task is drawn.

    rates = mixture_rates({'edit': 2, 'vqa': 1, 'caption': 1}, min_rate=0.1, max_rate=0.5)
    task_of(index, rates, seed)     # the task of example `index`: a pure function, so resumable

A task's rate is its weight over the sum, clipped into ``[min_rate, max_rate]``, the
up-sampling and down-sampling thresholds: a small task is drawn at least ``min_rate`` of the
time, a large one at most ``max_rate``, and the tasks between the thresholds share what is left
in proportion to their weights. Within a task, each example picks one of the
task's records uniformly (with replacement), so a small task up-sampled past its size repeats.
"""

from __future__ import annotations

import numpy as np


def parse_weights(spec: str) -> dict[str, float]:
    """'edit:2,vqa:1,caption' -> {'edit': 2.0, 'vqa': 1.0, 'caption': 1.0} (a bare name weighs 1)."""
    out = {}
    for part in (p.strip() for p in str(spec).split(',')):
        if not part:
            continue
        name, _, weight = part.partition(':')
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f'task weight {part!r}: give NAME:WEIGHT, e.g. edit:2') from None
    if not out:
        raise ValueError(f'no tasks in {spec!r}: give e.g. "edit:1,vqa:1"')
    return out


def mixture_rates(weights: dict[str, float], min_rate: float = 0.0, max_rate: float = 1.0) -> dict[str, float]:
    """{task: weight} -> {task: rate}: ``clip(c * weight, min_rate, max_rate)``, with the one c
    that makes the rates sum to 1 (module docstring)."""
    names = list(weights)
    w = np.array([weights[n] for n in names], np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f'task weights {weights} must be >= 0 with a positive sum')
    k = len(names)
    if not 0 <= min_rate <= 1.0 / k <= max_rate <= 1:
        raise ValueError(f'need 0 <= min_rate ({min_rate}) <= 1/{k} tasks <= max_rate ({max_rate}) <= 1, or no '
                         f'rates can sum to 1')
    total = lambda c: np.clip(c * w, min_rate, max_rate).sum()  # noqa: E731  (non-decreasing in c)
    lo, hi = 0.0, 1.0 / w[w > 0].min()  # at hi every weighted task reaches max_rate's side of 1/k
    while total(hi) < 1.0 - 1e-12:
        hi *= 2
    for _ in range(200):  # bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < 1.0 else (lo, mid)
    rate = np.clip(hi * w, min_rate, max_rate)
    rate /= rate.sum()  # the last ulp
    return {n: float(r) for n, r in zip(names, rate)}


def task_of(index: int, rates: dict[str, float], seed: int | tuple[int, ...]) -> str:
    """The task of example ``index`` of a mixture: drawn from ``rates`` by its own generator
    (``seed``: an int, or a tuple such as (seed, process index))."""
    names = list(rates)
    p = np.array([rates[n] for n in names])
    u = np.random.default_rng([*(seed if isinstance(seed, tuple) else (seed,)), index, 77]).random()
    return names[min(int(np.searchsorted(np.cumsum(p), u, side='right')), len(names) - 1)]


def draws(rates: dict[str, float], seed: int | tuple[int, ...], n: int) -> dict[str, int]:
    """How many of examples 0..n-1 each task gets (what the rates promise, to check them)."""
    counts = dict.fromkeys(rates, 0)
    for i in range(n):
        counts[task_of(i, rates, seed)] += 1
    return counts
