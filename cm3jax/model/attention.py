"""Attention implementations, selectable by ``model.attention``: 'xla', 'cudnn' and 'splash'.

All three compute the same function: causal attention inside a segment, where
``segment_id == 0`` marks padding or an empty cache slot, and GQA when k/v have fewer heads
than q. Layout is [batch, length, heads, head_dim], except the cache's slots (see
`cached_attention`).

- 'xla': plain jnp, runs everywhere; the reference that tests check the others against.
- 'cudnn': ``jax.nn.dot_product_attention(implementation='cudnn')``, flash attention on NVIDIA
  GPUs. cuDNN needs float16/bfloat16 inputs.
- 'splash': the Pallas TPU splash-attention kernel, run per shard under ``jax.shard_map``.
  It masks by slot order (causal) plus segment ids, which equals the position mask for packed
  training rows, so it is used for full-sequence passes of lengths that are a multiple of its
  block size; cached decoding always takes the 'xla' path.

Where the backend lacks a kernel, the call falls back to 'xla' and logs once why.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ('xla', 'cudnn', 'splash')
SPLASH_BLOCK = 128
XLA_CAUSAL_BLOCK = 128  # query block of the 'xla' path's causal skipping (see xla_attention)

log = logging.getLogger(__name__)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions) -> jax.Array:
    """Bool[B, 1, T, S]: same non-zero segment, and the key's position <= the query's."""
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return (same & causal)[:, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                  causal_block: int = 0) -> jax.Array:
    """q: [B, T, H, D], k/v: [B, S, KV, D], mask: Bool[B, 1, T, S] -> [B, T, H, D].

    Logits and softmax in float32. A fully masked row (a padding query) gets a uniform
    distribution instead of NaN; its output is never used.

    ``causal_block`` > 0 declares a full causal pass (k/v are the same T tokens as q, so a key
    slot after the query's is always masked) and splits the queries into blocks of that size,
    each attending only to the keys up to its block's end. Skipping the masked upper triangle
    saves close to half the attention work and memory traffic at long lengths; the result is
    the same.
    """
    t = q.shape[1]
    if not causal_block or t != k.shape[1] or t % causal_block or t <= causal_block:
        return _attend(q, k, v, mask)
    blocks = [_attend(q[:, i:i + causal_block], k[:, :i + causal_block], v[:, :i + causal_block],
                      mask[:, :, i:i + causal_block, :i + causal_block]) for i in range(0, t, causal_block)]
    return jnp.concatenate(blocks, axis=1)


def _attend(q, k, v, mask):
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = (q * d**-0.5).reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
    return out.reshape(b, t, h, d)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: [B, T, H, D]; cache slots k: [B, KV, D, S], v: [B, KV, S, D]; mask: Bool[B, 1, T, S]
    -> [B, T, H, D].

    Each (batch, kv head) is one plain matrix product [G*T, D] x [D, S], then [G*T, S] x [S, D]
    (G query heads per kv head). XLA:CPU runs those several times faster than the layouts of
    the full pass: [B, S, KV, D] slots, or a separate unit T axis in the dot, made it transpose
    or run strided batched dots (1.5-3.8 vs 0.35 ms a layer at 16 rows and 272 slots).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    q = (q * d**-0.5).reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    logits = jnp.einsum('bkmd,bkds->bkms', q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None], logits.reshape(b, kv_heads, g, t, -1), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, -1)
    out = jnp.einsum('bkms,bksd->bkmd', probs, v)
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def cudnn_attention(q, k, v, mask, *, causal: bool) -> jax.Array:
    """cuDNN flash attention; the segment mask goes in as a bias, ``is_causal`` lets cuDNN skip
    the upper triangle when query and key slots are aligned (no cache)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation='cudnn')


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, interpret: bool = False) -> jax.Array:
    """Pallas splash attention for a full causal pass (T == S, T % 128 == 0).

    q: [B, T, H, D], k/v: [B, T, KV, D], segment ids: [B, T]. Under a mesh the kernel runs per
    shard: batch over the axes of ``act_batch`` and heads over those of ``act_heads``.
    ``interpret=True`` runs the kernel in the Pallas interpreter (any backend; slow), which is
    how the CPU tests check it.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    d = q.shape[-1]

    def per_shard(q, k, v, q_seg, kv_seg):
        heads, length = q.shape[2], q.shape[1]
        mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
        block = min(SPLASH_BLOCK, length)
        sizes = splash.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block,
            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
            block_q_dq=block, block_kv_dq=block)
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)

        def one(q, k, v, q_seg, kv_seg):  # kernel layout: heads first, no batch
            out = kernel(q.swapaxes(0, 1) * d**-0.5, k.swapaxes(0, 1), v.swapaxes(0, 1),
                         segment_ids=splash.SegmentIds(q=q_seg, kv=kv_seg))
            return out.swapaxes(0, 1)

        return jax.vmap(one)(q, k, v, q_seg, kv_seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_shard(q, k, v, q_segment_ids, kv_segment_ids)
    qkv_spec = nn.logical_to_mesh_axes(('act_batch', None, 'act_heads', None))
    seg_spec = P(qkv_spec[0], None)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2,
                         out_specs=qkv_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
              implementation: str = 'xla', cached: bool = False) -> jax.Array:
    """Dispatch to an implementation; see the module docstring.

    q: [B, T, H, D]; k, v: [B, S, KV, D], or with ``cached`` the cache's slots (k [B, KV, D, S],
    v [B, KV, S, D]) rather than the same T tokens as q; segment ids and positions: [B, T] and
    [B, S].
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f'model.attention={implementation!r} is unknown; use one of {IMPLEMENTATIONS}')
    backend = jax.default_backend()
    if implementation == 'splash':
        length = q.shape[1]
        if backend != 'tpu':
            _warn_once(f"model.attention='splash' needs a TPU (backend is {backend!r}); using 'xla'")
        elif cached:
            pass  # decoding reads a cache; splash is a full-sequence kernel
        elif length % SPLASH_BLOCK:
            _warn_once(f"model.attention='splash' needs the length to be a multiple of "
                       f"{SPLASH_BLOCK} (got {length}); using 'xla'")
        else:
            return splash_attention(q, k, v, q_segment_ids, kv_segment_ids)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    if implementation == 'cudnn':
        if backend != 'gpu':
            _warn_once(f"model.attention='cudnn' needs an NVIDIA GPU (backend is {backend!r}); using 'xla'")
        elif q.dtype not in (jnp.bfloat16, jnp.float16):
            _warn_once(f"model.attention='cudnn' needs model.dtype bfloat16 or float16 "
                       f"(got {np.dtype(q.dtype).name}); using 'xla'")
        elif cached:
            return cudnn_attention(q, k.transpose(0, 3, 1, 2), v.swapaxes(1, 2), mask, causal=False)
        else:
            return cudnn_attention(q, k, v, mask, causal=True)
    if cached:
        return cached_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask, causal_block=XLA_CAUSAL_BLOCK)
