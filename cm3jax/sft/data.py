"""Instruction-tuning batches: a task mixture over prepared examples, laid out, weighted and packed.

    SFT data directory (`cm3jax.sft.prepare`): one prepared subdirectory per task, and a
    manifest over all of them (the shards tagged with their task)
      -> per example, from rng = default_rng([seed, process, index]):
           its task (`mixture.task_of`), one of the task's records, condition dropout,
           the template's layout, then the loss weights (``loss``):
             'cm3'     the paper's: every token weighs 1, with CM3 spans (never across <break>)
             'prompt'  Chameleon's: only the output (and the <eos> or <eoss> closing it) weighs 1
      -> greedy packing into rows (`cm3jax.data.pipeline.Packer`: the same rows, skip counts and
         resumable position as pretraining's pipeline)

An output that does not end its template (VQA's answer, before the image it is about) is always
moved to the end as a CM3 span, in both variants: it must come after what it depends on, and
`generate.answer` asks for it in that infill form (it takes ``<mask:0>`` whatever else CM3
masks). Condition dropout trains the unconditional streams of guidance, as InstructPix2Pix
does: with probability ``condition_dropout`` every condition of a template (the edit's first
image and instruction) becomes ``<mask>`` (weight 0), the "none" stream; with the same
probability only its text conditions do, the "image only" stream of `generate.edit`.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from cm3jax.data import cm3, documents, prepare, shards as shards_lib
from cm3jax.data.pipeline import Packer
from cm3jax.sft import mixture
from cm3jax.vocab import Vocab

LOSSES = ('cm3', 'prompt')


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    seq_len: int
    batch: int                       # global rows per step
    weights: dict                    # task -> mixture weight
    seed: int = 0
    min_rate: float = 0.0            # up-sampling threshold (`mixture.mixture_rates`)
    max_rate: float = 1.0            # down-sampling threshold
    loss: str = 'cm3'
    cm3: cm3.CM3Config = cm3.CM3Config(rate=0.5)
    condition_dropout: float = 0.1   # each of the two dropped layouts (module docstring)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f'sft loss {self.loss!r}; choose from {LOSSES}')
        if not 0 <= self.condition_dropout <= 0.5:
            raise ValueError(f'condition_dropout={self.condition_dropout} must lie in [0, 0.5] (it is the rate of '
                             f'each of two dropped layouts)')
        if self.seq_len < 2 or self.batch < 1:
            raise ValueError(f'need seq_len >= 2 and batch >= 1; got {self.seq_len}, {self.batch}')


def output_spans(tokens: np.ndarray, owner: np.ndarray, output: list[bool], vocab) -> list[tuple[int, int]]:
    """[start, stop) token ranges of the output segments that some prompt segment follows: the
    spans that must move to the end (their non-special tokens)."""
    spans = []
    last_prompt = max((k for k, o in enumerate(output) if not o), default=-1)
    for k, is_out in enumerate(output):
        if is_out and k < last_prompt:
            where = np.flatnonzero((owner == k) & ~np.asarray(vocab.is_special(tokens)))
            if len(where):
                spans.append((int(where[0]), int(where[-1]) + 1))
    return spans


def example_tokens(segments: list[np.ndarray], is_image: list[bool], header: dict, vocab: Vocab,
                   rng: np.random.Generator, cfg: SFTDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """One prepared instruction example (joint-vocab segments and its record header) ->
    (tokens Int32[T], weights Float32[T]) for predicting each token (module docstring)."""
    output = [bool(o) for o in header['output']]
    if len(output) != len(segments) or not any(output):
        raise ValueError(f'header output flags {output} do not fit its {len(segments)} segments')
    segments, conditions = list(segments), list(header.get('condition', ()))
    if conditions and cfg.condition_dropout:
        u = rng.random()
        dropped = (conditions if u < cfg.condition_dropout else
                   [k for k in conditions if not is_image[k]] if u < 2 * cfg.condition_dropout else [])
        for k in dropped:
            segments[k] = np.array([vocab.require_mask()], np.int32)
    tokens, owner = documents.join_owned(segments, is_image, vocab)
    tokens, owner = np.append(tokens, vocab.eos).astype(np.int32), np.append(owner, len(segments) - 1)
    is_output = np.asarray(output)[owner]
    is_output[-1] = True  # knowing where to stop is part of the answer
    forced = output_spans(tokens, owner, output, vocab)
    if cfg.loss == 'cm3':
        spans = cm3.sample_spans(tokens, vocab, rng, cfg.cm3, forced)
    else:
        spans = forced
    tokens, is_output = cm3.rearrange(tokens, spans, vocab, cfg.cm3.end_of_span, is_output)
    weights = cm3.loss_weights(tokens, vocab)
    if cfg.loss == 'prompt':
        weights = weights * is_output
    return tokens, weights.astype(np.float32)


class _Examples:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, index: int):
        return self.fn(int(index))


class SFTData(Packer):
    """A `cm3jax.train.loop.DataIterator` of this process's packed rows of a task mixture (the
    keys and weights of `cm3jax.data.pipeline.Pipeline`'s rows)."""

    def __init__(self, data_dir: str | pathlib.Path, vocab: Vocab, cfg: SFTDataConfig, *,
                 process_index: int = 0, process_count: int = 1):
        if cfg.batch % process_count:
            raise ValueError(f'train.batch={cfg.batch} must be a multiple of the {process_count} processes')
        self.data_dir, self.vocab, self.cfg = pathlib.Path(data_dir), vocab, cfg
        self.process_index, self.rows, self.seq_len = process_index, cfg.batch // process_count, cfg.seq_len
        manifest = prepare.read_manifest(data_dir, vocab)
        have = manifest.get('tasks')
        if have is None:
            raise ValueError(f'{data_dir} holds no instruction tasks (its manifest lists none): prepare it with '
                             f'cm3jax.sft.prepare (`cm3jax train --config=configs/sft.py:shapes` does)')
        missing = sorted(set(cfg.weights) - set(have))
        if missing:
            raise ValueError(f'tasks {missing} have weights but no data in {data_dir}, which holds '
                             f'{sorted(have)}: prepare them or drop their weights')
        self.rates = mixture.mixture_rates(cfg.weights, cfg.min_rate, cfg.max_rate)
        self.records, self.shards = {}, []
        for task in self.rates:
            # every process reads all of a task's shards: examples are drawn with replacement by
            # each process's own generator, so the processes' streams differ anyway
            entries = [s for s in manifest['shards'] if s.get('task') == task and s['documents']]
            if not entries and self.rates[task] > 0:
                raise ValueError(f'task {task!r} has a weight but no examples in {data_dir}: prepare some or '
                                 f'drop its weight')
            self.records[task] = shards_lib.ShardRecords(self.data_dir, entries)
            self.shards += [self.data_dir / s['path'] for s in entries]
        self.num_documents = sum(len(r) for r in self.records.values())
        self.where = f'{self.data_dir} ({len(self.shards)} shards)'
        self.examples = _Examples(self._example)
        self._start()

    def task(self, index: int) -> str:
        return mixture.task_of(index, self.rates, (self.cfg.seed, self.process_index))

    def _example(self, index: int):
        rng = np.random.default_rng([self.cfg.seed, self.process_index, index])
        task = self.task(index)
        records = self.records[task]
        i = int(rng.integers(len(records)))
        try:
            segments, is_image, header = documents.decode_record(records[i], self.vocab.size)
            return example_tokens(segments, is_image, header, self.vocab, rng, self.cfg)
        except (ValueError, KeyError) as e:  # CorruptRecord, or a header that does not fit its record
            reason, detail = ((e.reason, e.detail) if isinstance(e, documents.CorruptRecord)
                              else ('unusable example', f'{type(e).__name__}: {e}'))
            return f'{reason} ({task}: {records.shard_of(i)})', detail

    def report(self) -> str:
        rates = ', '.join(f'{t} {r:.0%}' for t, r in self.rates.items())
        text = (f'{self.position} examples drawn ({rates}) from {self.num_documents} prepared ones; '
                f'{self.counts["skipped"]} corrupt skipped, {self.counts["truncated"]} truncated to seq_len + 1 = '
                f'{self.seq_len + 1}')
        return text + (f' (skipped: {self.skip_report()})' if self.skips else '')
