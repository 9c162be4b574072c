"""Instruction tuning as a `Task` on the shared harness: the pretrained LM, its loss and evals
(`cm3jax.lm.task`), on a task mixture (`cm3jax.sft.data`) instead of pretraining documents.

    cm3jax train --config=configs/sft.py:shapes --init_from=out/quickstart/lm --workdir=runs/sft

The model is the pretrained one's (`with_pretrained` copies its ``model`` config from
``--init_from``); the optimizer starts fresh (`cm3jax.train.run`). With ``data.dir`` empty the
Shapes task mixture is prepared into ``WORKDIR/sft_data`` (held-out examples in
``WORKDIR/sft_eval``) with the pretrained run's tokenizers, once: a resumed run reuses it.
Instruction files (``data.files``) are prepared alongside.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
from ml_collections import ConfigDict

from cm3jax import params as params_lib
from cm3jax.data import cm3, prepare as data_prepare
from cm3jax.errors import ConfigError
from cm3jax.lm import task as lm_task
from cm3jax.model import grow
from cm3jax.sft import data as sft_data, mixture, prepare, tasks
from cm3jax.train.run import Env, Task


def with_pretrained(config, init_from: str | None) -> ConfigDict:
    """``config`` with the ``model`` of the pretrained run it fine-tunes (and ``init_from``
    recorded); ``model.max_len`` may grow by ``config.max_len`` for RoPE models, whose
    parameters do not depend on it, and ``model.num_layers`` by ``config.grow_layers`` (new
    blocks that start as the identity, `cm3jax.model.grow`). The pretrained run's caption
    dropout is kept too: sampling reads it to know the unconditional stream's token."""
    source = init_from or config.get('init_from', '')
    if not source:
        raise ConfigError('SFT fine-tunes a pretrained model: give --init_from=RUN (a `cm3jax train` run on '
                          'prepared data, e.g. out/quickstart/lm, or a converted Chameleon directory)')
    path = pathlib.Path(source) / 'config.json'
    if not path.is_file():
        raise ConfigError(f'--init_from={source}: {path} is missing; point it at a `cm3jax train` workdir or a '
                          f'`cm3jax convert chameleon` directory')
    pretrained = json.loads(path.read_text())
    if pretrained.get('task') not in ('lm', 'sft'):
        raise ConfigError(f'--init_from={source} trained task={pretrained.get("task")!r}, not a language model')
    config = ConfigDict(config.to_dict())
    config.init_from = str(source)
    model = pretrained['model']
    if isinstance(model.get('image_ids'), list):  # JSON's list back to the presets' tuple
        model['image_ids'] = tuple(model['image_ids'])
    config.model = ConfigDict(model)
    config.data.caption_dropout = float(pretrained.get('data', {}).get('caption_dropout', 0.0))
    if config.get('max_len', 0):
        if config.max_len != model['max_len'] and model['position'] != 'rope':
            raise ConfigError(f'max_len={config.max_len}: only a RoPE model can change its context (this one has '
                              f'{model["position"]} positions of {model["max_len"]}); leave max_len=0')
        config.model.max_len = config.max_len
    extra = config.get('grow_layers', 0)
    if not isinstance(extra, int) or extra < 0:
        raise ConfigError(f'grow_layers={extra!r}: give how many new blocks to add (an int >= 0)')
    config.model.num_layers = model['num_layers'] + extra
    return config


def restore_pretrained(env: Env, path: str, target, step: int | None):
    """The pretrained params (`cm3jax.train.run.Task.init_from`); with ``grow_layers`` > 0 they
    are restored into the pretrained depth and placed among fresh identity blocks."""
    extra = env.config.get('grow_layers', 0)
    if not extra:
        return params_lib.restore(path, target, step)
    old = env.config.model.num_layers - extra
    pretrained = params_lib.restore(path, grow.shrunk(target, old), step)
    fresh, _ = params_lib.init_sharded(lambda rng: lm_task.init(env, rng), env.mesh, env.rules,
                                       jax.random.key(env.config.seed), target=target)
    env.say(f'grew {old} pretrained blocks to {old + extra}: ' + ' '.join(grow.placement(old, extra)))
    return jax.jit(grow.grow, out_shardings=params_lib.shardings_of(target))(pretrained, fresh)


def data_config(config, seed: int) -> sft_data.SFTDataConfig:
    d, t = config.data, config.train
    return sft_data.SFTDataConfig(
        seq_len=t.seq_len, batch=t.batch, weights=mixture.parse_weights(d.weights), seed=seed,
        min_rate=d.min_rate, max_rate=d.max_rate, loss=d.loss,
        cm3=cm3.CM3Config(rate=d.cm3_rate, min_spans=d.cm3_min_spans, max_spans=d.cm3_max_spans),
        condition_dropout=d.condition_dropout)


