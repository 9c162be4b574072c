"""The language model's `Task`: the transformer, the LM loss and its data, for `cm3jax.train.run`.

Data (``config.data``): with ``data.dir`` set, shards written by `cm3jax prepare`, laid out,
CM3-masked and packed on the fly (`cm3jax.data.pipeline`; held-out shards in ``data.eval_dir``),
with retrieved documents put first when ``data.retrieved`` says so; with ``data.dir`` empty, the
synthetic copy / reverse / sort / add task (`cm3jax.data.synthetic`), a loop example with known
answers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from cm3jax.data import augment, cm3, documents, pipeline, prepare, synthetic
from cm3jax.errors import ConfigError
from cm3jax.lm import config as lm_config
from cm3jax.model import transformer
from cm3jax.train import loop, metrics as metrics_lib, step as step_lib
from cm3jax.train.loss import token_stats
from cm3jax.train.run import Env, Task
from cm3jax.vocab import Vocab


def lm_loss_fn(model: transformer.Transformer, z_loss: float = 0.0, group_fn=None) -> step_lib.LossFn:
    """Next-token loss over a batch {'inputs', 'targets': Int[B, T], optional 'weights':
    Float[B, T], 'segment_ids': Int[B, T]}; ``group_fn(batch) -> {name: Bool[B, T]}`` adds
    per-group loss and accuracy (text vs image tokens)."""
    def loss_fn(params, batch, rng):
        del rng  # no dropout (docs/paper.md, "Training")
        logits = model.apply({'params': params}, batch['inputs'], batch.get('segment_ids'), batch.get('positions'))
        groups = group_fn(batch) if group_fn else None
        return token_stats(logits, batch['targets'], batch.get('weights'), z_loss, groups)
    return loss_fn


def flops_per_token(cfg: transformer.TransformerConfig, seq_len: int) -> float:
    return metrics_lib.transformer_flops_per_token(
        num_layers=cfg.num_layers, d_model=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim, gated_mlp=cfg.mlp == 'swiglu',
        vocab_size=cfg.padded_vocab_size, seq_len=seq_len)


def validate(config) -> None:
    """`cm3jax.lm.config.validate` plus the train and data fields (the batch is `run`'s to check)."""
    lm_config.validate(config)
    t, d = config.train, config.data
    if t.seq_len > config.model.max_len:
        raise ConfigError(f'train.seq_len={t.seq_len} exceeds model.max_len={config.model.max_len}')
    if d.eval_dir and not d.dir:
        raise ConfigError(f'data.eval_dir={d.eval_dir!r} needs data.dir (the training shards it is held out from)')
    if not d.dir and synthetic.VOCAB_SIZE > config.model.vocab_size:
        raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the synthetic '
                          f'task\'s {synthetic.VOCAB_SIZE} ids')


def synthetic_data(config, seed: int) -> tuple[synthetic.SyntheticTask, synthetic.SyntheticBatches]:
    d, t = config.data, config.train
    tasks = tuple(x.strip() for x in d.tasks.split(',') if x.strip())
    task = synthetic.SyntheticTask(tasks, d.min_len, d.max_len)
    return task, synthetic.SyntheticBatches(task, t.batch, t.seq_len, seed, jax.process_index(), jax.process_count())


def pipeline_config(config, seed: int) -> pipeline.PipelineConfig:
    d, t = config.data, config.train
    return pipeline.PipelineConfig(
        seq_len=t.seq_len, batch=t.batch, seed=seed,
        layout=documents.LayoutConfig(text_first=d.text_first, caption_dropout=d.caption_dropout),
        cm3=cm3.CM3Config(rate=d.cm3_rate, min_spans=d.cm3_min_spans, max_spans=d.cm3_max_spans),
        query_weight=d.query_weight, retrieved_weight=d.retrieved_weight)


def retrieval_augment(config, data_dir: str, vocab) -> augment.RetrievalAugment | None:
    """The augmentation hook of ``config.data.retrieved`` ('' = none) for the documents of
    ``data_dir``: its neighbour lists, retrieving documents of ``data.dir`` (the memory bank)."""
    d = config.data
    if not str(d.retrieved).strip():
        return None
    try:
        counts = tuple(int(k) for k in str(d.retrieved).split(','))
        cfg = augment.RetrievalConfig(counts)
    except ValueError as e:
        raise ConfigError(f'data.retrieved={d.retrieved!r}: give counts like "2" or "0,1,2" ({e})')
    layout = documents.LayoutConfig(text_first=d.text_first)
    return augment.RetrievalAugment(d.dir, vocab, cfg, layout, neighbours_dir=data_dir)


class LM(NamedTuple):
    """What `build` gives the rest of the task (``env.model``)."""
    module: transformer.Transformer
    vocab: Vocab | None                      # the prepared data's; None for the synthetic task
    group_fn: Callable[[dict], dict]         # batch -> {name: Bool[B, T]}, the loss's metric groups
    entropy: float | None                    # the synthetic task's unigram entropy (a loss to beat)


