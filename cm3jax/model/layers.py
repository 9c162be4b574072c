"""Building blocks of the transformer: initialisers, norms, the MLP and rotary embeddings.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``,
``norm``) so that `cm3jax.parallel` can map them onto a mesh. Kernels are created with
``self.param`` and applied with ``jnp.einsum`` or `dense` rather than ``nn.DenseGeneral``: a 3-D logically
partitioned DenseGeneral kernel breaks under an active mesh (docs/stack_notes.md, "3-D kernels").
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn


def trunc_normal(std: float):
    """Normal(0, std) truncated at +-3 std (CM3leon; docs/paper.md, "Model").

    ``jax.nn.initializers.truncated_normal`` rescales so that the *truncated* distribution has
    the given std; we want the paper's plain "std 0.006, cut at 3 std", so draw a standard
    normal truncated at 3 and scale it.
    """

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)

    return init


def param(module: nn.Module, name: str, init, shape: Sequence[int], axes: tuple, dtype):
    """A parameter with logical axis names attached (unboxed by ``nn.unbox`` / ``init_sharded``)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


def dense(x: jax.Array, kernel: jax.Array, axes: int = 1, preferred_element_type=None) -> jax.Array:
    """x [..., *K] times kernel [*K, *N] -> [..., *N], contracting x's last ``axes`` axes with the
    kernel's first ``axes``, as one 2-D matmul over the merged leading axes.

    The MLP and the logits use it: as an einsum ('btd,df->btf'), the kernel's gradient (a
    contraction over both b and t) made XLA:CPU copy the [B*T, F] output gradient into another
    layout first, about 7% of a quickstart LM step each for the logits and the MLP; merging b
    and t is a free reshape on every backend. (The [d, H, D] attention kernels measured no
    faster this way and stay einsums.)"""
    lead, k_shape, n_shape = x.shape[:x.ndim - axes], kernel.shape[:axes], kernel.shape[axes:]
    if x.shape[x.ndim - axes:] != k_shape:
        raise ValueError(f'dense: x {x.shape} does not end in the kernel\'s input axes {k_shape}')
    k, n = math.prod(k_shape), math.prod(n_shape)
    y = jnp.matmul(x.reshape(-1, k), kernel.reshape(k, n), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *n_shape)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, computed in float32.

    CM3leon's LayerNorm has no learnable parameters (``use_params=False``); Chameleon's RMSNorm
    has a scale.

    Attributes:
      kind: 'layernorm' or 'rmsnorm'.
      use_params: learnable scale (and bias, for layernorm).
      eps: added to the variance.
      feature_axes: logical names of the scale's axes; a per-head QK-norm uses
        ``('heads', 'kv')`` with a ``[H, D]`` scale.
    """

    kind: str = 'layernorm'
    use_params: bool = False
    eps: float = 1e-5
    feature_shape: tuple[int, ...] | None = None
    feature_axes: tuple[str | None, ...] = ('norm',)
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> [..., d], in x's dtype."""
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == 'layernorm':
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
        if self.use_params:
            shape = self.feature_shape or (x.shape[-1],)
            y = y * param(self, 'scale', nn.initializers.ones, shape, self.feature_axes, self.param_dtype)
            if self.kind == 'layernorm':
                y = y + param(self, 'bias', nn.initializers.zeros, shape, self.feature_axes, self.param_dtype)
        return y.astype(dtype)


