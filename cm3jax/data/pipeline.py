"""The training data pipeline (grain): prepared shards -> packed, CM3-masked token rows.

    ArrayRecord shards (this process's share)
      -> grain MapDataset: shuffle(seed) per epoch, repeat
      -> per example, from rng = default_rng([seed, process, index]):
           decode record -> layout -> CM3 transform, after the retrieved documents of the
           augmentation hook (`cm3jax.data.augment`), which are not transformed
      -> greedy packing into rows of seq_len + 1 tokens (segment ids, positions, weights)
      -> this process's rows of the global batch (numpy); `parallel.global_batch` makes jax.Arrays

Damaged data never crashes a run and is never silently wrong: a shard that cannot be opened, a
record that cannot be read or parsed, and a record holding an id outside the manifest's vocab
are skipped and counted by reason and shard (`report`; `cm3jax.data.shards`), and a stream in
which every record is bad stops with `DataError`.

Every example is a pure function of (seed, process index, example index), and a row takes
whole examples in order until the next one does not fit, so the iterator's state is just the
index of the next example: `get_state` / `set_state` restore the exact next batch, which the
checkpointer saves alongside the model. Processes read disjoint sets of shards.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Callable

import numpy as np

from cm3jax.data import cm3, documents, neighbours, prepare, shards as shards_lib
from cm3jax.errors import DataError
from cm3jax.vocab import Vocab

log = logging.getLogger(__name__)

# The retrieval-augmentation hook: (query document id, rng) -> laid-out token documents (each
# ending in <eos>) to put before the query; `cm3jax.data.augment.RetrievalAugment` reads them
# from the neighbour lists written next to the shards. Ids are `neighbours.global_ids`.
Augment = Callable[[int, np.random.Generator], list[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    seq_len: int
    batch: int                # global rows per step
    seed: int = 0
    shuffle: bool = True
    layout: documents.LayoutConfig = documents.LayoutConfig()
    cm3: cm3.CM3Config = cm3.CM3Config()
    query_weight: float = 1.0  # loss weight of the query's tokens (RA-CM3 up-weights them)
    retrieved_weight: float = 1.0  # loss weight of the retrieved documents' tokens; 0 = loss on the query only

    def __post_init__(self):
        if self.seq_len < 2 or self.batch < 1:
            raise ValueError(f'pipeline needs seq_len >= 2 and batch >= 1; got {self.seq_len}, {self.batch}')
        if self.query_weight <= 0:
            raise ValueError(f'query_weight={self.query_weight} must be > 0')
        if self.retrieved_weight < 0:
            raise ValueError(f'retrieved_weight={self.retrieved_weight} must be >= 0')


class Packer:
    """Greedy packing of an example stream into rows, with skip counts and a resumable position.

    A subclass sets ``examples`` (index -> (tokens Int32[T], weights Float32[T]), or (reason,
    detail) for an example to skip), ``vocab``, ``seq_len``, ``rows`` (this process's rows per
    batch), ``num_documents`` and ``where`` (what to name in the all-corrupt error), then calls
    `_start`.
    """

    def _start(self) -> None:
        self.position = 0                   # index of the next example
        self.counts = {'skipped': 0, 'truncated': 0}
        self.skips: dict[str, int] = {}     # 'reason (shard)' -> examples skipped for it
        self._held = None                   # (position, example) that did not fit the last row

    # ---- Packing ----

    def example(self, index: int):
        """(tokens Int32[T], weights Float32[T]) of example ``index``, as trained, or None if its
        record is corrupt."""
        ex = self.examples[index]
        return None if isinstance(ex[0], str) else ex

    def _row(self) -> dict[str, np.ndarray]:
        n = self.seq_len + 1
        tokens = np.full(n, self.vocab.pad, np.int32)
        weights, segments, positions = np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        used = segment = 0
        corrupt_run = 0
        while True:
            if self._held is not None and self._held[0] == self.position:
                ex = self._held[1]
            else:
                ex = self.examples[self.position]
            if isinstance(ex[0], str):  # (why, detail): skipped, counted by reason and shard
                self._skip(*ex)
                self.position += 1
                corrupt_run += 1
                if corrupt_run > self.num_documents:
                    raise DataError(f'every record in {self.where} is unusable ({self.skip_report()}): '
                                    f'prepare the data again')
                continue
            t, w = ex
            if len(t) > n:
                if used:  # a long example starts its own row
                    self._held = (self.position, ex)
                    break
                self.counts['truncated'] += 1
                t, w = t[:n], w[:n]
            if used + len(t) > n:
                self._held = (self.position, ex)  # the next row starts with it: build it once
                break
            segment += 1
            tokens[used:used + len(t)], weights[used:used + len(t)] = t, w
            segments[used:used + len(t)], positions[used:used + len(t)] = segment, np.arange(len(t))
            used += len(t)
            self.position += 1
            if used == n:
                break
        same = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
        return {'inputs': tokens[:-1], 'targets': tokens[1:], 'segment_ids': segments[:-1],
                'positions': positions[:-1], 'weights': weights[1:] * same}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row() for _ in range(self.rows)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _skip(self, why: str, detail: str) -> None:
        self.counts['skipped'] += 1
        if why not in self.skips:  # one warning per reason and shard; the rest are counted
            log.warning('skipping example %d, %s: %s (further ones are counted)', self.position, why, detail)
        self.skips[why] = self.skips.get(why, 0) + 1

    def skip_report(self) -> str:
        """'3 unreadable record (shard-00001.array_record), ...' by count, largest first."""
        return ', '.join(f'{n} {why}' for why, n in sorted(self.skips.items(), key=lambda kv: -kv[1])) or 'none'

    # ---- Checkpointed state ----

    def get_state(self) -> dict:
        return {'position': self.position, **self.counts, 'skips': dict(self.skips)}

    def set_state(self, state: dict) -> None:
        self.position = int(state['position'])
        self.counts = {k: int(state.get(k, 0)) for k in self.counts}
        self.skips = {k: int(v) for k, v in state.get('skips', {}).items()}
        self._held = None


class Pipeline(Packer):
    """A `cm3jax.train.loop.DataIterator` of this process's rows:
    {'inputs', 'targets', 'segment_ids', 'positions': Int32[B_local, seq_len], 'weights': Float32[...]}.

    weights are the CM3 weights of the targets (0 for sentinels), and 0 across document
    boundaries and on padding (segment id 0).
    """

    def __init__(self, data_dir: str | pathlib.Path, vocab: Vocab, cfg: PipelineConfig, *,
                 process_index: int = 0, process_count: int = 1, augment: Augment | None = None):
        import grain

        if cfg.batch % process_count:
            raise ValueError(f'train.batch={cfg.batch} must be a multiple of the {process_count} processes')
        self.data_dir, self.vocab, self.cfg, self.augment = pathlib.Path(data_dir), vocab, cfg, augment
        self.process_index, self.rows = process_index, cfg.batch // process_count
        manifest = prepare.read_manifest(data_dir, vocab)
        if len(manifest['shards']) < process_count:
            raise ValueError(f'{data_dir} has {len(manifest["shards"])} shards, fewer than the {process_count} '
                             f'processes: prepare with a smaller prepare.shard_size')
        entries = manifest['shards'][process_index::process_count]
        mine = [s['path'] for s in entries]
        self.shards = [self.data_dir / p for p in mine]
        self.doc_ids = neighbours.global_ids(manifest, mine)  # record index -> document id
        self.records = shards_lib.ShardRecords(self.data_dir, entries)
        self.num_documents = len(self.records)
        # the stream is of record indices (grain's source wraps the indices of later epochs), so
        # the shuffled stream knows which document it holds, for its neighbour list and its shard;
        # records are read in `_example`, where damage is caught and counted
        ds = grain.MapDataset.source(range(self.num_documents))
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)  # a fresh order every epoch after repeat
        self.examples = ds.repeat(None).map_with_index(self._example)
        self.seq_len, self.where = cfg.seq_len, f"{self.data_dir} (this process's {len(self.shards)} shards)"
        self._start()

    # ---- One example ----

    def _example(self, index: int, record_index: int):
        rng = np.random.default_rng([self.cfg.seed, self.process_index, index])
        try:
            segments, is_image, _ = documents.decode_record(self.records[record_index], self.vocab.size)
            tokens = documents.layout(segments, is_image, self.vocab, rng, self.cfg.layout)
        except ValueError as e:  # CorruptRecord, or a layout that does not fit the record
            reason, detail = (e.reason, e.detail) if isinstance(e, documents.CorruptRecord) else ('corrupt record', str(e))
            return f'{reason} ({self.records.shard_of(record_index)})', detail
        tokens, weights = cm3.transform(tokens, self.vocab, rng, self.cfg.cm3)
        weights = weights * np.float32(self.cfg.query_weight)
        if self.augment is not None:
            retrieved = self.augment(int(self.doc_ids[record_index]), rng)
            if retrieved:
                before = np.concatenate(retrieved).astype(np.int32)
                tokens = np.concatenate([before, tokens])
                weights = np.concatenate([np.full(len(before), self.cfg.retrieved_weight, np.float32), weights])
        return tokens, weights

    def report(self) -> str:
        text = (f'{self.position} examples read from {len(self.shards)} shards ({self.num_documents} documents); '
                f'{self.counts["skipped"]} corrupt records skipped, {self.counts["truncated"]} examples truncated '
                f'to seq_len + 1 = {self.cfg.seq_len + 1}')
        if self.skips:
            text += f' (skipped: {self.skip_report()})'
        if self.records.damaged:
            text += '; unreadable shards: ' + ', '.join(f'{self.data_dir / name} ({why})'
                                                        for name, why in self.records.damaged.items())
        counts = getattr(self.augment, 'counts', None)
        if counts:  # counted by this process since it started, not restored on resume
            text += '; retrieval: ' + ', '.join(f'{v} {k.replace("_", " ")}' for k, v in counts.items())
        return text
