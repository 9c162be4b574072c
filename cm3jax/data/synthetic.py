"""A synthetic structured-token task: copy, reverse, sort and add digit strings.

A loop example with a known answer (docs/training.md): the LM trains on it when ``data.dir``
is empty. Each example is ``<bos> TASK x1 .. xn <sep> y1 .. ym <eos>``: the prompt digits
are random (irreducible), the answer is a function of them (learnable to zero loss), so a
model that learns drives the loss far below the stream's unigram entropy and the answer
accuracy towards 1.

Rows are packed with several examples, separated by segment ids, and every row is a pure
function of (seed, batch index, global row index). A process makes only its own rows, and the
global batch is the same for any number of processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS, EOS, SEP = 0, 1, 2, 3
TASKS = ('copy', 'reverse', 'sort', 'add')
TASK_OFFSET = 4
DIGIT_OFFSET = TASK_OFFSET + len(TASKS)
PLUS = DIGIT_OFFSET + 10
VOCAB_SIZE = PLUS + 1


def _digits(value: int) -> list[int]:
    return [DIGIT_OFFSET + int(c) for c in str(value)]


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """``tasks``: any of `TASKS`; digit strings have ``min_len``..``max_len`` digits (an addend
    up to half of ``max_len``)."""
    tasks: tuple[str, ...] = TASKS
    min_len: int = 2
    max_len: int = 8

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f'data.tasks={self.tasks} must be a non-empty subset of {TASKS}')
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f'need 1 <= data.min_len ({self.min_len}) <= data.max_len ({self.max_len})')

    @property
    def longest(self) -> int:
        """Tokens in the longest example (bos, task, prompt, sep, answer, eos)."""
        add = 2 * (self.max_len // 2 or 1) + 1 + (self.max_len // 2 or 1) + 1
        return 4 + max(2 * self.max_len, add if 'add' in self.tasks else 0)

    def example(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """(prompt tokens through <sep>, answer tokens through <eos>)."""
        task = self.tasks[rng.integers(len(self.tasks))]
        if task == 'add':
            half = max(1, self.max_len // 2)
            a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, half + 1)))) for _ in range(2))
            x, y = _digits(a) + [PLUS] + _digits(b), _digits(a + b)
        else:
            digits = rng.integers(0, 10, int(rng.integers(self.min_len, self.max_len + 1)))
            y_digits = {'copy': digits, 'reverse': digits[::-1], 'sort': np.sort(digits)}[task]
            x, y = [DIGIT_OFFSET + int(d) for d in digits], [DIGIT_OFFSET + int(d) for d in y_digits]
        return [BOS, TASK_OFFSET + TASKS.index(task), *x, SEP], [*y, EOS]

    def row(self, rng: np.random.Generator, seq_len: int) -> dict[str, np.ndarray]:
        """One packed row: inputs, targets, segment_ids, weights and answer (Int/Float[seq_len]).

        weights are 1 where input and target belong to the same example; answer marks targets
        that are answer tokens or the closing <eos>.
        """
        if self.longest > seq_len + 1:
            raise ValueError(f'train.seq_len={seq_len} cannot hold the longest synthetic example '
                             f'({self.longest} tokens); raise it or lower data.max_len')
        tokens, segments, answer = [], [], []
        while True:
            prompt, reply = self.example(rng)
            if len(tokens) + len(prompt) + len(reply) > seq_len + 1:
                break
            segment = (segments[-1] if segments else 0) + 1
            tokens += prompt + reply
            segments += [segment] * (len(prompt) + len(reply))
            answer += [0] * len(prompt) + [1] * len(reply)
        pad = seq_len + 1 - len(tokens)
        tokens, segments = np.array(tokens + [PAD] * pad, np.int32), np.array(segments + [0] * pad, np.int32)
        answer = np.array(answer + [0] * pad, np.float32)
        same = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
        return {'inputs': tokens[:-1], 'targets': tokens[1:], 'segment_ids': segments[:-1],
                'weights': same.astype(np.float32), 'answer': answer[1:] * same}

    def unigram_entropy(self, seq_len: int, rows: int = 512, seed: int = 12345) -> float:
        """Entropy (nats) of the marginal distribution of weighted target tokens: the loss of
        the best model that ignores context."""
        rng = np.random.default_rng(seed)
        counts = np.zeros(VOCAB_SIZE)
        for _ in range(rows):
            r = self.row(rng, seq_len)
            np.add.at(counts, r['targets'], r['weights'])
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


class SyntheticBatches:
    """This process's rows of global batch after global batch; a `cm3jax.train.loop.DataIterator`.

    Batch ``i`` row ``r`` comes from ``default_rng([seed, i, r])``: reproducible after a
    restart from ``get_state()``, and independent of how rows are split over processes.
    """

    def __init__(self, task: SyntheticTask, global_batch: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f'train.batch={global_batch} must be a multiple of the {process_count} processes')
        self.task, self.seq_len, self.seed = task, seq_len, seed
        rows = global_batch // process_count
        self.rows = range(process_index * rows, (process_index + 1) * rows)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self.task.row(np.random.default_rng([self.seed, self.index, r]), self.seq_len) for r in self.rows]
        self.index += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict:
        return {'index': self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state['index'])
