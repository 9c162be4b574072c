"""`run(config, workdir, task)`: the one harness every trainer goes through.

A model family describes itself as a `Task` (what to build, how to initialise, the loss or a
whole step, its data, its evals and its summary line); `run` does everything else, the same way
for all of them, top to bottom:

  distributed init -> mesh and rules -> batch check -> build -> data -> state (resume, else
  init_from, else init) -> config.json -> step -> hooks -> `loop.train` -> close -> summary

``config.json`` is written only once the state is settled: a command refused on the way (a config
that does not fit the run's checkpoints, say) leaves the workdir as it was. Resuming walks back
past damaged checkpoint steps to the newest one that restores (`Checkpointer.resume`).

The workdir holds ``config.json``, ``checkpoints/``, ``metrics.jsonl`` and ``tensorboard/`` (plus
what the task writes); running the same command again resumes from the latest checkpoint, and a
finished run returns its summary without training. SIGTERM at any point saves at the next step
boundary and returns normally.

Generic: this module knows no model. `cm3jax.lm`, `cm3jax.vq` and `cm3jax.retrieval` each
expose ``task(config)``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cm3jax import params as params_lib, parallel
from cm3jax.errors import ConfigError
from cm3jax.train import checkpoint, loop, metrics as metrics_lib, optim, state as state_lib, step as step_lib


@dataclasses.dataclass(frozen=True)
class Env:
    """What the harness has built, handed to every callable of a `Task`.

    model: whatever ``task.build`` returned (None until then): the family's modules and the
    static facts the other callables share (a vocab, a tokenizer, a model config).
    """
    config: Any
    workdir: pathlib.Path
    mesh: Mesh
    rules: parallel.Rules
    batch_axes: tuple[str | None, ...]
    model: Any = None

    @property
    def batch_shards(self) -> int:
        """How many ways the mesh splits the batch."""
        return parallel.axis_size(self.mesh, self.rules, 'act_batch')

    def global_batch(self, local_batch):
        """This host's rows -> global arrays split over the batch axes."""
        return parallel.global_batch(local_batch, self.mesh, self.rules, self.batch_axes)

    def say(self, line: str) -> None:
        """Print on process 0, above the progress bar."""
        if jax.process_index() == 0:
            tqdm.write(line)


def _no_hooks(env: Env, writer: metrics_lib.MetricWriter) -> list[loop.Hook]:
    return []


def _plain_summary(env: Env, scalars: dict) -> tuple[dict, str]:
    return scalars, f'loss {scalars.get("loss", float("nan")):.3f}'


def _restore(env: Env, path: str, target, step: int | None = None):
    return params_lib.restore(path, target, step)


def _per_step(env: Env) -> tuple[int, float]:
    return env.config.train.batch, 0.0


