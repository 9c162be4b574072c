"""`cm3jax quickstart`: the model end to end on the mesh, in under a minute on a laptop CPU.

1. Builds the mesh and creates the parameters already sharded.
2. Fits a handful of fixed random token sequences with the train step `cm3jax train` uses
   (AdamW at a constant rate), with a progress bar.
3. Prompts with each sequence's first tokens and decodes the rest greedily through the KV
   cache, checks the cached logits against a full forward pass, and reports how many tokens
   came back exactly.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.experimental import multihost_utils
from tqdm import tqdm

from cm3jax import parallel
from cm3jax.errors import ConfigError
from cm3jax.lm import config as configuration
from cm3jax.model import transformer
from cm3jax.train import optim, state as state_lib, step as step_lib
from cm3jax.train.loss import token_stats


def run(config) -> dict[str, float]:
    """Run the showcase; returns its measurements (also printed)."""
    parallel.maybe_initialize_distributed()
    configuration.validate(config)
    q = config.quickstart
    if q.seq_len > config.model.max_len:
        raise ConfigError(f'quickstart.seq_len={q.seq_len} exceeds model.max_len={config.model.max_len}')
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config)
    cfg = configuration.transformer_config(config, mesh, rules)
    model = transformer.Transformer(cfg)
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    shards = parallel.axis_size(mesh, rules, 'act_batch')
    if q.batch % shards or q.batch % jax.process_count():
        raise ConfigError(f'quickstart.batch={q.batch} must be a multiple of the {shards} batch shards '
                                        f'and of the {jax.process_count()} processes')

    say(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}')
    # the same optimizer, state and step as `cm3jax train`, at a constant rate and no decay
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=q.learning_rate, schedule='constant',
                                                       weight_decay=0.0, grad_clip=0.0))
    init_fn = lambda rng, x: model.init(rng, x)['params']
    init_args = (jax.random.key(config.seed), jnp.zeros((q.batch, q.seq_len), jnp.int32))
    target = state_lib.abstract_state(init_fn, optimizer, mesh, rules, *init_args)
    state = state_lib.init_state(init_fn, optimizer, mesh, rules, *init_args)
    replicated = parallel.check_sharding(state['params'])
    say(f'model: {parallel.num_params(state["params"]):,} params, vocab {cfg.vocab_size} (padded '
        f'{cfg.padded_vocab_size}), {cfg.num_layers} layers, d_model {cfg.d_model}; replicated large-param bytes '
        f'{replicated:.0%}')

    # Data: fixed random sequences, all in the real vocab.
    seqs = np.random.default_rng(config.seed).integers(0, cfg.vocab_size, (q.batch, q.seq_len), dtype=np.int32)
    rows = q.batch // jax.process_count()  # each host feeds its own contiguous rows
    local = seqs[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    tokens = parallel.global_batch(local, mesh, rules)
    batch = parallel.global_batch({'inputs': local[:, :-1], 'targets': local[:, 1:]}, mesh, rules)
    loss_fn = lambda params, batch, rng: token_stats(model.apply({'params': params}, batch['inputs']),
                                                     batch['targets'], z_loss=config.loss.z_loss)
    step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, optimizer), state_lib.shardings_of(target),
                                   parallel.logical_sharding(mesh, rules, ('act_batch', 'act_len')))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        start, first = time.perf_counter(), None
        bar = tqdm(range(q.steps), desc='fit', disable=jax.process_index() != 0)
        for i in bar:  # waited for each step: one program in flight at a time (see generate())
            state, metrics = step(state, batch, jax.random.key(i))
            if first is None:
                first = float(metrics['nll'])
            bar.set_postfix(loss=f"{float(metrics['nll']):.3f}", acc=f"{float(metrics['accuracy']):.2f}")
        fit_s = time.perf_counter() - start
        final = float(metrics['nll'])
        say(f'fit: loss {first:.3f} -> {final:.3f} in {q.steps} steps ({fit_s:.1f}s, '
            f'{q.steps * q.batch * (q.seq_len - 1) / fit_s:,.0f} tokens/s)')

        params = state['params']
        generated, cache_error, decode_s = generate(model, params, tokens, q.prompt_len, q.seq_len)
    exact = float((generated[:, q.prompt_len:] == seqs[:, q.prompt_len:]).mean())
    new_tokens = q.batch * (q.seq_len - q.prompt_len)
    say(f'generate: prompt {q.prompt_len} tokens, {q.seq_len - q.prompt_len} new per row, KV cache; '
        f'{exact:.1%} of tokens reproduced; {new_tokens / decode_s:,.0f} tokens/s; '
        f'cached vs full-forward logits max |diff| {cache_error:.2e}')
    return {'first_loss': first, 'final_loss': final, 'exact': exact, 'cache_error': cache_error}


def generate(model, params, tokens, prompt_len: int, total_len: int):
    """Greedy decode from ``tokens[:, :prompt_len]`` to ``total_len`` with the KV cache.

    Returns (tokens [B, total_len] as numpy, max |cached - full forward| logit difference,
    decode seconds). The whole decode is one jitted ``fori_loop``, and each program is waited
    for before the next starts: with simulated CPU devices on few cores, two collective
    programs in flight at once can starve XLA's in-process rendezvous of threads and abort.
    """
    new = total_len - prompt_len

    def decode(params, prompt):
        decoder, params = transformer.unrolled(model, params)  # once, outside the loop
        cache = transformer.init_cache(decoder.cfg, prompt.shape[0], total_len)
        logits, cache = transformer.prefill(decoder, params, cache, prompt)
        tokens = jnp.zeros((prompt.shape[0], new), jnp.int32)
        step_logits = jnp.zeros((prompt.shape[0], new + 1, logits.shape[-1]), logits.dtype)

        def body(i, carry):  # the last step also fills the cache's final slot
            last, cache, tokens, step_logits = carry
            token = last.argmax(-1).astype(jnp.int32)
            last, cache = transformer.decode_step(decoder, params, cache, token)
            return last, cache, tokens.at[:, i].set(token), step_logits.at[:, i + 1].set(last)

        carry = (logits[:, -1], cache, tokens, step_logits.at[:, 0].set(logits[:, -1]))
        _, _, tokens, step_logits = jax.lax.fori_loop(0, new, body, carry)
        return jnp.concatenate([prompt, tokens], axis=1), step_logits

    @jax.jit
    def check(params, generated, step_logits):
        full = model.apply({'params': params}, generated)[:, prompt_len - 1:]
        return jnp.abs(step_logits - full).max()

    prompt = tokens[:, :prompt_len]
    compiled = jax.jit(decode).lower(params, prompt).compile()
    begin = time.perf_counter()
    generated, step_logits = jax.block_until_ready(compiled(params, prompt))
    decode_s = time.perf_counter() - begin
    cache_error = float(check(params, generated, step_logits))
    return np.asarray(multihost_utils.process_allgather(generated, tiled=True)), cache_error, decode_s
