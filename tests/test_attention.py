"""Attention implementations agree; unavailable kernels fall back with a message."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from cm3jax import parallel
from cm3jax.model import attention as attn
from cm3jax.model.transformer import positions_from_segments

B, T, H, KV, D = 4, 256, 4, 2, 32


def _inputs():
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = jax.random.normal(ks[1], (B, T, KV, D)), jax.random.normal(ks[2], (B, T, KV, D))
    seg = jnp.ones((B, T), jnp.int32).at[1, 100:].set(2).at[2, 200:].set(0)  # packed and padded rows
    return q, k, v, seg, positions_from_segments(seg)


def _reference(q, k, v, seg, pos):
    return attn.xla_attention(q, k, v, attn.attention_mask(seg, seg, pos, pos))


def test_xla_attention_matches_a_dense_per_head_loop():
    q, k, v, seg, pos = _inputs()
    out = _reference(q, k, v, seg, pos)
    mask = np.asarray(attn.attention_mask(seg, seg, pos, pos))[:, 0]
    for h in range(H):
        kv = h // (H // KV)  # GQA: consecutive query heads share a k/v head
        logits = np.einsum('btd,bsd->bts', q[:, :, h], k[:, :, kv]) / np.sqrt(D)
        logits = np.where(mask, logits, -1e30)  # padding rows stay finite
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        expected = np.einsum('bts,bsd->btd', probs, v[:, :, kv])
        valid = np.asarray(seg) != 0
        np.testing.assert_allclose(np.asarray(out[:, :, h])[valid], expected[valid], atol=1e-5)


def test_causal_blocks_skip_the_upper_triangle_exactly():
    """The blocked full-pass path equals the dense one on packed and padded rows, with gradients."""
    q, k, v, seg, pos = _inputs()
    mask = attn.attention_mask(seg, seg, pos, pos)
    valid = (seg != 0)[:, :, None, None]
    loss = lambda block: lambda q, k, v: (jnp.where(valid, attn.xla_attention(q, k, v, mask, causal_block=block),
                                                    0) ** 2).sum()
    dense, blocked = jax.jit(jax.value_and_grad(loss(0), (0, 1, 2))), jax.jit(jax.value_and_grad(loss(64), (0, 1, 2)))
    (l0, g0), (l1, g1) = dense(q, k, v), blocked(q, k, v)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_splash_kernel_matches_xla_in_interpret_mode():
    """The TPU kernel itself, run by the Pallas interpreter on CPU: forward and gradients."""
    q, k, v, seg, pos = _inputs()
    valid = (seg != 0)[:, :, None, None]
    loss = lambda f: lambda q, k, v: (jnp.where(valid, f(q, k, v), 0) ** 2).sum()
    splash = lambda q, k, v: attn.splash_attention(q, k, v, seg, seg, interpret=True)
    xla = lambda q, k, v: _reference(q, k, v, seg, pos)
    np.testing.assert_allclose(jnp.where(valid, splash(q, k, v), 0), jnp.where(valid, xla(q, k, v), 0), atol=1e-5)
    for g_splash, g_xla in zip(jax.grad(loss(splash), (0, 1, 2))(q, k, v), jax.grad(loss(xla), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_splash, g_xla, atol=1e-4)


def test_splash_kernel_runs_per_shard_under_a_mesh():
    q, k, v, seg, pos = _inputs()
    mesh = parallel.create_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        out = jax.jit(lambda q, k, v, s: attn.splash_attention(q, k, v, s, s, interpret=True))(q, k, v, seg)
    valid = (seg != 0)[:, :, None, None]
    np.testing.assert_allclose(jnp.where(valid, out, 0), jnp.where(valid, _reference(q, k, v, seg, pos), 0), atol=1e-5)


@pytest.mark.parametrize('implementation,needs', [('cudnn', 'NVIDIA GPU'), ('splash', 'TPU')])
def test_missing_backends_fall_back_to_xla_with_a_message(implementation, needs, caplog):
    q, k, v, seg, pos = _inputs()
    attn._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger='cm3jax.model.attention'):
        out = attn.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                             implementation=implementation)
    assert f"model.attention='{implementation}' needs a" in caplog.text and needs in caplog.text
    np.testing.assert_array_equal(out, _reference(q, k, v, seg, pos))


def test_unknown_implementation_is_rejected():
    q, k, v, seg, pos = _inputs()
    with pytest.raises(ValueError, match="model.attention='flash' is unknown"):
        attn.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                       implementation='flash')
