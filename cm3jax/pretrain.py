"""`cm3jax train`: language-model training on the mesh, read top to bottom.

Wires the transformer, the LM loss and a data source into the generic pieces of
`cm3jax.train` (state, step, loop, checkpoint, metrics). The workdir holds ``checkpoints/``,
``metrics.jsonl``, ``tensorboard/`` and ``config.json``; running the same command again
resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm import tqdm

from cm3jax import configuration, parallel
from cm3jax.data import augment, cm3, documents, pipeline, prepare, synthetic
from cm3jax.model import transformer
from cm3jax.train import checkpoint, loop, metrics as metrics_lib, optim, state as state_lib, step as step_lib
from cm3jax.train.loss import token_stats
from cm3jax.vocab import Vocab

log = logging.getLogger(__name__)


def lm_loss_fn(model: transformer.Transformer, z_loss: float = 0.0, group_fn=None) -> step_lib.LossFn:
    """Next-token loss over a batch {'inputs', 'targets': Int[B, T], optional 'weights':
    Float[B, T], 'segment_ids': Int[B, T]}; ``group_fn(batch) -> {name: Bool[B, T]}`` adds
    per-group loss and accuracy (text vs image tokens)."""
    def loss_fn(params, batch, rng):
        del rng  # no dropout (PAPER.md section 4)
        logits = model.apply({'params': params}, batch['inputs'], batch.get('segment_ids'), batch.get('positions'))
        groups = group_fn(batch) if group_fn else None
        return token_stats(logits, batch['targets'], batch.get('weights'), z_loss, groups)
    return loss_fn


def _progress_line(metrics, source: 'Data') -> str:
    line = f'loss {float(metrics["loss"]):.3f}'
    if 'answer/accuracy' in metrics:
        return line + (f', answer accuracy {float(metrics["answer/accuracy"]):.1%} '
                       f'(unigram entropy {source.entropy:.3f})')
    return line + ''.join(f', {g} nll {float(metrics[f"{g}/nll"]):.3f}' for g in ('text', 'image')
                          if f'{g}/nll' in metrics)


def flops_per_token(cfg: transformer.TransformerConfig, seq_len: int) -> float:
    return metrics_lib.transformer_flops_per_token(
        num_layers=cfg.num_layers, d_model=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim, gated_mlp=cfg.mlp == 'swiglu',
        vocab_size=cfg.padded_vocab_size, seq_len=seq_len)


class GlobalBatches:
    """Host-local numpy batches -> global arrays sharded on the batch axes; keeps the
    wrapped iterator's get_state / set_state."""

    def __init__(self, local, mesh, rules):
        self.local, self.mesh, self.rules = local, mesh, rules

    def __iter__(self):
        return self

    def __next__(self):
        return parallel.global_batch(next(self.local), self.mesh, self.rules)

    def get_state(self) -> dict:
        return self.local.get_state()

    def set_state(self, state: dict) -> None:
        self.local.set_state(state)


def validate(config, mesh) -> None:
    """`configuration.validate` plus the train fields that depend on the mesh."""
    configuration.validate(config)
    t = config.train
    if t.seq_len > config.model.max_len:
        raise configuration.ConfigError(f'train.seq_len={t.seq_len} exceeds model.max_len={config.model.max_len}')
    if config.data.source not in ('synthetic', 'prepared'):
        raise configuration.ConfigError(f'data.source={config.data.source!r} is unknown; choose "synthetic" or '
                                        f'"prepared" (shards written by `cm3jax prepare`, in data.dir)')
    if config.data.source == 'prepared' and not config.data.dir:
        raise configuration.ConfigError('data.source="prepared" needs data.dir=DIR (the output of `cm3jax prepare`)')
    if t.microbatches < 1:
        raise configuration.ConfigError(f'train.microbatches={t.microbatches} must be >= 1 (1 = no accumulation)')
    shards = parallel.axis_size(mesh, parallel.rules_from_config(config), 'act_batch')
    unit = shards * t.microbatches
    if t.batch % unit or t.batch % jax.process_count():
        raise configuration.ConfigError(
            f'train.batch={t.batch} must be a multiple of the {shards} batch shards x train.microbatches='
            f'{t.microbatches} (= {unit}) and of the {jax.process_count()} processes')
    if config.data.source == 'synthetic' and synthetic.VOCAB_SIZE > config.model.vocab_size:
        raise configuration.ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the synthetic '
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
        raise configuration.ConfigError(f'data.retrieved={d.retrieved!r}: give counts like "2" or "0,1,2" ({e})')
    layout = documents.LayoutConfig(text_first=d.text_first)
    return augment.RetrievalAugment(d.dir, vocab, cfg, layout, neighbours_dir=data_dir)