def build(env: Env) -> LM:
    config = env.config
    validate(config)
    d = config.data
    cfg = lm_config.transformer_config(config, env.mesh, env.rules)
    if not d.dir:
        task, _ = synthetic_data(config, config.seed)
        entropy = task.unigram_entropy(config.train.seq_len)
        env.say(f'data: synthetic {",".join(task.tasks)}; unigram entropy {entropy:.3f} nats')
        lm = LM(transformer.Transformer(cfg), None, lambda b: {'answer': b['answer']}, entropy)
    else:
        manifest = prepare.read_manifest(d.dir)
        vocab = Vocab.from_dict(manifest['vocab'])
        if vocab.size > config.model.vocab_size:
            raise ConfigError(f'{d.dir} was prepared for a vocab of {vocab.size} ids but model.vocab_size is '
                              f'{config.model.vocab_size}: set --config.model.vocab_size={vocab.size}')
        if cfg.image_positions:
            codes = (vocab.image_offset, vocab.image_offset + vocab.num_image_codes)
            if cfg.image_ids != codes:
                raise ConfigError(f'model.image_ids={cfg.image_ids} are not the image codes of {d.dir}\'s vocab: '
                                  f'set --config.model.image_ids="{codes}"')
            per_image = math.prod(manifest.get('image_shape') or (0,))  # text-only data has none
            if cfg.image_positions < per_image:
                raise ConfigError(f'model.image_positions={cfg.image_positions} is fewer than the {per_image} codes '
                                  f'of {d.dir}\'s images: set --config.model.image_positions={per_image}')
        if d.cm3_max_spans > len(vocab.sentinels):
            raise ConfigError(f'data.cm3_max_spans={d.cm3_max_spans} exceeds the {len(vocab.sentinels)} '
                              f'sentinels of {d.dir}\'s vocab: lower it (or prepare with more)')
        group_fn = lambda b: {k: v for k, v in vocab.groups(b['targets']).items() if k != 'special'}  # noqa: E731
        lm = LM(transformer.Transformer(cfg), vocab, group_fn, None)
    env.say(f'model: {cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size} '
            f'(padded {cfg.padded_vocab_size})')
    return lm


def init(env: Env, rng: jax.Array):
    example = jnp.zeros((env.batch_shards, 8), jnp.int32)
    return env.model.module.init(rng, example)['params']


def _pipeline(config, data_dir: str, seed: int, vocab: Vocab) -> pipeline.Pipeline:
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    # held-out documents retrieve from their own neighbour lists (built against the training bank)
    return pipeline.Pipeline(data_dir, vocab, pipeline_config(config, seed), **where,
                             augment=retrieval_augment(config, data_dir, vocab))


def train_data(env: Env) -> loop.DataIterator:
    config = env.config
    if env.model.vocab is None:
        return synthetic_data(config, config.seed)[1]
    local = _pipeline(config, config.data.dir, config.seed, env.model.vocab)
    env.say(f'data: {local.num_documents} documents in {config.data.dir} (this process); vocab '
            f'{env.model.vocab.size} ids ({env.model.vocab.num_image_codes} image codes)')
    return local


def eval_batches(env: Env) -> Callable[[], Any]:
    """() -> the same held-out global batches at every eval: another seed's stream from its start
    (held-out shards when ``data.eval_dir`` is set, else the training shards in another order)."""
    config = env.config
    t, d = config.train, config.data

    def batches():
        if env.model.vocab is None:
            held_out = synthetic_data(config, config.seed + 1)[1]
        else:
            held_out = _pipeline(config, d.eval_dir or d.dir, config.seed + 1, env.model.vocab)
        return (env.global_batch(next(held_out)) for _ in range(t.eval_batches))
    return batches


def progress_line(metrics, entropy: float | None) -> str:
    line = f'loss {float(metrics["loss"]):.3f}'
    if 'answer/accuracy' in metrics:
        return line + f', answer accuracy {float(metrics["answer/accuracy"]):.1%} (unigram entropy {entropy:.3f})'
    return line + ''.join(f', {g} nll {float(metrics[f"{g}/nll"]):.3f}' for g in ('text', 'image')
                          if f'{g}/nll' in metrics)


def loss(env: Env) -> step_lib.LossFn:
    return lm_loss_fn(env.model.module, env.config.loss.z_loss, group_fn=env.model.group_fn)


def evals(env: Env, writer: metrics_lib.MetricWriter, batches: Callable[[], Any] | None = None) -> list[loop.Hook]:
    """The held-out loss every ``train.eval_every`` steps, and a progress line; ``batches``: () ->
    the held-out global batches (default `eval_batches`; SFT gives its mixture's)."""
    every = env.config.train.eval_every
    if not every:
        return []
    eval_step = jax.jit(step_lib.make_eval_step(loss(env)))
    line = lambda info: env.say(f'step {info.step}: {progress_line(info.metrics, env.model.entropy)}')  # noqa: E731
    return [loop.eval_hook(eval_step, batches or eval_batches(env), writer, every), loop.Hook(line, every)]


def summary(env: Env, scalars: dict) -> tuple[dict, str]:
    out = dict(scalars)
    if env.model.entropy is not None:
        out['unigram_entropy'] = env.model.entropy
    line = ', '.join(f'{k} {scalars[k]:.3f}' for k in ('loss', 'eval/loss', 'answer/accuracy', 'text/nll',
                                                       'image/nll') if k in scalars)
    return out, line or 'nothing logged'


def throughput(env: Env) -> tuple[int, float]:
    t = env.config.train
    tokens = t.batch * t.seq_len
    return tokens, flops_per_token(env.model.module.cfg, t.seq_len) * tokens


def task(config) -> Task:
    """The LM for `cm3jax.train.run.run` (``config.task == 'lm'``; configs/lm.py)."""
    del config  # everything is read from env.config once the mesh exists
    return Task(name='lm', build=build, init=init, train_data=train_data, loss=loss, evals=evals,
                summary=summary, throughput=throughput, muon_dims=transformer.muon_dims)
