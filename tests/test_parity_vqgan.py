"""The VQ-GAN against taming-transformers and transformers' Chameleon / Janus tokenizers,
with tiny random weights converted by `cm3jax.convert.vqgan`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
taming_model = pytest.importorskip('taming.modules.diffusionmodules.model')
taming_quantize = pytest.importorskip('taming.modules.vqvae.quantize')
transformers = pytest.importorskip('transformers')

from cm3jax.convert import vqgan as convert  # noqa: E402
from cm3jax.vq import model as vq  # noqa: E402

DDCONFIG = dict(double_z=False, z_channels=16, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
N_EMBED, EMBED_DIM = 32, 8


def _randomize(module, seed):
    """Random weights everywhere, GroupNorm affine included (its defaults would hide a swap)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = p.ndim == 1 and name.endswith('weight')  # GroupNorm scales: around 1
            std = 0.1 if p.ndim == 1 else p[0].numel() ** -0.5  # keeps activations O(1), so atol means something
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if gain else 0.0))
    return module


def _nhwc(x):
    return np.asarray(x.detach().numpy()).transpose(0, 2, 3, 1)


def _images(n, res, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def _torch_pixels(images):
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def test_taming_encoder_quantizer_and_decoder_match():
    torch.manual_seed(0)
    encoder = _randomize(taming_model.Encoder(**DDCONFIG), 1).eval()
    decoder = _randomize(taming_model.Decoder(**DDCONFIG), 2).eval()
    quantize = _randomize(taming_quantize.VectorQuantizer(N_EMBED, EMBED_DIM, beta=0.25), 3)
    quant_conv = _randomize(torch.nn.Conv2d(16, EMBED_DIM, 1), 4)
    post_quant_conv = _randomize(torch.nn.Conv2d(EMBED_DIM, 16, 1), 5)
    state = {f'{name}.{k}': v for name, m in (('encoder', encoder), ('decoder', decoder), ('quantize', quantize),
                                              ('quant_conv', quant_conv), ('post_quant_conv', post_quant_conv))
             for k, v in m.state_dict().items()}
    state['loss.discriminator.main.0.weight'] = torch.zeros(1)  # training-only parts are skipped
    cfg = convert.config_from_taming(DDCONFIG, N_EMBED, EMBED_DIM)
    params = convert.from_torch(state, cfg)

    images = _images(3, 16)
    with torch.no_grad():
        latents = quant_conv(encoder(_torch_pixels(images)))
        z_q, _, (_, _, ref_codes) = quantize(latents)
        ref_out = decoder(post_quant_conv(z_q))
    model = vq.VQGAN(cfg)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    got_latents = jax.jit(lambda p, x: model.apply({'params': p}, x, method=vq.VQGAN.encode_latents))(params, x)
    np.testing.assert_allclose(got_latents, _nhwc(latents), atol=1e-4)
    codes = vq.encode(params, images, cfg)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), ref_codes.numpy().reshape(-1))
    assert len(np.unique(codes)) > 4  # a lookup that mostly hits one code would prove little
    decoded = jax.jit(lambda p, c: model.apply({'params': p}, c, method=vq.VQGAN.decode_codes))(params, codes)
    np.testing.assert_allclose(decoded, _nhwc(ref_out), atol=1e-4)
    np.testing.assert_array_equal(vq.decode(params, codes, cfg), vq.to_uint8(decoded))


def test_chameleon_vqvae_encode_gives_the_same_codes():
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE
    hf_cfg = transformers.ChameleonVQVAEConfig(embed_dim=16, num_embeddings=32, latent_channels=16, resolution=32,
                                               in_channels=3, base_channels=32, channel_multiplier=[1, 1, 2],
                                               num_res_blocks=1, attn_resolutions=[8], double_latent=False)
    torch.manual_seed(0)
    hf = _randomize(ChameleonVQVAE(hf_cfg), 7).eval()
    cfg = convert.config_from_hf(hf_cfg)
    params = convert.from_torch({f'model.vqmodel.{k}': v for k, v in hf.state_dict().items()}, cfg)
    assert 'decoder' not in params  # transformers ships the encoder only
    images = _images(2, 32, seed=1)
    with torch.no_grad():
        ref_codes = hf.encode(_torch_pixels(images)).image_tokens
    np.testing.assert_array_equal(np.asarray(vq.encode(params, images, cfg)).reshape(-1),
                                  ref_codes.numpy().reshape(-1))


def test_janus_vqvae_encode_and_decode_match():
    from transformers.models.janus.modeling_janus import JanusVQVAE
    hf_cfg = transformers.JanusVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=16, base_channels=32,
                                           channel_multiplier=[1, 1, 2], num_res_blocks=1, num_patches=8,
                                           projection_dim=32, image_token_embed_dim=32)
    torch.manual_seed(0)
    hf = _randomize(JanusVQVAE(hf_cfg), 9).eval()
    cfg = convert.config_from_hf(hf_cfg)
    assert (cfg.resolution, cfg.latent_resolution, cfg.l2_normalize) == (32, 8, True)
    params = convert.from_torch(hf.state_dict(), cfg, layout='janus')
    images = _images(2, 32, seed=2)
    with torch.no_grad():
        ref_codes = hf.encode(_torch_pixels(images)).image_tokens.reshape(2, 8, 8)
        ref_images = hf.decode(ref_codes.reshape(2, -1))
    # transformers' Janus looks codes up without normalising and normalises them only to decode;
    # LlamaGen (l2_normalize=True) normalises both, so the lookup is compared with it off
    codes = vq.encode(params, images, dataclasses.replace(cfg, l2_normalize=False))
    np.testing.assert_array_equal(np.asarray(codes), ref_codes.numpy())
    model = vq.VQGAN(cfg)
    decoded = jax.jit(lambda p, c: model.apply({'params': p}, c, method=vq.VQGAN.decode_codes))(params, codes)
    np.testing.assert_allclose(decoded, _nhwc(ref_images), atol=1e-4)


def test_a_checkpoint_for_another_codebook_is_refused_with_both_shapes():
    cfg = convert.config_from_taming(DDCONFIG, N_EMBED, EMBED_DIM)
    state = {'quantize.embedding.weight': np.zeros((64, EMBED_DIM), np.float32)}
    with pytest.raises(convert.WeightMismatch, match=r"'quantize.embedding.weight' has shape \(64, 8\).*needs \(32, 8\)"):
        convert.from_torch(state, cfg)
    with pytest.raises(convert.WeightMismatch, match='has no place'):
        convert.from_torch({'encoder.down.5.block.0.conv1.weight': np.zeros((32, 32, 3, 3), np.float32)}, cfg)
