"""Prefill + cached decoding gives the logits of the full forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import parallel
from cm3jax.model import transformer
from tests.helpers import build, forward, random_tokens, tiny_config

NEW = 16  # decoded tokens


def canon_params(params):
    """Random Canon taps (they start at zero, which would hide a wrong history)."""
    def perturb(path, x):
        name = getattr(path[-1], 'key', '')
        return 0.5 * jax.random.normal(jax.random.key(len(str(path))), x.shape) if name == 'taps' else x
    return jax.tree_util.tree_map_with_path(perturb, params)


@pytest.mark.parametrize('variant,padding', [('cm3leon', 'right'), ('chameleon', 'right'), ('chameleon', 'left'),
                                             ('images', 'right'), ('images', 'left'), ('canon', 'right'),
                                             ('canon', 'left')])
def test_cached_decode_matches_full_forward_on_ragged_prompts(variant, padding):
    """Rows with prompts of 3, 7 and 5 tokens share one padded batch; chameleon-tiny has GQA
    (2 k/v heads for 4 query heads), QK-norm and RoPE. 'images' adds image-place embeddings on
    ids 100-499, so runs of image codes cross from the prompt into the decoded tokens (the
    cache carries each row's place) and some outrun the table's 6 places. 'canon' adds Canon
    layers before attention and MLP whose taps reach back further than the shortest prompt (the
    cache carries each layer's last inputs)."""
    config = {'images': lambda: tiny_config('cm3leon', image_positions=6, image_ids=(100, 500)),
              'canon': lambda: tiny_config('cm3leon', canon='AC', canon_taps=(1, 2, 4))}.get(
                  variant, lambda: tiny_config(variant))()
    model, params, _, _ = build(config)
    if variant == 'canon':
        params = canon_params(params)
    assert variant != 'chameleon' or model.cfg.num_kv_heads < model.cfg.num_heads
    lengths = [3, 7, 5]
    width = max(lengths)
    seqs = [random_tokens(10 + i, (n + NEW,), 500) for i, n in enumerate(lengths)]

    prompt = np.zeros((3, width), np.int32)
    segments = np.zeros((3, width), np.int32)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        cols = slice(0, n) if padding == 'right' else slice(width - n, width)
        prompt[row, cols], segments[row, cols] = seq[:n], 1

    cache = transformer.init_cache(model.cfg, 3, width + NEW)
    prefill = jax.jit(lambda p, c, t, s: transformer.prefill(model, p, c, t, s))
    decode = jax.jit(lambda p, c, t: transformer.decode_step(model, p, c, t))
    logits, cache = prefill(params, cache, prompt, segments)
    last_cols = [n - 1 if padding == 'right' else width - 1 for n in lengths]
    cached = [[logits[row, col]] for row, col in enumerate(last_cols)]
    for step in range(NEW):
        token = jnp.array([seq[n + step] for seq, n in zip(seqs, lengths)])  # teacher forcing
        step_logits, cache = decode(params, cache, token)
        for row in range(3):
            cached[row].append(step_logits[row])
    assert int(cache['end']) == width + NEW

    full = forward(model)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        expected = full(params, seq[None])[0, n - 1:]  # logits after the prompt and each new token
        np.testing.assert_allclose(np.stack(cached[row]), expected, atol=1e-5, err_msg=f'row {row}')


def test_prompt_longer_than_cache_is_rejected():
    model, params, _, _ = build(tiny_config())
    cache = transformer.init_cache(model.cfg, 1, 4)
    with pytest.raises(ValueError, match='larger max_len'):
        transformer.prefill(model, params, cache, jnp.zeros((1, 6), jnp.int32))
    with pytest.raises(ValueError, match='max_len'):
        transformer.init_cache(model.cfg, 1, model.cfg.max_len + 1)


def test_sharded_cache_decodes_like_one_device():
    """The cache laid out by cache_axes on a (2, 2, 2) mesh: batch on data x fsdp, k/v heads on tensor."""
    config = tiny_config('chameleon')
    model1, params1, _, _ = build(config)
    model8, params8, mesh, rules = build(config, parallel.create_mesh((2, 2, 2)))
    prompt = random_tokens(20, (4, 6), 500)

    def run(model, params, cache):
        logits, cache = transformer.prefill(model, params, cache, prompt)
        step_logits, cache = transformer.decode_step(model, params, cache, logits[:, -1].argmax(-1))
        return step_logits, cache

    want, _ = jax.jit(lambda p, c: run(model1, p, c))(params1, transformer.init_cache(model1.cfg, 4, 8))
    cache = parallel.shard_tree(transformer.init_cache(model8.cfg, 4, 8), mesh, rules, transformer.cache_axes(model8.cfg))
    assert cache['k'][0].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), 'tensor', None, None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got, new_cache = jax.jit(lambda p, c: run(model8, p, c))(params8, cache)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert int(new_cache['end']) == 7
