"""The train loop: data -> step -> hooks, with checkpoints, preemption and a progress bar.

Generic: it takes a jitted step, a data iterator and hooks, and knows no model. Each step is
waited for before the next is dispatched. The NaN guard needs the step's metrics on the host
anyway, and with simulated CPU devices two collective programs in flight at once can starve
XLA's in-process rendezvous and abort. On accelerators the wait costs only the dispatch
latency, which is small next to a real step. What does overlap is the host's work: the next
batch is read while the device runs the current step, so a data pipeline in Python costs
nothing as long as it is faster than the step.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from cm3jax.train import step as step_lib
from cm3jax.train.checkpoint import Checkpointer
from cm3jax.train.loss import means
from cm3jax.train.metrics import MetricWriter

log = logging.getLogger(__name__)


class DataIterator(Protocol):
    """Batches plus a JSON-able position, like grain's iterators: ``set_state(get_state())``
    after a restart yields exactly the batches that would have come next."""

    def __next__(self) -> Any: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step: the new state, the step's host metrics, and
    ``train_seconds``, the wall time spent in data + step since the loop started (hooks,
    checkpoints and compilation excluded). ``last``: the loop stops after this step."""
    step: int
    state: Any
    metrics: dict[str, np.ndarray]
    train_seconds: float
    last: bool = False


@dataclasses.dataclass
class Hook:
    """``fn(info)`` after every ``every``-th step, and after the last step when ``at_end``."""
    fn: Callable[[StepInfo], None]
    every: int
    at_end: bool = True

    def due(self, step: int, last: bool) -> bool:
        return (self.every > 0 and step % self.every == 0) or (last and self.at_end)


class Preemption:
    """Turns SIGTERM (a preemption notice, or ``kill``) into a flag the loop reads at a step
    boundary, where it saves and exits cleanly.

    A context manager: install it before the slow start-up (restore, compile) so that an early
    signal is not fatal either; the old handlers come back on exit.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self._flag = threading.Event()
        self._signals, self._previous = signals, {}

    def __enter__(self) -> 'Preemption':
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested_here(self) -> bool:
        """This process got the signal (other hosts may not have)."""
        return self._flag.is_set()


def _agree(preempted: bool, time_due: bool) -> tuple[bool, bool]:
    """One collective per step for every host to act alike: stop if any host was signalled
    (a save is collective, and the signal may reach only some hosts); save by process 0's clock."""
    if jax.process_count() == 1:
        return preempted, time_due
    flags = np.asarray(multihost_utils.process_allgather(np.array([preempted, time_due])))
    return bool(flags[:, 0].any()), bool(flags[0, 1])


def train(*, state, train_step, data: DataIterator, num_steps: int, rng: jax.Array, hooks: list[Hook] = (),
          checkpointer: Checkpointer | None = None, tokens_per_step: int = 0, progress: bool = True,
          desc: str = 'train', preemption: Preemption | None = None) -> tuple[Any, dict]:
    """Run ``train_step`` from ``state['step']`` up to ``num_steps``; returns (state, last metrics).

    ``train_step(state, batch, rng)`` is jitted (e.g. `cm3jax.train.step.jit_train_step`);
    step ``s`` gets ``fold_in(rng, s)``. When SIGTERM arrives (caught by ``preemption``, or by
    one this call installs), the loop saves after the current step and returns; hooks do not
    run then, so the save starts at once. Raises `cm3jax.train.step.NonFiniteError` on NaN/inf,
    after waiting for pending saves so the last good checkpoint is complete.
    """
    start = int(jax.device_get(state['step']))
    metrics: dict = {}
    if start >= num_steps:
        log.info('already at step %d of %d; nothing to train', start, num_steps)
        return state, metrics
    own = preemption is None
    preemption = Preemption().__enter__() if own else preemption
    bar = None
    try:
        # ---- Compile ahead of time, on the first batch ----
        batch = next(data)
        begin = time.perf_counter()
        compiled = train_step.lower(state, batch, jax.random.fold_in(rng, start + 1)).compile()
        log.info('train step compiled in %.1fs', time.perf_counter() - begin)

        # ---- Loop ----
        bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress or jax.process_index() != 0,
                   dynamic_ncols=True)
        train_seconds = 0.0
        for step in range(start + 1, num_steps + 1):
            begin = time.perf_counter()
            with jax.profiler.StepTraceAnnotation(desc, step_num=step):
                state, metrics = compiled(state, batch, jax.random.fold_in(rng, step))
                # Dispatch is asynchronous: read the next batch while the step runs. A save after
                # this step records the position before that read, so a resume gets it again.
                position = data.get_state()
                if step < num_steps:
                    batch = next(data)
                metrics = jax.device_get(metrics)
            train_seconds += time.perf_counter() - begin
            if not (metrics['finite/loss'] and metrics['finite/grads']):
                if checkpointer:
                    checkpointer.wait()
                step_lib.check_finite(metrics, step)

            last = step == num_steps
            stop, time_due = _agree(preemption.requested_here(), bool(checkpointer and checkpointer.due_by_time()))
            if stop:
                if checkpointer:
                    checkpointer.save(step, state, position)
                log.warning('SIGTERM: saved step %d and stopped; run the same command to resume', step)
                break
            info = StepInfo(step, state, metrics, train_seconds, last)
            for hook in hooks:
                if hook.due(step, last):
                    hook.fn(info)
            if checkpointer and (last or time_due or checkpointer.due_by_step(step)):
                checkpointer.save(step, state, position)

            bar.update(1)
            postfix = {'loss': f"{float(metrics['loss']):.3f}"}
            if tokens_per_step:
                postfix['tok/s'] = f'{(step - start) * tokens_per_step / train_seconds:,.0f}'
            bar.set_postfix(postfix)
    finally:
        if bar is not None:
            bar.close()
        _stop_profiler()
        if checkpointer:
            checkpointer.wait()  # before the handler goes: a second SIGTERM must not cut a save short
        if own:
            preemption.__exit__()
    return state, metrics