class Mlp(nn.Module):
    """The feed-forward branch: GELU (CM3leon, 4x) or SwiGLU (Chameleon).

    The output projection is zero-initialised when ``zero_init_out`` (CM3leon: "the output
    layers are initialised at 0"), so every residual branch starts as the identity.
    """

    kind: str
    hidden_dim: int
    init_std: float
    zero_init_out: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, d] -> [B, T, d]."""
        d = x.shape[-1]
        init = trunc_normal(self.init_std)
        out_init = nn.initializers.zeros if self.zero_init_out else init
        w_in = param(self, 'wi', init, (d, self.hidden_dim), ('embed', 'mlp'), self.param_dtype)
        h = dense(x, w_in.astype(self.dtype))
        if self.kind == 'gelu':
            # exact GELU, as torch.nn.GELU() computes it
            h = nn.gelu(h, approximate=False)
        else:
            w_gate = param(self, 'wg', init, (d, self.hidden_dim), ('embed', 'mlp'), self.param_dtype)
            h = nn.silu(dense(x, w_gate.astype(self.dtype))) * h
        h = nn.with_logical_constraint(h, ('act_batch', 'act_len', 'act_mlp'))
        w_out = param(self, 'wo', out_init, (self.hidden_dim, d), ('mlp', 'embed'), self.param_dtype)
        return dense(h, w_out.astype(self.dtype))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the rotate-half layout (Llama / HF Chameleon).

    x: [B, T, N, D] with D even; positions: [B, T] int. Returns x's shape and dtype. The angle
    is computed in float32 so that positions in the thousands keep their precision in bf16.
    """
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, D/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def canon_problem(sites: str, taps, field: str) -> str | None:
    """What is wrong with a Canon setting named ``field`` (``sites``: any of 'A' and 'C', each
    once, '' = off; ``taps``: distinct ints >= 1, read only when on), or None: one check for every
    model that has Canon layers."""
    if not (isinstance(sites, str) and set(sites) <= set('AC') and len(set(sites)) == len(sites)):
        return (f'{field}={sites!r}: give the Canon sites, any of "A" (before attention) and "C" (before the MLP), '
                f'e.g. "AC"; "" = off')
    if sites and not (taps and all(isinstance(j, int) and j >= 1 for j in taps) and len(set(taps)) == len(taps)):
        return f'{field}_taps={taps!r} must be distinct ints >= 1 (how far back each tap reads)'
    return None


class Canon(nn.Module):
    """A causal short convolution with a residual, per channel: ``y_t = x_t + sum_j w_j * x_{t-j}``
    over the ``taps`` j (Allen-Zhu's Canon layers; Primer's depthwise convolutions are the same
    idea). A token then sees its few predecessors without spending an attention head on them:
    a shape word carries the colour word before it into the first MLP, which can bind the two.

    The weights start at zero (the identity). A tap reaching before the token's segment (its
    position < j) reads nothing, so packed documents never mix.
    """

    taps: tuple[int, ...]
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 history: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, T, d]; positions, segment_ids: [B, T]; history: [B, K, d] (K = max tap), the
        inputs of the K tokens before ``x[:, 0]`` in a cached call, else None.

        Returns (y [B, T, d], the new history [B, K, d]: the last K inputs of real tokens, or None
        without a history)."""
        k, (b, t, d) = max(self.taps), x.shape
        w = param(self, 'taps', nn.initializers.zeros, (len(self.taps), d), (None, 'embed'), self.param_dtype)
        # without a history the taps read a zero-padded x: one fused pass, no concatenated copy
        full = jnp.pad(x, ((0, 0), (k, 0), (0, 0))) if history is None else \
            jnp.concatenate([history.astype(x.dtype), x], axis=1)  # [B, K + T, d]
        y = x
        for i, j in enumerate(self.taps):
            y = y + jnp.where((positions >= j)[..., None], full[:, k - j:k - j + t], 0) * w[i].astype(x.dtype)
        if history is None:
            return y, None
        if t == 1:  # a decode step: its one token is real (`transformer.decode_step`)
            return y, full[:, 1:].astype(history.dtype)
        # the K latest real inputs, wherever the chunk's padding is (history slots count as real)
        real = jnp.concatenate([jnp.ones((b, k), bool), segment_ids != 0], axis=1)
        last = k + t - 1 - jnp.argmax(real[:, ::-1], axis=1)
        idx = last[:, None] - jnp.arange(k - 1, -1, -1)[None]
        return y, jnp.take_along_axis(full, idx[..., None], axis=1).astype(history.dtype)