class Data(NamedTuple):
    train: Any              # host-local DataIterator
    eval_batches: Any       # () -> iterator of global batches
    group_fn: Any           # batch -> {name: Bool[B, T]}, the loss's metric groups
    describe: str
    entropy: float | None   # the synthetic task's unigram entropy (a loss to beat)


def make_data(config, mesh, rules) -> Data:
    """The training stream and held-out batches of ``config.data``."""
    t, d = config.train, config.data
    if d.source == 'synthetic':
        task, local = synthetic_data(config, config.seed)

        def eval_batches():  # the same held-out batches at every eval: another seed's stream from its start
            held_out = synthetic_data(config, config.seed + 1)[1]
            return (parallel.global_batch(next(held_out), mesh, rules) for _ in range(t.eval_batches))

        entropy = task.unigram_entropy(t.seq_len)
        return Data(local, eval_batches, lambda b: {'answer': b['answer']},
                    f'synthetic {",".join(task.tasks)}; unigram entropy {entropy:.3f} nats', entropy)
    vocab = Vocab.from_dict(prepare.read_manifest(d.dir)['vocab'])
    if vocab.size > config.model.vocab_size:
        raise configuration.ConfigError(f'{d.dir} was prepared for a vocab of {vocab.size} ids but model.vocab_size '
                                        f'is {config.model.vocab_size}: set --config.model.vocab_size={vocab.size}')
    if d.cm3_max_spans > len(vocab.sentinels):
        raise configuration.ConfigError(f'data.cm3_max_spans={d.cm3_max_spans} exceeds the {len(vocab.sentinels)} '
                                        f'sentinels of {d.dir}\'s vocab: lower it (or prepare with more)')
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    local = pipeline.Pipeline(d.dir, vocab, pipeline_config(config, config.seed), **where,
                              augment=retrieval_augment(config, d.dir, vocab))

    def eval_batches():  # held-out shards if given, else the training shards in another order
        # held-out documents retrieve from their own neighbour lists (built against the training bank)
        held_out = pipeline.Pipeline(d.eval_dir or d.dir, vocab, pipeline_config(config, config.seed + 1), **where,
                                     augment=retrieval_augment(config, d.eval_dir or d.dir, vocab))
        return (parallel.global_batch(next(held_out), mesh, rules) for _ in range(t.eval_batches))

    group_fn = lambda b: {k: v for k, v in vocab.groups(b['targets']).items() if k != 'special'}
    return Data(local, eval_batches, group_fn, f'{local.num_documents} documents in {d.dir} (this process); '
                f'vocab {vocab.size} ids ({vocab.num_image_codes} image codes)', None)


def train(config, workdir: str, init_from: str | None = None) -> dict[str, float]:
    """Train (or resume) in ``workdir``; ``init_from``: another workdir whose latest params
    start a fresh run (fine-tuning). Returns a summary of the run (also printed).

    SIGTERM at any point from here on saves at the next step boundary and returns normally.
    """
    with loop.Preemption() as preemption:
        return _train(config, workdir, init_from, preemption)


