"""Greedy decoding speed with the KV cache vs recomputing the full forward pass per token.

Both run the same model inside one jitted ``lax.fori_loop``, so the figure is decode work, not
Python dispatch. Prints one JSON line: cached tokens/s, the recompute baseline and their ratio.

    python benchmarks/kv_cache_decode.py [--layers 4 --d_model 256 --prompt 128 --new 128 --batch 4]
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

from cm3jax import configuration, parallel  # noqa: E402
from cm3jax.model import transformer  # noqa: E402
from configs import lm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='tiny')
    ap.add_argument('--layers', type=int, default=4)
    ap.add_argument('--d_model', type=int, default=256)
    ap.add_argument('--batch', type=int, default=4)
    ap.add_argument('--prompt', type=int, default=128)
    ap.add_argument('--new', type=int, default=128)
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args()

    config = lm.get_config(args.preset)
    config.model.update(num_layers=args.layers, d_model=args.d_model, mlp_dim=4 * args.d_model,
                        max_len=max(args.prompt + args.new, config.model.max_len))
    config.mesh.ici = (1, 1, 1)
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    configuration.validate(config, num_devices=1)
    cfg = configuration.transformer_config(config, mesh, parallel.DEFAULT_RULES)
    model = transformer.Transformer(cfg)
    total = args.prompt + args.new
    prompt = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 0, cfg.vocab_size, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), prompt)['params']
    # leave the zero-initialised output projections so the outputs depend on the context
    params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), params)

    @jax.jit
    def cached(params, prompt):
        cache = transformer.init_cache(cfg, args.batch, total)
        logits, cache = transformer.prefill(model, params, cache, prompt)
        out = jnp.zeros((args.batch, args.new), jnp.int32)

        def body(i, carry):
            last, cache, out = carry
            token = last.argmax(-1).astype(jnp.int32)
            last, cache = transformer.decode_step(model, params, cache, token)
            return last, cache, out.at[:, i].set(token)

        return jax.lax.fori_loop(0, args.new, body, (logits[:, -1], cache, out))[2]

    @jax.jit
    def recompute(params, prompt):
        buf = jnp.zeros((args.batch, total), jnp.int32).at[:, :args.prompt].set(prompt)

        def body(i, buf):
            filled = args.prompt + i
            segments = (jnp.arange(total) < filled).astype(jnp.int32)[None].repeat(args.batch, 0)
            logits = model.apply({'params': params}, buf, segments)
            token = jax.lax.dynamic_index_in_dim(logits, filled - 1, axis=1, keepdims=False).argmax(-1)
            return buf.at[:, filled].set(token.astype(jnp.int32))

        return jax.lax.fori_loop(0, args.new, body, buf)[:, args.prompt:]

    def timed(fn):
        jax.block_until_ready(fn(params, prompt))  # compile
        best = float('inf')
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(params, prompt))
            best = min(best, time.perf_counter() - start)
        return args.batch * args.new / best, out

    fast, fast_tokens = timed(cached)
    slow, slow_tokens = timed(recompute)
    agree = float((fast_tokens == slow_tokens).mean())
    print(json.dumps({'benchmark': 'kv_cache_decode', 'tokens_per_s': round(fast, 1),
                      'baseline': 'full forward recomputed per token', 'baseline_tokens_per_s': round(slow, 1),
                      'ratio': round(fast / slow, 2), 'same_tokens': agree, 'layers': args.layers,
                      'd_model': args.d_model, 'batch': args.batch, 'prompt': args.prompt, 'new': args.new,
                      'device': jax.devices()[0].platform}))


if __name__ == '__main__':
    main()
