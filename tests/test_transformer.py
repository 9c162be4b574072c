"""The transformer: CM3leon init statistics, packing, variant switches, scan/remat, loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cm3jax import parallel
from cm3jax.lm import config as lm_config
from cm3jax.model import transformer
from cm3jax.model.transformer import positions_from_segments
from cm3jax.train.loss import cross_entropy
from tests.helpers import build, forward, random_tokens, tiny_config

# Normal(0, s) cut at +-3s has std s * sqrt(1 - 6 phi(3) / (2 Phi(3) - 1)) = 0.98654 s.
TRUNC_STD_FACTOR = 0.98654


def test_cm3leon_init_statistics():
    config = tiny_config(d_model=128, num_heads=4, mlp_dim=512, vocab_size=2048, max_len=512, num_layers=2)
    _, params, _, _ = build(config)
    flat = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}

    # no biases and no LayerNorm parameters anywhere
    assert not [k for k in flat if k.endswith(('bias', 'scale'))], sorted(flat)
    assert sorted(flat) == ['embed', 'layers/attn/wk', 'layers/attn/wo', 'layers/attn/wq', 'layers/attn/wv',
                            'layers/mlp/wi', 'layers/mlp/wo', 'pos_embed']
    # residual output projections start at zero
    assert not flat['layers/attn/wo'].any() and not flat['layers/mlp/wo'].any()
    for name in ('embed', 'layers/attn/wq', 'layers/attn/wk', 'layers/attn/wv', 'layers/mlp/wi'):
        w = flat[name]
        assert abs(w.std() / (0.006 * TRUNC_STD_FACTOR) - 1) < 0.03, (name, w.std())
        assert abs(w.mean()) < 1e-4, name
        assert np.abs(w).max() <= 3 * 0.006 + 1e-7, name
        assert np.abs(w).max() > 2.9 * 0.006, name  # it is the 3-std cut, not a narrower one
    pos = flat['pos_embed']
    assert abs(pos.std() / (2e-4 * TRUNC_STD_FACTOR) - 1) < 0.03, pos.std()
    assert np.abs(pos).max() <= 3 * 2e-4 + 1e-9


def test_chameleon_params_exist():
    _, params, _, _ = build(tiny_config('chameleon'))
    flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    cfg = tiny_config('chameleon').model
    kv, hd = cfg.num_kv_heads, cfg.d_model // cfg.num_heads
    assert flat['layers/attn/q_norm/scale'].shape == (cfg.num_layers, cfg.num_heads, hd)
    assert flat['layers/attn/k_norm/bias'].shape == (cfg.num_layers, kv, hd)
    assert flat['layers/attn/wk'].shape == (cfg.num_layers, cfg.d_model, kv, hd)
    assert flat['layers/mlp/wg'].shape == (cfg.num_layers, cfg.d_model, cfg.mlp_dim)
    assert 'pos_embed' not in flat and 'lm_head' in flat
    assert flat['layers/attn_norm/scale'].shape == (cfg.num_layers, cfg.d_model)


def random_canon_taps(params, key: int = 5):
    """Canon taps start at zero (the identity); tests that must see them act give them values."""
    def draw(path, x):
        if getattr(path[-1], 'key', '') != 'taps':
            return x
        return 0.5 * jax.random.normal(jax.random.fold_in(jax.random.key(key), len(jax.tree_util.keystr(path))), x.shape)
    return jax.tree_util.tree_map_with_path(draw, params)


@pytest.mark.parametrize('variant', ['cm3leon', 'chameleon', 'canon'])
def test_packed_documents_match_separate(variant):
    """A packed document sees nothing of its neighbours: attention is masked per segment, and a
    Canon tap reaching before a segment's start reads nothing."""
    model, params, _, _ = build(tiny_config(canon='AC', canon_taps=(1, 2, 5)) if variant == 'canon'
                                else tiny_config(variant))
    params = random_canon_taps(params)
    a, b = random_tokens(1, (1, 11), 500), random_tokens(2, (1, 9), 500)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)  # 4 tokens of padding
    segments = jnp.array([[1] * 11 + [2] * 9 + [0] * 4])
    logits = forward(model)(params, packed, segments)
    alone_a = forward(model)(params, a)
    alone_b = forward(model)(params, b)
    np.testing.assert_allclose(logits[:, :11], alone_a, atol=1e-5)
    np.testing.assert_allclose(logits[:, 11:20], alone_b, atol=1e-5)