def _train(config, workdir: str, init_from: str | None, preemption: loop.Preemption) -> dict[str, float]:
    parallel.maybe_initialize_distributed()
    workdir = pathlib.Path(workdir).absolute()
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say_line = tqdm.write if jax.process_index() == 0 else say  # above the progress bar
    t = config.train

    # ---- Mesh ----
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config)
    validate(config, mesh)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    say(f'devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es); '
        f'mesh {dict(mesh.shape)}; workdir {workdir}')

    # ---- Input pipeline ----
    source = make_data(config, mesh, rules)
    data = GlobalBatches(source.train, mesh, rules)

    # ---- Model and optimizer ----
    cfg = configuration.transformer_config(config, mesh, rules)
    model = transformer.Transformer(cfg)
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config(config.optim, t.steps))
    init_args = (jax.random.key(config.seed), jnp.zeros((parallel.axis_size(mesh, rules, 'act_batch'), 8), jnp.int32))
    init_fn = lambda rng, x: model.init(rng, x)['params']
    target = state_lib.abstract_state(init_fn, optimizer, mesh, rules, *init_args)

    # ---- Load checkpoint: resume this run, else start from another run's params, else init ----
    ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', every_steps=t.checkpoint_every,
                                   every_seconds=60 * t.checkpoint_minutes, keep=t.keep, use_async=t.async_checkpoint)
    state = ckpt.resume(target, data)
    if state is not None:
        say(f'resumed from step {int(state["step"])} in {ckpt.directory}')
    elif init_from:
        params = checkpoint.restore_params(init_from, target['params'])
        state = state_lib.fresh_optimizer(params, optimizer, target)
        say(f'initialised params from {init_from}; fresh optimizer')
    else:
        state = state_lib.init_state(init_fn, optimizer, mesh, rules, *init_args)
    say(f'model: {parallel.num_params(state["params"]):,} params, {cfg.num_layers} layers, d_model {cfg.d_model}; '
        f'replicated large-param bytes {parallel.check_sharding(state["params"]):.0%}')

    # ---- Update step ----
    loss_fn = lm_loss_fn(model, config.loss.z_loss, group_fn=source.group_fn)
    batch_shardings = parallel.logical_sharding(mesh, rules, ('act_batch', 'act_len'))  # every [B, T] leaf
    train_step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, optimizer, t.microbatches),
                                         state_lib.shardings_of(target), batch_shardings)
    eval_step = jax.jit(step_lib.make_eval_step(loss_fn))

    # ---- Hooks: metrics, eval, profile ----
    writer = metrics_lib.MetricWriter(workdir)
    tokens_per_step = t.batch * t.seq_len
    peak, peak_source = metrics_lib.peak_flops(t.peak_flops, cfg.dtype) if writer.enabled else (0.0, '')
    flops = flops_per_token(cfg, t.seq_len)
    hooks = [loop.metrics_hook(writer, t.log_every, tokens_per_step=tokens_per_step,
                               flops_per_step=flops * tokens_per_step, peak_flops=peak)]
    if t.eval_every:
        hooks.append(loop.eval_hook(eval_step, source.eval_batches, writer, t.eval_every))
        hooks.append(loop.Hook(lambda info: say_line(f'step {info.step}: {_progress_line(info.metrics, source)}'),
                               t.eval_every))
    if t.profile_start:
        hooks.append(loop.profile_hook(str(workdir / 'profile'), t.profile_start, t.profile_steps))
    say(f'data: {source.describe}; {flops / 1e6:.2f} MFLOPs/token; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})')

    # ---- Train ----
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, last = loop.train(state=state, train_step=train_step, data=data, num_steps=t.steps,
                                 rng=jax.random.key(config.seed + 1), hooks=hooks, checkpointer=ckpt,
                                 tokens_per_step=tokens_per_step, progress=t.progress, preemption=preemption)
    ckpt.close()
    writer.close()
    summary = {'step': int(jax.device_get(state['step']))}
    if source.entropy is not None:
        summary['unigram_entropy'] = source.entropy
    summary.update({k: float(last[k]) for k in ('loss', 'accuracy', 'answer/accuracy', 'text/nll', 'image/nll')
                    if k in last})
    if hasattr(source.train, 'report'):
        say(source.train.report())
    say(f'step {summary["step"]} of {t.steps}; checkpoints and metrics.jsonl in {workdir}; '
        f'tensorboard --logdir {workdir}/tensorboard')
    return summary
