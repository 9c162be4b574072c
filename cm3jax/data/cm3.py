"""The CM3 causal-masked objective (docs/paper.md, "The CM3 objective"), as a pure numpy function of (tokens, rng).

    x0 x1 x2 <break> img ... <eos>
  ->  x0 <mask:0> x2 <break> img ... <mask:0> x1 <eoss> <eos>

n ~ Poisson(rate) spans, clamped to [min_spans, max_spans], each a uniform non-empty run of
tokens that never crosses ``<break>`` (CM3leon's rule: the model must not learn to start an
image mid-way) nor touches any other special token. Each span is replaced in place by the
enumerated sentinel ``<mask:i>`` (in order of position) and moved, after ``<mask:i>``, to the
end of the document, before its ``<eos>``, closed by ``<eoss>`` when ``end_of_span``.

Weights are per token, for predicting that token: 0 for every sentinel (their place is
random, so unpredictable) and for ``<mask>``, the placeholder of a dropped caption (an input
that the unconditional stream is conditioned on, never something to generate), 1 elsewhere; the
pipeline shifts them with the targets. n = 0 leaves the document as it is (a plain causal
example, as Meta's metaseq allows).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class CM3Config:
    rate: float = 1.0        # Poisson lambda of the span count
    min_spans: int = 0       # CM3's paper clamps to [1, 16]; metaseq allows 0 (plain causal)
    max_spans: int = 16
    end_of_span: bool = True  # close each moved span with <eoss> (metaseq)
    max_tries: int = 64      # rejection sampling of overlapping spans, per span

    def __post_init__(self):
        if self.rate < 0:
            raise ValueError(f'data.cm3.rate={self.rate} must be >= 0')
        if not 0 <= self.min_spans <= self.max_spans:
            raise ValueError(f'need 0 <= data.cm3.min_spans ({self.min_spans}) <= data.cm3.max_spans '
                             f'({self.max_spans})')


def maskable_runs(tokens: np.ndarray, vocab, blocked: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Maximal [start, stop) runs of non-special tokens, outside ``blocked`` (Bool[T]): the
    places a span may lie."""
    ok = ~np.asarray(vocab.is_special(tokens))
    if blocked is not None:
        ok &= ~np.asarray(blocked, bool)
    edges = np.diff(np.concatenate([[0], ok.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def sample_spans(tokens: np.ndarray, vocab, rng: np.random.Generator, cfg: CM3Config,
                 forced: tuple[tuple[int, int], ...] = ()) -> list[tuple[int, int]]:
    """Disjoint, non-empty [start, stop) spans inside `maskable_runs`, in sentinel order: the
    ``forced`` ones first, then the drawn ones sorted by position.

    Each span picks a run with probability proportional to its number of possible spans, then
    a uniform (start, stop) within it; overlaps are redrawn. When the document has too little
    room (short runs), fewer spans come back. ``forced`` spans (an instruction example's answer,
    which must come after what it answers) take the first sentinels and move first, so the
    answer is ``<mask:0>`` whatever else is masked, as generation asks for it; they do not count
    towards the drawn number.
    """
    forced = [(int(a), int(b)) for a, b in forced]
    n = int(np.clip(rng.poisson(cfg.rate), cfg.min_spans, min(cfg.max_spans, len(vocab.sentinels) - len(forced))))
    taken = np.zeros(len(tokens), bool)
    for a, b in forced:
        taken[a:b] = True
    runs = maskable_runs(tokens, vocab, taken)
    if n <= 0 or not runs:
        return forced
    lengths = np.array([b - a for a, b in runs], np.float64)
    choices = lengths * (lengths + 1) / 2  # spans per run
    p = choices / choices.sum()
    spans = []
    for _ in range(n):
        for _ in range(cfg.max_tries):
            a, b = runs[rng.choice(len(runs), p=p)]
            i, j = np.sort(rng.choice(b - a + 1, 2, replace=False)) + a
            if not taken[i:j].any():
                taken[i:j] = True
                spans.append((int(i), int(j)))
                break
    return forced + sorted(spans)


def transform(tokens: np.ndarray, vocab, rng: np.random.Generator, cfg: CM3Config = CM3Config(),
              forced: tuple[tuple[int, int], ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Int[T] document tokens (ending in ``<eos>``) -> (Int32[T + n*(2 + end_of_span)] tokens,
    Float32[...] weights). See the module docstring; ``forced``: spans that are always masked
    (`sample_spans`)."""
    tokens = np.asarray(tokens, np.int32)
    out, _ = rearrange(tokens, sample_spans(tokens, vocab, rng, cfg, forced), vocab, cfg.end_of_span)
    return out, loss_weights(out, vocab)


def rearrange(tokens: np.ndarray, spans: list[tuple[int, int]], vocab, end_of_span: bool = True,
              values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Move disjoint ``spans`` of Int[T] ``tokens`` (ending in ``<eos>``) to the end as CM3
    does -> (tokens, values moved alike). Span k gets ``<mask:k>`` and they move in that order
    (`sample_spans`' order). ``values`` [T] is any per-token label (which tokens are an
    instruction's output, say); a span's sentinels take 0 and its ``<eoss>`` the label of the
    span's last token."""
    tokens = np.asarray(tokens, np.int32)
    if not spans:
        return tokens, values
    vals = np.zeros(len(tokens), np.float32) if values is None else np.asarray(values)
    ends_in_eos = len(tokens) > 0 and tokens[-1] == vocab.eos
    body, moved, body_v, moved_v, prev = [], [], [], [], 0
    for i, j, k in sorted((i, j, k) for k, (i, j) in enumerate(spans)):  # the body in position order
        s = vocab.sentinel(k)
        body += [tokens[prev:i], [s]]
        body_v += [vals[prev:i], np.zeros(1, vals.dtype)]
        prev = j
    for k, (i, j) in enumerate(spans):
        s = vocab.sentinel(k)
        moved += [[s], tokens[i:j]] + ([[vocab.eoss]] if end_of_span else [])
        moved_v += [np.zeros(1, vals.dtype), vals[i:j]] + ([vals[j - 1:j]] if end_of_span else [])
    stop = len(tokens) - int(ends_in_eos)
    out = np.concatenate([*body, tokens[prev:stop], *moved, [vocab.eos] if ends_in_eos else []]).astype(np.int32)
    out_v = np.concatenate([*body_v, vals[prev:stop], *moved_v, vals[stop:] if ends_in_eos else vals[:0]])
    return out, None if values is None else out_v.astype(vals.dtype)


def loss_weights(tokens: np.ndarray, vocab) -> np.ndarray:
    """Float32[T]: 0 on sentinels and ``<mask>``, 1 elsewhere (the module docstring's rule)."""
    cm3_ids = (*vocab.sentinels, *(() if vocab.mask is None else (vocab.mask,)))  # Chameleon's vocab may have none
    return np.where(np.isin(tokens, cm3_ids), 0.0, 1.0).astype(np.float32)


def invert(tokens: np.ndarray, vocab, end_of_span: bool = True) -> np.ndarray:
    """The document `transform` was given, from its output (for tests and debugging)."""
    tokens = np.asarray(tokens, np.int32)
    first = vocab.sentinel(0)
    where = np.flatnonzero(tokens == first)
    if len(where) < 2:
        return tokens
    ends_in_eos = tokens[-1] == vocab.eos
    body, rest = tokens[:where[1]], tokens[where[1]:len(tokens) - int(ends_in_eos)]
    spans = {}
    sentinel_at = np.flatnonzero(np.isin(rest, vocab.sentinels))
    for n, start in enumerate(sentinel_at):
        stop = sentinel_at[n + 1] if n + 1 < len(sentinel_at) else len(rest)
        content = rest[start + 1:stop]
        if end_of_span:
            content = content[:-1]
        spans[int(rest[start])] = content
    out = []
    for t in body:
        out.append(spans[int(t)] if t in spans else [t])
    if ends_in_eos:
        out.append([vocab.eos])
    return np.concatenate(out).astype(np.int32)
