"""The transformer encoder shared by CLIP's two towers: pre-LN blocks with biases everywhere.

The layout is OpenAI CLIP's (and transformers' ``CLIPEncoderLayer``):
``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``, the MLP being ``fc2(act(fc1(x)))`` with
quick-GELU (OpenAI) or exact GELU (LAION-style checkpoints). Unlike the CM3leon LM, every
projection has a bias and every LayerNorm has a scale and a bias.

Parameters carry the LM's logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``norm``,
``layers``), so `cm3jax.parallel.DEFAULT_RULES` shard both towers the way they shard the LM.
Kernels are einsums over ``param(...)`` arrays rather than ``nn.DenseGeneral`` (docs/stack_notes.md, "3-D kernels").
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from cm3jax.model.attention import xla_attention
from cm3jax.model.layers import Canon, Norm, param

ACTIVATIONS = ('quick_gelu', 'gelu')



def normal(std: float):
    """Normal(0, std), drawn flat and reshaped: same distribution, but XLA:CPU compiles a
    random draw of rank >= 3 several times slower (seconds per kernel), which dominated init."""

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)

    return init


# CLIP's init std for projections; checkpoints overwrite it for the frozen retriever.
_init = normal(0.02)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == 'quick_gelu':  # OpenAI CLIP's sigmoid approximation; checkpoints depend on it
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=False)  # transformers' 'gelu' is the exact erf form


def layer_norm(eps: float, name: str) -> Norm:
    return Norm('layernorm', use_params=True, eps=eps, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: Float[B, T, W]; mask: Bool[B or 1, 1, T, T] (True = may attend) -> Float[B, T, W]."""
        w, h = x.shape[-1], self.heads
        d = w // h
        dt = self.dtype

        def project(name):
            kernel = param(self, f'w{name}', _init, (w, h, d), ('embed', 'heads', 'kv'), jnp.float32)
            bias = param(self, f'b{name}', nn.initializers.zeros, (h, d), ('heads', 'kv'), jnp.float32)
            return jnp.einsum('btw,whd->bthd', x, kernel.astype(dt)) + bias.astype(dt)

        q, k, v = project('q'), project('k'), project('v')
        q = nn.with_logical_constraint(q, ('act_batch', 'act_len', 'act_heads', None))
        k = nn.with_logical_constraint(k, ('act_batch', 'act_len', 'act_heads', None))
        out = xla_attention(q, k, v, mask)
        out = nn.with_logical_constraint(out, ('act_batch', 'act_len', 'act_heads', None))
        wo = param(self, 'wo', _init, (h, d, w), ('heads', 'kv', 'embed'), jnp.float32)
        bo = param(self, 'bo', nn.initializers.zeros, (w,), ('embed',), jnp.float32)
        return jnp.einsum('bthd,hdw->btw', out, wo.astype(dt)) + bo.astype(dt)


class Mlp(nn.Module):
    hidden_dim: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: Float[B, T, W] -> Float[B, T, W]."""
        w, dt = x.shape[-1], self.dtype
        wi = param(self, 'wi', _init, (w, self.hidden_dim), ('embed', 'mlp'), jnp.float32)
        bi = param(self, 'bi', nn.initializers.zeros, (self.hidden_dim,), ('mlp',), jnp.float32)
        wo = param(self, 'wo', _init, (self.hidden_dim, w), ('mlp', 'embed'), jnp.float32)
        bo = param(self, 'bo', nn.initializers.zeros, (w,), ('embed',), jnp.float32)
        y = activation(self.act, jnp.einsum('btw,wf->btf', x, wi.astype(dt)) + bi.astype(dt))
        y = nn.with_logical_constraint(y, ('act_batch', 'act_len', 'act_mlp'))
        return jnp.einsum('btf,fw->btw', y, wo.astype(dt)) + bo.astype(dt)


class Block(nn.Module):
    """One pre-LN layer; returns ``(x, None)`` so that it can be the body of ``nn.scan``.
    ``canon``: Canon layers (`cm3jax.model.layers.Canon`) on the residual stream before the
    attention ('A') and/or the MLP ('C'), for a causal tower (the text's); '' = none, as in CLIP."""

    heads: int
    mlp_dim: int
    act: str
    eps: float
    dtype: Any = jnp.float32
    canon: str = ''
    canon_taps: tuple[int, ...] = (1, 2, 3)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array):
        def canon(x, site):
            if site not in self.canon:
                return x
            positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            return Canon(self.canon_taps, name=f'canon_{site.lower()}')(x, positions, jnp.ones(x.shape[:2], jnp.int32))[0]

        x = canon(x, 'A')
        x = x + SelfAttention(self.heads, self.dtype, name='attn')(layer_norm(self.eps, 'attn_norm')(x), mask)
        x = canon(x, 'C')
        x = x + Mlp(self.mlp_dim, self.act, self.dtype, name='mlp')(layer_norm(self.eps, 'mlp_norm')(x))
        return nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed')), None


class Encoder(nn.Module):
    """``layers`` Blocks, scanned: params are stacked [L, ...] under ``layers`` (one compiled
    body whatever the depth, which keeps ViT-B/32's 2 x 12 layers quick to compile)."""

    layers: int
    heads: int
    mlp_dim: int
    act: str
    eps: float
    dtype: Any = jnp.float32
    scan_unroll: int = 1  # layers per loop iteration: unrolling a shallow stack spares XLA:CPU the loop's residual copies
    canon: str = ''  # Block's Canon sites (a causal tower only)
    canon_taps: tuple[int, ...] = (1, 2, 3)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: Float[B, T, W]; mask: Bool[B or 1, 1, T, T] -> Float[B, T, W]."""
        stack = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True},
                        in_axes=(nn.broadcast,), length=self.layers, unroll=min(self.scan_unroll, self.layers),
                        metadata_params={nn.PARTITION_NAME: 'layers'})
        x, _ = stack(self.heads, self.mlp_dim, self.act, self.eps, self.dtype, self.canon, self.canon_taps,
                     name='layers')(x, mask)
        return x
