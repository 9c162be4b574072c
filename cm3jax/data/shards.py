"""Random access to the records of prepared shards, each shard opened on its own so that damage is
named and contained.

    records = ShardRecords(data_dir, manifest['shards'])
    records[i]          # bytes of document i, or `documents.CorruptRecord` naming its shard
    records.damaged     # {shard name: why it could not be opened}

An ArrayRecord shard keeps its index of chunks at its end. A shard cut short or overwritten with
other bytes therefore cannot be opened at all: every one of its documents (as many as the
manifest lists) reads as an 'unreadable shard' record. Damage inside a shard whose index is
intact costs only the records whose chunks it hits ('unreadable record'); the records before and
after it read as before. Document ids stay those of the manifest either way
(`cm3jax.data.neighbours.global_ids`), so neighbour lists keep pointing at the right documents.
"""

from __future__ import annotations

import bisect
import logging
import pathlib
from typing import Sequence

from cm3jax.data.documents import CorruptRecord
from cm3jax.errors import DataError

log = logging.getLogger(__name__)


def _why(error: Exception) -> str:
    text = str(error).strip().splitlines()
    if isinstance(error, DataError):
        return text[0]
    return f'{type(error).__name__}: {text[0][:300]}' if text else f'{type(error).__name__} (no message)'


class ShardRecords:
    """The documents of ``shards`` (manifest entries: 'path' relative to ``data_dir``,
    'documents') in manifest order; see the module docstring."""

    def __init__(self, data_dir: str | pathlib.Path, shards: Sequence[dict]):
        from array_record.python.array_record_module import ArrayRecordReader

        self.data_dir = pathlib.Path(data_dir)
        self.names = [s['path'] for s in shards]
        self.readers, self.damaged, starts, total = [], {}, [], 0
        for shard in shards:
            path = self.data_dir / shard['path']
            reader = None
            try:
                reader = ArrayRecordReader(str(path), 'readahead_buffer_size:0')
                if not reader.ok():  # cut short or overwritten: its index of records is lost
                    raise DataError('damaged: its record index cannot be read (cut short or overwritten?)')
                count = reader.num_records()
                if count != shard['documents']:
                    raise DataError(f'it holds {count} records but the manifest lists {shard["documents"]}')
            except Exception as e:  # array_record raises bare RuntimeErrors with the riegeli message, or none
                reader = None  # not closed: closing a reader that failed raises again
                self.damaged[shard['path']] = 'missing' if not path.exists() else _why(e)
                log.warning('cannot read shard %s (%s): its %d documents are skipped and counted', path,
                            self.damaged[shard['path']], shard['documents'])
            self.readers.append(reader)
            starts.append(total)
            total += shard['documents']
        self._starts, self._len = starts, total
        if self.readers and all(r is None for r in self.readers):
            raise DataError(f'none of the {len(self.readers)} shards in {self.data_dir} can be read ('
                            + '; '.join(f'{name}: {why}' for name, why in list(self.damaged.items())[:3])
                            + '): prepare the data again with `cm3jax prepare`')

    def __len__(self) -> int:
        return self._len

    def shard_of(self, index: int) -> str:
        """The name of the shard that holds document ``index``."""
        return self.names[bisect.bisect_right(self._starts, index) - 1]

    def __getitem__(self, index: int) -> bytes:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f'document {index} of {self._len}')
        k = bisect.bisect_right(self._starts, index) - 1
        reader, name = self.readers[k], self.names[k]
        if reader is None:
            raise CorruptRecord('unreadable shard', f'{name}: {self.damaged[name]}', shard=name)
        try:
            return reader.read([index - self._starts[k]])[0]
        except Exception as e:  # riegeli's "chunk header hash mismatch" and friends, as RuntimeError
            raise CorruptRecord('unreadable record', f'{name} record {index - self._starts[k]}: {_why(e)}',
                                shard=name) from None