def test_canon_layer_adds_the_earlier_tokens_of_its_segment():
    """y_t = x_t + sum_j w_j * x_{t-j} over the taps, reading nothing before the segment start."""
    from cm3jax.model.layers import Canon
    x = jax.random.normal(jax.random.key(0), (2, 7, 4))
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1]])
    positions = positions_from_segments(segments)
    layer = Canon((1, 3))
    w = jnp.array([[1.0, 2.0, -1.0, 0.5], [0.25, -2.0, 3.0, 1.0]])
    y, history = layer.apply({'params': {'taps': w}}, x, positions, segments)
    assert history is None
    want = np.array(x)
    pos = np.asarray(positions)
    for b in range(2):
        for t in range(7):
            for i, j in enumerate((1, 3)):
                if pos[b, t] >= j:
                    want[b, t] += np.asarray(w[i]) * np.asarray(x[b, t - j])
    np.testing.assert_allclose(y, want, atol=1e-6)
    zero, _ = layer.apply({'params': {'taps': jnp.zeros_like(w)}}, x, positions, segments)
    np.testing.assert_array_equal(zero, x)  # zero taps (the init) are the identity
    # a cached call continues from the history: the same outputs as one pass over the whole row
    hist = jnp.zeros((2, 3, 4))
    first, hist = layer.apply({'params': {'taps': w}}, x[:, :4], positions[:, :4], segments[:, :4], hist)
    rest, _ = layer.apply({'params': {'taps': w}}, x[:, 4:], positions[:, 4:], segments[:, 4:], hist)
    np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), want, atol=1e-6)


def test_canon_switch_is_causal_and_starts_as_the_plain_model():
    plain, params, _, _ = build(tiny_config(position='rope'))
    canon, canon_params, _, _ = build(tiny_config(position='rope', canon='AC'))
    tokens = random_tokens(6, (2, 12), 500)
    taps = {k: v for k, v in canon_params['layers'].items() if k.startswith('canon')}
    assert set(taps) == {'canon_a', 'canon_c'} and taps['canon_a']['taps'].shape == (2, 3, 64)
    np.testing.assert_allclose(forward(canon)(canon_params, tokens), forward(plain)(params, tokens), atol=1e-6)
    canon_params = random_canon_taps(canon_params)
    logits = forward(canon)(canon_params, tokens)
    changed = forward(canon)(canon_params, tokens.at[:, 8].set(7))
    np.testing.assert_allclose(changed[:, :8], logits[:, :8], atol=1e-6)
    assert not np.allclose(changed[:, 8:], logits[:, 8:], atol=1e-6)
    assert not np.allclose(logits, forward(plain)(params, tokens), atol=1e-3)


def test_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_segments(seg),
                                  [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]])


def _unstack_layers(params, num_layers):
    """Scanned params {'layers': stacked} -> unrolled {'layers_i': ...}."""
    out = {k: v for k, v in params.items() if k != 'layers'}
    for i in range(num_layers):
        out[f'layers_{i}'] = jax.tree.map(lambda x: x[i], params['layers'])
    return out


@pytest.mark.parametrize('variant', ['cm3leon', 'chameleon'])
def test_scan_remat_and_unrolled_agree(variant):
    """Layer scanning and rematerialisation change memory and speed, never the numbers."""
    model, params, _, _ = build(tiny_config(variant))
    # move off the zero-initialised output projections so every weight gets a gradient
    params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), params)
    tokens = random_tokens(3, (2, 16), 500)

    def loss_and_grads(scan, remat, unroll=1):
        other = transformer.Transformer(dataclasses.replace(model.cfg, scan_layers=scan, remat=remat,
                                                            scan_unroll=unroll))
        p = params if scan else _unstack_layers(params, model.cfg.num_layers)
        loss_fn = lambda p: cross_entropy(other.apply({'params': p}, tokens[:, :-1]), tokens[:, 1:])[0]
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(p)
        if not scan:
            layers = [grads.pop(f'layers_{i}') for i in range(model.cfg.num_layers)]
            grads['layers'] = jax.tree.map(lambda *x: jnp.stack(x), *layers)
        return loss, grads

    ref_loss, ref_grads = loss_and_grads(True, 'none')
    for scan, remat, unroll in [(True, 'full', 1), (False, 'dots_no_batch', 1), (True, 'none', 8)]:
        loss, grads = loss_and_grads(scan, remat, unroll)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=f'{scan} {remat}')
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, atol=1e-6, err_msg=f'{scan} {remat} {path}')


@pytest.mark.parametrize('switch', [dict(norm_placement='swin'), dict(position='rope', qk_norm=True),
                                    dict(tie_embeddings=False), dict(mlp='swiglu'), dict(norm='rmsnorm', norm_params=True),
                                    dict(num_kv_heads=1), dict(zero_init_out=False)])