@dataclasses.dataclass(frozen=True)
class Task:
    """A model family, as `run` needs it. Every callable takes the `Env` first.

    name: shown on the progress bar and in messages ('lm', 'tokenizer', 'retriever').
    build(env) -> model: validates what depends on the mesh, builds the modules and writes what
      the family's loader needs next to the checkpoints; the result is ``env.model`` from then on.
    init(env, rng) -> params: a pytree whose leaves carry logical axis names (traced: it runs
      under ``eval_shape`` and ``jit``, never eagerly).
    train_data(env) -> `cm3jax.train.loop.DataIterator` of this host's batches (numpy).
    loss(env) -> ``loss_fn(params, batch, rng) -> (loss_sum, stats)`` for `step.make_train_step`;
      or step(env, optimizer) -> a whole ``step(state, batch, rng) -> (state, metrics)`` for
      families whose updates are not all gradients (give exactly one of the two).
    extra_state(env, params) -> {name: array}: state beyond step/params/opt, replicated and
      checkpointed (traced).
    evals(env, writer) -> hooks that evaluate and log (none when the config turns evals off);
      eval_at_start runs them once at step 0, before training.
    summary(env, scalars) -> (summary dict, line): from the latest logged scalars (and 'step').
    batch_axes: logical names of a batch leaf's leading axes.
    throughput(env) -> (tokens per step, model FLOPs per step); FLOPs > 0 turns MFU on.
    decay_mask(params) -> which parameters weight decay applies to.
    muon_dims(params) -> `optax.contrib.MuonDimensionNumbers` of the matrices Muon may train
      (None elsewhere); None: the task cannot use ``optim.name='muon'``.
    init_from(env, path, target, step) -> params for a fresh run started from ``path`` (its
      checkpoint ``step``; None: the latest).
    """
    name: str
    build: Callable[[Env], Any]
    init: Callable[[Env, jax.Array], Any]
    train_data: Callable[[Env], loop.DataIterator]
    loss: Callable[[Env], step_lib.LossFn] | None = None
    step: Callable[[Env, optax.GradientTransformation], Callable] | None = None
    extra_state: Callable[[Env, Any], dict] | None = None
    evals: Callable[[Env, metrics_lib.MetricWriter], list[loop.Hook]] = _no_hooks
    eval_at_start: bool = False
    summary: Callable[[Env, dict], tuple[dict, str]] = _plain_summary
    batch_axes: tuple[str | None, ...] = ('act_batch', 'act_len')
    throughput: Callable[[Env], tuple[int, float]] = _per_step
    decay_mask: Callable[[Any], Any] = optim.decay_mask
    muon_dims: Callable[[Any], Any] | None = None
    init_from: Callable[[Env, str, Any, int | None], Any] = _restore

    def __post_init__(self):
        if (self.loss is None) == (self.step is None):
            raise TypeError(f'Task {self.name!r}: give exactly one of loss and step')


class GlobalBatches:
    """Host-local batches -> global arrays (`Env.global_batch`); keeps the wrapped iterator's
    get_state / set_state, and its ``report()`` of skipped records when it has one."""

    def __init__(self, local: loop.DataIterator, env: Env):
        self.local, self.env = local, env

    def __iter__(self):
        return self

    def __next__(self):
        return self.env.global_batch(next(self.local))

    def get_state(self) -> dict:
        return self.local.get_state()

    def set_state(self, state: dict) -> None:
        self.local.set_state(state)


def check_batch(config, env: Env) -> None:
    """``train.batch`` must split over the batch shards, the microbatches and the processes."""
    t = config.train
    if t.microbatches < 1:
        raise ConfigError(f'train.microbatches={t.microbatches} must be >= 1 (1 = no accumulation)')
    unit = env.batch_shards * t.microbatches
    if t.batch % unit or t.batch % jax.process_count():
        raise ConfigError(f'train.batch={t.batch} must be a multiple of the {env.batch_shards} batch shards x '
                          f'train.microbatches={t.microbatches} (= {unit}) and of the {jax.process_count()} '
                          f'processes')


def run(config, workdir: str | pathlib.Path, task: Task, *, init_from: str | None = None,
        init_step: int | None = None) -> dict[str, float]:
    """Train (or resume) ``task`` in ``workdir``; ``init_from``: a run (or weights the task can
    read) whose parameters start a fresh run with a fresh optimizer (``init_step``: its
    checkpoint step; None: the latest). Returns the summary dict (also printed): the latest
    logged scalars, 'step', and what the task adds."""
    with loop.Preemption() as preemption:
        return _run(config, pathlib.Path(workdir).absolute(), task, init_from, init_step, preemption)


