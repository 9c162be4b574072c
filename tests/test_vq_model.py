"""The VQ-GAN module: shapes, the quantizer's estimator and statistics, EMA and dead-code restart,
and clear errors for bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax.vq import model as vq
from tests.helpers import random_vq_params

CFG = vq.VQConfig(resolution=16, ch=32, ch_mult=(1, 2), z_channels=16, embed_dim=8, num_codes=32,
                  attn_resolutions=(8,))


@pytest.fixture(scope='module')
def params():
    return random_vq_params(CFG, 16)  # from numpy: compiling VQGAN.init costs half a minute


def test_encode_decode_shapes_for_any_batch(params):
    for batch in (1, 3):
        images = np.random.default_rng(batch).integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)
        codes = vq.encode(params, images, CFG)
        assert codes.shape == (batch, 8, 8) and codes.dtype == jnp.int32
        assert int(codes.min()) >= 0 and int(codes.max()) < CFG.num_codes
        out = vq.decode(params, codes, CFG)
        assert out.shape == (batch, 16, 16, 3) and out.dtype == jnp.uint8


def test_bad_images_and_codes_raise_clear_errors(params):
    good = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r'takes images of shape \[B, 16, 16, 3\].*got \(2, 32, 32, 3\)'):
        vq.encode(params, np.zeros((2, 32, 32, 3), np.uint8), CFG)
    with pytest.raises(ValueError, match=r'got \(2, 16, 16, 1\)'):
        vq.encode(params, good[..., :1], CFG)
    with pytest.raises(TypeError, match='uint8 images'):
        vq.encode(params, good.astype(np.float32), CFG)
    with pytest.raises(ValueError, match=r'decode takes codes of shape \[B, 8, 8\]'):
        vq.decode(params, jnp.zeros((2, 4, 4), jnp.int32), CFG)
    with pytest.raises(ValueError, match='not divisible by norm_groups'):
        dataclasses.replace(CFG, ch=24).validate()


def test_straight_through_gradient_and_losses():
    z = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    codebook = jax.random.normal(jax.random.key(2), (32, 8))
    z_q, codes, aux = vq.quantize(z, codebook, CFG)
    np.testing.assert_allclose(z_q, codebook[codes], atol=1e-6)  # forward: the code vectors
    grad = jax.grad(lambda z: vq.quantize(z, codebook, CFG)[0].sum())(z)
    np.testing.assert_allclose(grad, 1.0)  # backward: identity to the encoder
    expected = jnp.mean((codebook[codes] - z) ** 2)
    np.testing.assert_allclose(aux['codebook_loss'], expected, rtol=1e-5)
    np.testing.assert_allclose(aux['commitment_loss'], 0.25 * expected, rtol=1e-5)
    # the commitment term pulls only the encoder, the codebook term only the codebook
    g_codebook = jax.grad(lambda c: vq.quantize(z, c, CFG)[2]['commitment_loss'])(codebook)
    assert float(jnp.abs(g_codebook).max()) == 0


def test_cosine_codes_pick_the_most_similar_direction():
    codebook = jnp.array([[1.0, 0.0], [0.0, 10.0], [-1.0, 0.0]])
    z = jnp.array([[5.0, 1.0], [0.1, 0.5]])
    plain, _ = vq.nearest_codes(z, codebook)
    cosine, _ = vq.nearest_codes(z, codebook, l2_normalize=True)
    assert plain.tolist() == [0, 0] and cosine.tolist() == [0, 1]


def test_usage_statistics():
    stats = vq.code_usage(jnp.array([0, 1, 2, 3]), 8)
    np.testing.assert_allclose(stats['perplexity'], 4.0, rtol=1e-6)
    assert float(stats['used_fraction']) == 0.5
    assert float(vq.code_usage(jnp.zeros(10, jnp.int32), 8)['perplexity']) == pytest.approx(1.0)


def test_ema_moves_codes_to_their_members_mean_and_dead_codes_restart():
    z = jnp.array([[1.0, 1.0], [3.0, 1.0], [0.0, -2.0]])
    codes = jnp.array([0, 0, 1])
    ema = {'count': jnp.zeros(3), 'sum': jnp.zeros((3, 2))}
    for _ in range(200):
        ema, codebook = vq.ema_update(ema, z, codes, decay=0.9)
    np.testing.assert_allclose(codebook[0], [2.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(codebook[1], [0.0, -2.0], atol=1e-3)
    assert np.isfinite(np.asarray(codebook)).all()  # the unused code stays finite
    restarted, n = vq.restart_dead_codes(codebook, jnp.array([5.0, 2.0, 0.0]), z, jax.random.key(0))
    assert int(n) == 1
    np.testing.assert_array_equal(restarted[:2], codebook[:2])
    assert any(np.allclose(restarted[2], row) for row in np.asarray(z))


def test_a_local_encoder_codes_each_patch_alone():
    """With `local_encoder` a code is a function of its own patch of pixels: changing one patch
    changes at most its own code, and the same patch gets the same code anywhere on the canvas.
    taming's encoder (the default) mixes neighbours and positions into every code."""
    cfg = vq.VQConfig(resolution=16, patch=2, ch=32, ch_mult=(1, 2), num_res_blocks=0, z_channels=16, embed_dim=8,
                      num_codes=64, local_encoder=True)  # pixels folded 2x2, then a non-overlapping downsampling: 4x4 a code
    side = 16 // cfg.latent_resolution  # pixels per code
    rng = np.random.default_rng(0)
    # only the encoder and codebook are initialised (and compiled): the decoder plays no part here
    params = jax.jit(functools.partial(vq.VQGAN(cfg).init, method=vq.VQGAN.encode_codes))(
        jax.random.key(1), jnp.zeros((1, 16, 16, 3)))['params']
    latents = jax.jit(lambda p, x: vq.VQGAN(cfg).apply({'params': p}, x, method=vq.VQGAN.encode_latents))
    # spread the codebook over the latents, so that codes are sensitive to what they see
    z = latents(params, jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)).reshape(-1, cfg.embed_dim)
    params = {**params, 'quantize': {'embedding': z[:cfg.num_codes]}}
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images[1] = images[0]
    images[1, :side, :side] = 255 - images[0, :side, :side]  # a change in the first patch only
    encode = jax.jit(lambda p, x: vq.VQGAN(cfg).apply({'params': p}, x.astype(jnp.float32) / 127.5 - 1,
                                                      method=vq.VQGAN.encode_codes))
    codes = np.asarray(encode(params, images))
    assert (codes[0] != codes[1]).sum() <= 1 and (codes[0] != codes[1])[1:, :].sum() == 0
    tiled = np.tile(images[:1, :side, :side], (2, 16 // side, 16 // side, 1))  # one patch everywhere
    assert len(np.unique(np.asarray(encode(params, tiled)))) == 1
    mixing = dataclasses.replace(cfg, local_encoder=False)
    wide = jax.jit(functools.partial(vq.VQGAN(mixing).init, method=vq.VQGAN.encode_latents))(
        jax.random.key(1), jnp.zeros((1, 16, 16, 3)))['params']
    z = jax.jit(lambda p, x: vq.VQGAN(mixing).apply({'params': p}, x, method=vq.VQGAN.encode_latents))(
        wide, jnp.asarray(tiled, jnp.float32) / 127.5 - 1)
    assert not np.allclose(z[0, 0, 0], z[0, -1, -1], atol=1e-4)  # the corner patch is coded otherwise