def _stop_profiler() -> None:
    """End a `profile_hook` trace the loop left open (a stop or an error inside the window)."""
    try:
        jax.profiler.stop_trace()
    except RuntimeError:  # no trace running: the usual case
        pass


def metrics_hook(writer: MetricWriter, every: int, *, tokens_per_step: int = 0, flops_per_step: float = 0.0,
                 peak_flops: float = 0.0) -> Hook:
    """Write the step's metrics plus throughput over the window since the last write:
    tokens/s, steps/s, and MFU = model FLOP/s / ``peak_flops`` when both are known."""
    last = {'step': None, 'seconds': 0.0}

    def write(info: StepInfo) -> None:
        scalars = {k: v for k, v in info.metrics.items() if not k.startswith('finite/')}
        if last['step'] is not None and info.train_seconds > last['seconds']:
            seconds = info.train_seconds - last['seconds']
            steps = info.step - last['step']
            scalars['perf/steps_per_s'] = steps / seconds
            if tokens_per_step:
                scalars['perf/tokens_per_s'] = steps * tokens_per_step / seconds
            if flops_per_step and peak_flops:
                scalars['perf/mfu'] = steps * flops_per_step / seconds / peak_flops
        writer.write(info.step, scalars)
        last.update(step=info.step, seconds=info.train_seconds)

    return Hook(write, every)


def eval_hook(eval_step, batches: Callable[[], Iterator], writer: MetricWriter, every: int,
              rng: jax.Array | None = None, prefix: str = 'eval') -> Hook:
    """Every ``every`` steps: run jitted ``eval_step(params, batch, rng) -> stats`` over a fresh
    ``batches()`` iterator, add the (sum, count) pairs, and write ``prefix/NAME`` means."""
    rng = jax.random.key(0) if rng is None else rng

    def evaluate(info: StepInfo) -> None:
        total = None
        for i, batch in enumerate(batches()):
            stats = jax.device_get(eval_step(info.state['params'], batch, jax.random.fold_in(rng, i)))
            total = stats if total is None else jax.tree.map(np.add, total, stats)
        if total is None:
            raise ValueError('the eval data yielded no batches')
        writer.write(info.step, {f'{prefix}/{k}': v for k, v in means(total).items()})

    return Hook(evaluate, every)


def profile_hook(logdir: str, start_step: int, num_steps: int) -> Hook:
    """A `jax.profiler` trace of steps (start_step, start_step + num_steps] into
    ``logdir/process_N``, viewable in TensorBoard's profile tab or Perfetto. The loop ends a
    trace left open by a stop or an error."""
    active = {'on': False}

    def profile(info: StepInfo) -> None:
        if info.step == start_step and not active['on'] and not info.last:
            jax.profiler.start_trace(f'{logdir}/process_{jax.process_index()}')
            active['on'] = True
        elif active['on'] and (info.step >= start_step + num_steps or info.last):
            jax.profiler.stop_trace()
            active['on'] = False
            log.info('profile of steps %d-%d written to %s', start_step + 1, info.step, logdir)

    return Hook(profile, every=1, at_end=True)