def _run(config, workdir: pathlib.Path, task: Task, init_from: str | None, init_step: int | None,
         preemption) -> dict[str, float]:
    parallel.maybe_initialize_distributed()
    t = config.train

    # ---- Mesh ----
    mesh = parallel.mesh_from_config(config.mesh)
    env = Env(config, workdir, mesh, parallel.rules_from_config(config), tuple(task.batch_axes))
    check_batch(config, env)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    env.say(f'devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es); '
            f'mesh {dict(mesh.shape)}; workdir {workdir}')

    # ---- Model and input pipeline ----
    env = dataclasses.replace(env, model=task.build(env))
    data = GlobalBatches(task.train_data(env), env)

    # ---- State: resume this run, else start from another's params, else init ----
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config(config.optim, t.steps), mask=task.decay_mask,
                                     muon_dims=task.muon_dims)
    rng = jax.random.key(config.seed)
    init_fn = lambda rng: task.init(env, rng)  # noqa: E731
    target = state_lib.state_target(params_lib.abstract(init_fn, mesh, env.rules, rng), optimizer, mesh)
    replicated = NamedSharding(mesh, P())
    extra_fn = None
    if task.extra_state is not None:
        extra_fn = jax.jit(lambda p: task.extra_state(env, p), out_shardings=replicated)
        extra = jax.eval_shape(lambda p: task.extra_state(env, p), target['params'])
        target.update(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), extra))
    ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', every_steps=t.checkpoint_every,
                                   every_seconds=60 * t.checkpoint_minutes, keep=t.keep, use_async=t.async_checkpoint)
    try:
        state = ckpt.resume(target, data)
    except Exception:  # refused (another model, every step damaged): let orbax's threads go
        ckpt.close()
        raise
    for step, why in ckpt.damaged:
        env.say(f'skipped checkpoint step {step}: {why}')
    if state is not None:
        env.say(f'resumed from step {int(state["step"])} in {ckpt.directory}')
    else:
        if init_from:
            params = task.init_from(env, init_from, target['params'], init_step)
            step_name = 'the latest step' if init_step is None else f'step {init_step}'
            env.say(f'initialised params from {init_from} ({step_name}); fresh optimizer')
        else:
            params, _ = params_lib.init_sharded(init_fn, mesh, env.rules, rng, target=target['params'])
        state = state_lib.fresh_optimizer(params, optimizer, target)
        if extra_fn is not None:
            state.update(jax.block_until_ready(extra_fn(state['params'])))
    if jax.process_index() == 0:  # only now: a refused command leaves the workdir as it was
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    env.say(f'{task.name}: {parallel.num_params(state["params"]):,} params; replicated large-param bytes '
            f'{parallel.check_sharding(state["params"]):.0%}')

    # ---- Update step ----
    if task.step is not None:
        step = task.step(env, optimizer)
    else:
        step = step_lib.make_train_step(task.loss(env), optimizer, t.microbatches)
    batch_sharding = parallel.logical_sharding(mesh, env.rules, env.batch_axes)
    train_step = step_lib.jit_train_step(step, params_lib.shardings_of(target), batch_sharding)

    # ---- Hooks: metrics, evals, profile ----
    writer = metrics_lib.MetricWriter(workdir)
    tokens, flops = task.throughput(env)
    peak = 0.0
    if flops and writer.enabled:
        peak, peak_source = metrics_lib.peak_flops(t.get('peak_flops', 0.0))
        env.say(f'{flops / tokens / 1e6:.2f} MFLOPs/token; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})')
    hooks = [loop.metrics_hook(writer, t.log_every, tokens_per_step=tokens, flops_per_step=flops, peak_flops=peak)]
    evals = task.evals(env, writer)
    hooks += evals
    if t.get('profile_start', 0):
        hooks.append(loop.profile_hook(str(workdir / 'profile'), t.profile_start, t.profile_steps))

    # ---- Train ----
    with jax.set_mesh(mesh), nn.logical_axis_rules(env.rules):
        if task.eval_at_start and int(jax.device_get(state['step'])) == 0:
            for hook in evals:  # the untrained model: where each curve starts
                hook.fn(loop.StepInfo(0, state, {}, 0.0))
        state, _ = loop.train(state=state, train_step=train_step, data=data, num_steps=t.steps,
                              rng=jax.random.key(config.seed + 1), hooks=hooks, checkpointer=ckpt,
                              tokens_per_step=tokens if flops else 0, progress=t.progress, desc=task.name,
                              preemption=preemption)
    ckpt.close()
    writer.close()

    # ---- Summary ----
    scalars = {**metrics_lib.latest(workdir), 'step': int(jax.device_get(state['step']))}
    summary, line = task.summary(env, scalars)
    if hasattr(data.local, 'report'):
        env.say(f'data: {data.local.report()}')
    env.say(f'{task.name} step {summary["step"]} of {t.steps}: {line}; checkpoints, metrics.jsonl and '
            f'tensorboard/ in {workdir}')
    return summary