def check_vocab(config, vocab, where: str) -> None:
    """What the mixture and loss need of the vocab: CM3 sentinels (the loss 'cm3', VQA's infill
    form) and ``<mask>`` (condition dropout); Chameleon's layout has neither."""
    d = config.data
    if not vocab.sentinels and (d.loss == 'cm3' or 'vqa' in mixture.parse_weights(d.weights)):
        raise ConfigError(f'{where}\'s vocab has no CM3 sentinels (Chameleon\'s layout): train with '
                          f'--config.data.loss=prompt, and without vqa, whose answer needs the infill form')
    if vocab.mask is None and d.condition_dropout:
        raise ConfigError(f'{where}\'s vocab has no <mask> to drop conditions into: set '
                          f'--config.data.condition_dropout=0')
    if d.loss == 'cm3' and d.cm3_max_spans + 1 > len(vocab.sentinels):
        raise ConfigError(f'data.cm3_max_spans={d.cm3_max_spans} plus the answer span exceeds the '
                          f'{len(vocab.sentinels)} sentinels of {where}\'s vocab: lower it')


def ensure_data(config, workdir: pathlib.Path, say) -> None:
    """Prepare the mixture's examples (once) when ``data.dir`` is empty; sets ``data.dir`` and
    ``data.eval_dir`` to where they are (no held-out set when ``data.eval_examples`` is 0)."""
    d = config.data
    if d.dir:
        return
    weights = mixture.parse_weights(d.weights)
    for name in weights:
        tasks.check_task(name)
    d.dir, d.eval_dir = str(workdir / 'sft_data'), str(workdir / 'sft_eval') if d.eval_examples else ''
    if all((pathlib.Path(p) / data_prepare.MANIFEST).exists() for p in (d.dir, d.eval_dir) if p):
        return
    if jax.process_index() != 0:
        raise ConfigError(f'{d.dir} is not prepared; prepare it on one host first (run once with one process)')
    tok = prepare.tokenizers_of(config.init_from)
    check_vocab(config, tok.vocab, config.init_from)  # before any preparing
    world = tasks.shapes.ShapesConfig(**d.world.to_dict())
    side = tok.vq_cfg.resolution
    if world.canvas != side and (d.shapes_examples or d.eval_examples):
        raise ConfigError(f'data.world.canvas={world.canvas} but the pretrained image tokenizer takes {side}x{side}: '
                          f'set --config.data.world.canvas={side}')
    train = prepare.shapes_sources(world, config.seed, dict.fromkeys(weights, d.shapes_examples))
    if d.shapes_examples:
        say(f'sft data: preparing {d.shapes_examples} Shapes examples per task ({", ".join(weights)}) with the '
            f'tokenizers of {config.init_from}')
    files, unsorted = prepare.jsonl_sources([f.strip() for f in str(d.files).split(',') if f.strip()], side)
    for task, srcs in files.items():
        train.setdefault(task, []).extend(srcs)
    if unsorted.skipped:
        say(f'sft data: {unsorted.report()}')
    cfg = data_prepare.PrepareConfig(shard_size=1024, batch=256, progress=config.train.progress)
    prepare.prepare_tasks(d.dir, train, tok, cfg, unsorted)
    if d.eval_dir:
        held = prepare.shapes_sources(world, config.seed, dict.fromkeys(weights, d.eval_examples), 'validation')
        prepare.prepare_tasks(d.eval_dir, held, tok, cfg)


def build(env: Env) -> lm_task.LM:
    config = env.config
    for field in ('loss', 'weights', 'condition_dropout'):
        if field not in config.data:
            raise ConfigError(f'data.{field} is missing: start from configs/sft.py')
    data_config(config, config.seed)  # a bad mixture fails before any preparing
    ensure_data(config, env.workdir, env.say)
    lm = lm_task.build(env)
    check_vocab(config, lm.vocab, config.data.dir)
    return lm


def _data(env: Env, data_dir: str, seed: int) -> sft_data.SFTData:
    return sft_data.SFTData(data_dir, env.model.vocab, data_config(env.config, seed),
                            process_index=jax.process_index(), process_count=jax.process_count())


def train_data(env: Env) -> sft_data.SFTData:
    data = _data(env, env.config.data.dir, env.config.seed)
    env.say(f'sft data: {data.num_documents} examples in {env.config.data.dir}; mixture '
            + ', '.join(f'{t} {r:.1%}' for t, r in data.rates.items()) + f'; loss {env.config.data.loss}')
    return data


def evals(env: Env, writer) -> list:
    """The LM's held-out loss and progress line, on the mixture's held-out examples."""
    d, t = env.config.data, env.config.train

    def batches():
        held = _data(env, d.eval_dir or d.dir, env.config.seed + 1)
        return (env.global_batch(next(held)) for _ in range(t.eval_batches))
    return lm_task.evals(env, writer, batches)


def task(config) -> Task:
    """SFT for `cm3jax.train.run.run` (``config.task == 'sft'``; configs/sft.py): the LM's Task
    on the mixture's data."""
    return dataclasses.replace(lm_task.task(config), name='sft', build=build, train_data=train_data, evals=evals,
                               init_from=restore_pretrained)
