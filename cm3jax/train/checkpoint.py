"""Orbax checkpoints of the train state and the data iterator's state.

- Saves are async: the next steps run while the previous save is written.
- A save happens every ``every_steps`` steps, or once ``every_seconds`` have passed (time
  read from an injectable clock; process 0's decision is broadcast so all hosts agree).
- Restore builds its target from the *current* mesh's shardings, so a checkpoint written on
  a (2, 2, 2) mesh loads onto (4,) or one device.
- A checkpoint whose tensors do not fit the target is refused with `CheckpointMismatch`,
  naming the tensor and both shapes.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cm3jax.params import CheckpointMismatch, check_fits, manager

log = logging.getLogger(__name__)


def _to_json(state):
    """grain's DataLoader iterators give their state as JSON bytes; the dataset API's as dicts."""
    return {'bytes': state.decode()} if isinstance(state, bytes) else {'json': state}


def _from_json(entry):
    return entry['bytes'].encode() if 'bytes' in entry else entry['json']


def _gather_json(obj) -> list:
    """Every process's JSON-able ``obj``, in process order."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    size = int(multihost_utils.process_allgather(np.array([data.size], np.int32)).max())
    padded = np.zeros(size, np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row).rstrip(b'\0')) for row in np.asarray(rows).reshape(jax.process_count(), size)]


class Checkpointer:
    """``save(step, state, data_state)`` / ``restore(target) -> (state, data_state)`` in ``directory``.

    ``data_state`` is the data iterator's ``get_state()`` (JSON-able); every process's is kept,
    and each process gets its own back on restore.
    """

    def __init__(self, directory: str | pathlib.Path, *, every_steps: int = 0, every_seconds: float = 0.0,
                 keep: int = 3, use_async: bool = True, clock: Callable[[], float] = time.monotonic):
        self.directory = pathlib.Path(directory).absolute()
        self.every_steps, self.every_seconds, self.clock = every_steps, every_seconds, clock
        self._last_save_time = clock()
        self._manager = manager(self.directory, max_to_keep=keep, enable_async_checkpointing=use_async,
                                create=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def due_by_time(self) -> bool:
        """This host's clock says a save is due. Clocks differ across hosts and a save is
        collective, so multi-host callers must agree on one host's answer (`should_save` does)."""
        return bool(self.every_seconds) and self.clock() - self._last_save_time >= self.every_seconds

    def due_by_step(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def should_save(self, step: int) -> bool:
        """Due by step count, or by process 0's clock (the same answer on every host)."""
        due = self.due_by_time()
        if jax.process_count() > 1 and self.every_seconds:
            due = bool(multihost_utils.broadcast_one_to_all(np.array(due)))
        return self.due_by_step(step) or due

    def save(self, step: int, state, data_state: Any = None) -> None:
        """Start an async save of ``state`` (global arrays) and the data iterator's state."""
        if step in self._manager.all_steps():
            return
        data = {'processes': _gather_json(_to_json(data_state))}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(data)), force=True)
        self._last_save_time = self.clock()
        log.info('checkpoint: saving step %d to %s', step, self.directory)

    def restore(self, target, step: int | None = None) -> tuple[Any, Any]:
        """Load ``step`` (default: latest) into ``target``'s shapes and shardings (e.g.
        `cm3jax.train.state.abstract_state` on the current mesh). Returns (state, this
        process's data state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {self.directory}')
        where = f'checkpoint {self.directory}/{step}'
        check_fits(self._manager.item_metadata(step)['state'], target, where, whole=True)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                       data=ocp.args.JsonRestore()))
        return restored['state'], _from_json(_pick_data_state(restored['data']['processes'], where))

    def resume(self, target, data) -> Any | None:
        """The latest state restored into ``target``, with ``data``'s iterator moved to where it
        was (``data.set_state``); None when there is no checkpoint yet."""
        if self.latest_step() is None:
            return None
        state, data_state = self.restore(target)
        data.set_state(data_state)
        log.info('resumed from step %d in %s', int(state['step']), self.directory)
        return state

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _pick_data_state(states: list, where: str):
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    if all(s == states[0] for s in states):  # e.g. an index every process shares
        return states[0]
    raise CheckpointMismatch(f'{where} holds data-iterator states for {len(states)} processes, but this run has '
                             f'{jax.process_count()} and the states differ; resume with {len(states)} processes')