def test_each_switch_runs_and_is_causal(switch):
    """Each Chameleon switch works alone; changing a later token never moves earlier logits."""
    model, params, _, _ = build(tiny_config(**switch))
    tokens = random_tokens(4, (2, 12), 500)
    logits = forward(model)(params, tokens)
    changed = forward(model)(params, tokens.at[:, 8].set(7))
    assert logits.shape == (2, 12, 512) and np.isfinite(logits).all()
    np.testing.assert_allclose(changed[:, :8], logits[:, :8], atol=1e-6)
    if not switch.get('zero_init_out', True) or switch.get('norm_placement') != 'swin':
        assert not np.allclose(changed[:, 8:], logits[:, 8:], atol=1e-6)


def test_bfloat16_compute_tracks_float32():
    config = tiny_config('chameleon')
    model, params, _, _ = build(config)
    tokens = random_tokens(5, (2, 16), 500)
    ref = forward(model)(params, tokens)
    bf16 = transformer.Transformer(dataclasses.replace(model.cfg, dtype=jnp.bfloat16))
    out = forward(bf16)(params, tokens)
    assert out.dtype == jnp.float32  # logits stay f32 for the loss
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_padded_vocab_logits_are_masked():
    config = tiny_config(vocab_size=500)
    model, params, _, _ = build(config)
    assert model.cfg.padded_vocab_size == 512
    logits = forward(model)(params, random_tokens(6, (1, 5), 500))
    assert (jax.nn.softmax(logits)[..., 500:] == 0).all()


def test_cross_entropy_weights_and_z_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.array([[1, 2, 3], [4, 5, 6]])
    weights = jnp.array([[1, 0, 1], [1, 1, 0]], jnp.float32)
    loss, metrics = cross_entropy(logits, targets, weights, z_loss=1e-2)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    lse = jax.nn.logsumexp(logits, -1)
    expected = ((nll + 1e-2 * lse**2) * weights).sum() / 4
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert metrics['weight'] == 4


def test_preset_parameter_counts():
    """The presets have the sizes docs/paper.md names (counted abstractly, nothing allocated)."""
    from configs import lm
    expected = {'cm3leon_350m': 0.35e9, 'cm3leon_760m': 0.76e9, 'cm3leon_7b': 7e9, 'chameleon': 7e9}
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    for preset, size in expected.items():
        config = lm_config.validate(lm.get_config(preset), num_devices=1)
        cfg = lm_config.transformer_config(config, mesh, parallel.DEFAULT_RULES)
        shapes = jax.eval_shape(transformer.Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        count = parallel.num_params(shapes)
        assert 0.8 * size < count < 1.2 * size, (preset, count)


def test_image_index_counts_places_within_each_run_of_codes():
    """Codes are ids 10-19: a place restarts after any other token and at a segment start, and a
    carried place continues a run begun before the chunk."""
    tokens = jnp.array([[1, 10, 11, 12, 3, 15, 16, 17, 18, 2, 0],
                        [12, 13, 14, 3, 11, 11, 12, 13, 14, 15, 16]])
    segments = jnp.array([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0],
                          [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    got = transformer.image_index(tokens, segments, (10, 20))
    np.testing.assert_array_equal(got, [[-1, 0, 1, 2, -1, 0, 1, 0, 1, -1, -1],
                                        [0, 1, 2, -1, 0, 1, 2, 3, 4, 5, 6]])
    carried = transformer.image_index(tokens, segments, (10, 20), carry=jnp.array([-1, 4]))
    np.testing.assert_array_equal(carried[1], [5, 6, 7, -1, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(carried[0], got[0])


def test_image_place_embedding_reaches_only_image_codes():
    """Zeroing the image-place table changes the logits at and after image codes, and none
    before the first one (causal, and text embeddings do not get it)."""
    config = tiny_config(image_positions=8, image_ids=(100, 200))
    model, params, _, _ = build(config)
    assert params['image_pos_embed'].shape == (8, model.cfg.d_model)
    tokens = jnp.array([[5, 6, 7, 150, 151, 152, 9, 10]])
    full = forward(model)
    with_table = full(params, tokens)
    without = full({**params, 'image_pos_embed': jnp.zeros_like(params['image_pos_embed'])}, tokens)
    np.testing.assert_allclose(with_table[0, :3], without[0, :3], atol=1e-6)
    assert float(jnp.abs(with_table[0, 3:] - without[0, 3:]).max()) > 1e-4
