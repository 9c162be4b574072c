"""Data-pipeline speed against the train step it feeds (docs/architecture.md: producing data must not cost
more than the step).

Prepares Shapes documents with a tiny random VQ tokenizer, then times, in one run on the same
CPU, (a) the grain pipeline making batches (read, layout, CM3, pack) and (b) the tiny LM's
jitted train step on such batches. Prints one JSON line: pipeline rows/s, the train step's
rows/s as the baseline, and their ratio (> 1: the pipeline keeps up).

    python benchmarks/pipeline_throughput.py [--documents 2000 --batch 16 --seq_len 96]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cm3jax import parallel, text_tokenizer  # noqa: E402
from cm3jax.lm import config as lm_config, task as lm_task  # noqa: E402
from cm3jax.data import pipeline, prepare, sources  # noqa: E402
from cm3jax.model import transformer  # noqa: E402
from cm3jax.train import optim, state as state_lib, step as step_lib  # noqa: E402
from cm3jax.vocab import Vocab  # noqa: E402
from cm3jax.vq import model as vq  # noqa: E402
from configs import lm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--documents', type=int, default=2000)
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--seq_len', type=int, default=96)
    ap.add_argument('--steps', type=int, default=20)
    args = ap.parse_args()

    vq_cfg = vq.VQConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), z_channels=16, embed_dim=8, num_codes=256)
    vq_params = vq.VQGAN(vq_cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    source = sources.make_source({'kind': 'shapes', 'count': args.documents})
    tok = text_tokenizer.train_bpe((d.texts[0] for d in sources.make_source({'kind': 'shapes', 'count': 500})), 400)
    vocab = Vocab.build(tok.num_text, vq_cfg.num_codes)
    with tempfile.TemporaryDirectory() as out:
        prepare.prepare(source, out, vocab=vocab, text_tokenizer=tok, vq_params=vq_params, vq_cfg=vq_cfg,
                        cfg=prepare.PrepareConfig(shard_size=500, progress=False))
        data = pipeline.Pipeline(out, vocab, pipeline.PipelineConfig(seq_len=args.seq_len, batch=args.batch))
        next(data)
        begin = time.perf_counter()
        batches = [next(data) for _ in range(args.steps)]
        pipeline_rows = args.steps * args.batch / (time.perf_counter() - begin)

    # The tiny LM's train step on those batches, one device.
    config = lm.get_config('tiny')
    config.model.vocab_size = vocab.size
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = parallel.rules_from_config(config)
    model = transformer.Transformer(lm_config.transformer_config(config, mesh, rules))
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config(config.optim, 1000))
    init_fn = lambda rng, x: model.init(rng, x)['params']
    args_init = (jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    target = state_lib.abstract_state(init_fn, optimizer, mesh, rules, *args_init)
    state = state_lib.init_state(init_fn, optimizer, mesh, rules, *args_init)
    loss_fn = lm_task.lm_loss_fn(model)
    train_step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, optimizer),
                                         state_lib.shardings_of(target),
                                         parallel.logical_sharding(mesh, rules, ('act_batch', 'act_len')))
    rng = jax.random.key(1)
    with jax.set_mesh(mesh):
        state, metrics = train_step(state, batches[0], rng)
        jax.block_until_ready(metrics)
        begin = time.perf_counter()
        for b in batches:
            state, metrics = train_step(state, b, rng)
            jax.block_until_ready(metrics)
        step_rows = args.steps * args.batch / (time.perf_counter() - begin)
    print(json.dumps({'benchmark': 'pipeline_throughput', 'rows_per_s': round(pipeline_rows, 1),
                      'baseline': 'tiny LM train step (1 CPU device)', 'baseline_rows_per_s': round(step_rows, 1),
                      'ratio': round(pipeline_rows / step_rows, 2), 'seq_len': args.seq_len, 'batch': args.batch,
                      'documents': args.documents}))


if __name__ == '__main__':
    main()
