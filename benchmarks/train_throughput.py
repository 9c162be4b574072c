"""Train-step throughput and MFU against the machine's matmul peak, both measured in this run.

The step is the real one (`cm3jax.train.step`: LM loss, AdamW, clipping, NaN guard) on a
~20M-parameter model at seq 512. The baseline is a large jitted dense matmul in the same dtype,
run on the same device, so the ratio (MFU) is meaningful on a shared machine. Prints one JSON
line with tokens_per_s, model_flops_per_token, peak_flops and mfu.

The default shape is wide and shallow (2 layers, d_model 896, heads of 128): on a CPU the
matmuls run near peak and what pulls MFU down is the memory-bound work between them (the
attention softmax over [B, H, T, T], norms, GELU), which a wide model has less of per FLOP.
`--layers 6 --d_model 512 --heads 8` (19.4M params) measures a deeper, narrower shape.

    python benchmarks/train_throughput.py [--layers 2 --d_model 896 --heads 7 --seq 512 --batch 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cm3jax import parallel  # noqa: E402
from cm3jax.lm import config as lm_config, task as lm_task  # noqa: E402
from cm3jax.model import transformer  # noqa: E402
from cm3jax.train import metrics, optim, state as state_lib, step as step_lib  # noqa: E402
from configs import lm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='tiny')
    ap.add_argument('--layers', type=int, default=2)
    ap.add_argument('--d_model', type=int, default=896)
    ap.add_argument('--heads', type=int, default=7)
    ap.add_argument('--vocab', type=int, default=512)
    ap.add_argument('--seq', type=int, default=512)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--steps', type=int, default=5)
    ap.add_argument('--dtype', default='float32')
    ap.add_argument('--remat', default='none')
    ap.add_argument('--scan_layers', type=int, default=0)
    ap.add_argument('--attention', default='xla')
    args = ap.parse_args()

    config = lm.get_config(args.preset)
    config.model.update(num_layers=args.layers, d_model=args.d_model, num_heads=args.heads, num_kv_heads=args.heads,
                        mlp_dim=4 * args.d_model, vocab_size=args.vocab, max_len=args.seq, dtype=args.dtype,
                        remat=args.remat, scan_layers=bool(args.scan_layers), attention=args.attention)
    config.mesh.ici = (1, 1, 1)
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    lm_config.validate(config, num_devices=1)
    rules = parallel.DEFAULT_RULES
    cfg = lm_config.transformer_config(config, mesh, rules)
    model = transformer.Transformer(cfg)
    opt = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-4, warmup_steps=10, decay_steps=1000))
    init_fn = lambda rng, x: model.init(rng, x)['params']
    init_args = (jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    state = state_lib.init_state(init_fn, opt, mesh, rules, *init_args)
    target = state_lib.abstract_state(init_fn, opt, mesh, rules, *init_args)
    n_params = parallel.num_params(state['params'])

    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int32)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
    batch_sharding = parallel.logical_sharding(mesh, rules, ('act_batch', 'act_len'))
    batch = jax.device_put(batch, batch_sharding)
    step = step_lib.jit_train_step(step_lib.make_train_step(lm_task.lm_loss_fn(model), opt),
                                   state_lib.shardings_of(target), batch_sharding)
    # the peak is taken before and after the steps, best of both: a conservative MFU on a shared machine
    peak = metrics.measure_matmul_flops(dtype=jnp.dtype(args.dtype), seconds=2.0)
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch, jax.random.key(0)).compile()
        state, m = jax.block_until_ready(compiled(state, batch, jax.random.key(0)))  # warm-up
        times = []
        for i in range(args.steps):
            begin = time.perf_counter()
            state, m = jax.block_until_ready(compiled(state, batch, jax.random.key(i)))
            times.append(time.perf_counter() - begin)
    step_s = float(np.median(times))

    peak = max(peak, metrics.measure_matmul_flops(dtype=jnp.dtype(args.dtype), seconds=2.0))
    flops_per_token = lm_task.flops_per_token(cfg, args.seq)
    tokens_per_s = args.batch * args.seq / step_s
    print(json.dumps({
        'benchmark': 'train_throughput', 'params': n_params, 'layers': args.layers, 'd_model': args.d_model,
        'heads': args.heads, 'seq': args.seq, 'batch': args.batch,
        'dtype': args.dtype, 'device': jax.devices()[0].device_kind,
        'step_s': round(step_s, 4), 'tokens_per_s': round(tokens_per_s, 1),
        'model_flops_per_token': flops_per_token, 'peak_flops': round(peak),
        'mfu': round(tokens_per_s * flops_per_token / peak, 4),
    }))


if __name__ == '__main__':
    main()
