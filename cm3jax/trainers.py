"""Which `Task` a config trains: ``config.task`` names it.

    from cm3jax import trainers
    trainers.train(config, workdir)    # the LM, SFT, the image tokenizer or the retriever, by config.task

Every trainer goes through `cm3jax.train.run.run`; this table is the one place that knows the
families, so that `cm3jax.train` stays generic.
"""

from __future__ import annotations

from typing import Callable

from cm3jax.errors import ConfigError
from cm3jax.train.run import Task, run


def _lm(config) -> Task:
    from cm3jax.lm.task import task
    return task(config)


def _vq(config) -> Task:
    from cm3jax.vq.train import task
    return task(config)


def _retriever(config) -> Task:
    from cm3jax.retrieval.train import task
    return task(config)


def _sft(config) -> Task:
    from cm3jax.sft.task import task
    return task(config)


TASKS: dict[str, Callable[[object], Task]] = {'lm': _lm, 'vq': _vq, 'retriever': _retriever, 'sft': _sft}
OTHER_CONFIGS = {'prepare': 'cm3jax prepare'}  # configs that are not trainers, and their command


def task_of(config) -> Task:
    """The `Task` ``config.task`` names; a `ConfigError` listing the tasks otherwise."""
    name = config.get('task', None)
    if name in OTHER_CONFIGS:
        raise ConfigError(f'config.task={name!r} is not a trainer; run it with `{OTHER_CONFIGS[name]}`')
    if name not in TASKS:
        raise ConfigError(f'config.task={name!r} is unknown; choose one of {sorted(TASKS)} '
                          f'(configs/lm.py, configs/vq.py, configs/clip.py, configs/sft.py)')
    return TASKS[name](config)


def train(config, workdir: str, init_from: str | None = None, init_step: int | None = None) -> dict[str, float]:
    """Train (or resume) ``config.task`` in ``workdir``; returns the run's summary. ``init_from``
    (else the config's own ``init_from`` field, where it has one) starts a fresh run from those
    parameters, of checkpoint ``init_step`` (None: the latest)."""
    if config.get('task', None) == 'sft':  # SFT trains the pretrained model's own architecture
        from cm3jax.sft.task import with_pretrained
        config = with_pretrained(config, init_from)
    init_from = init_from or config.get('init_from', None) or None
    if init_step is not None and not init_from:
        raise ConfigError(f'--step={init_step} picks the checkpoint step of --init_from=DIR; give --init_from too '
                          f'(a resumed run always continues from its latest good step)')
    return run(config, workdir, task_of(config), init_from=init_from, init_step=init_step)
