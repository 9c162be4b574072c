"""Orbax checkpoints of the train state and the data iterator's state.

- Saves are async: the next steps run while the previous save is written.
- A save happens every ``every_steps`` steps, or once ``every_seconds`` have passed (time
  read from an injectable clock; process 0's decision is broadcast so all hosts agree).
- Restore builds its target from the *current* mesh's shardings, so a checkpoint written on
  a (2, 2, 2) mesh loads onto (4,) or one device.
- A checkpoint whose tensors do not fit the target is refused with `CheckpointMismatch`,
  naming the tensor and both shapes.
- A damaged step (empty, a file missing or cut short) is diagnosed as `DamagedCheckpoint`;
  `resume` walks back to the newest step that restores completely, says which it skipped and
  why, and moves the damaged ones aside (``damaged-STEP``) before its first save replaces them.
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

from cm3jax.errors import DamagedCheckpoint
from cm3jax.params import CheckpointMismatch, check_complete, check_fits, manager, read_damage, saved_tensors

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
        self._options = dict(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
        self._manager = manager(self.directory, **self._options)
        self.damaged: list[tuple[int, str]] = []  # (step, why) that `resume` walked back past

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
        if self.damaged:
            self._set_aside()
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
        process's data state). A step that is not all there raises `DamagedCheckpoint`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {self.directory}')
        where = f'checkpoint {self.directory}/{step}'
        check_complete(self.directory, step, items=('state', 'data'))
        check_fits(saved_tensors(self._manager, step), target, where, whole=True)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                           data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, OSError) as e:
            raise read_damage(step, e) from None
        return restored['state'], _from_json(_pick_data_state(restored['data']['processes'], where))

    def resume(self, target, data) -> Any | None:
        """The newest state that restores completely, into ``target``, with ``data``'s iterator
        moved to where it was (``data.set_state``); None when there is no checkpoint yet. Damaged
        steps are walked past (listed in ``damaged`` and logged); when none restores, raises
        `DamagedCheckpoint` listing them all."""
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(target, step)
            except DamagedCheckpoint as e:
                damaged.append((step, str(e)))
                log.info('%s; trying the step before', e)
                continue
            data.set_state(data_state)
            self.damaged = damaged
            log.info('resumed from step %d in %s', int(state['step']), self.directory)
            return state
        if damaged:
            raise DamagedCheckpoint(f'no checkpoint in {self.directory} restores completely: '
                                    + '; '.join(why for _, why in damaged)
                                    + f'. Move {self.directory} away to start the run over')
        return None

    def _set_aside(self) -> None:
        """Rename the damaged steps to ``damaged-STEP`` (orbax ignores such names), so that the
        run saves those steps afresh; nothing is deleted."""
        if jax.process_index() == 0:
            for step, _ in self.damaged:
                src, dst = self.directory / str(step), self.directory / f'damaged-{step}'
                if src.exists():
                    n = 1
                    while dst.exists():
                        dst, n = self.directory / f'damaged-{step}.{n}', n + 1
                    src.rename(dst)
                    log.warning('moved damaged checkpoint step %d to %s', step, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices('cm3jax: damaged checkpoints set aside')
        self.damaged = []
        self._manager.close()
        self._manager = manager(self.directory, **self._options)

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
