"""The decoder-only transformer: CM3leon by default, Chameleon's changes as independent switches.

CM3leon (docs/paper.md, "Model"): pre-LN with parameter-free LayerNorm, no biases, no dropout,
learned absolute positions (init std 2e-4), GELU MLP, trunc-normal(0.006, 3 std) init and
zero-initialised residual output projections.
Chameleon: RMSNorm, SwiGLU, RoPE, per-head QK-norm, swin-norm placement and GQA; each is a
field of `TransformerConfig`, so ablations can mix them.

Params are plain pytrees: ``params = model.init(rng, tokens)['params']``, then
``model.apply({'params': params}, tokens)``. Decoding uses an explicit cache pytree
(`init_cache`, `prefill`, `decode_step`) over the unrolled layer layout (`unrolled`); no Flax
mutable collections.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from cm3jax.model.attention import attention
from cm3jax.model.layers import Canon, Mlp, Norm, dense, param, rope, trunc_normal

Cache = dict[str, Any]  # see init_cache

REMAT_POLICIES = {
    'none': None,  # no rematerialisation
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Static hyperparameters; ``cm3jax.configuration.transformer_config`` builds one from a
    ConfigDict. Defaults are CM3leon's."""

    vocab_size: int  # real ids; logits of ids in [vocab_size, padded_vocab_size) are masked
    padded_vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    max_len: int
    norm: str = 'layernorm'  # 'layernorm' | 'rmsnorm'
    norm_params: bool = False  # CM3leon: LayerNorm without learnable params
    norm_eps: float = 1e-5
    norm_placement: str = 'pre'  # 'pre': x + f(norm(x)); 'swin': x + norm(f(x))
    mlp: str = 'gelu'  # 'gelu' | 'swiglu'
    position: str = 'learned'  # 'learned' | 'rope'
    rope_theta: float = 10000.0
    qk_norm: bool = False
    qk_norm_eps: float = 1e-5  # Chameleon's QK LayerNorm keeps 1e-5 whatever norm_eps is
    tie_embeddings: bool = True
    init_std: float = 0.006
    pos_init_std: float = 2e-4
    zero_init_out: bool = True
    attention: str = 'xla'
    scan_layers: bool = True
    scan_unroll: int = 1  # layers per iteration of the scan; num_layers: no loop, same stacked params
    # A learned embedding of each image code's place in its image (0 .. image_positions - 1),
    # added to the code's token embedding, as DALL-E gives image tokens row and column
    # embeddings: with a caption of any length before it, the code's row and column are then an
    # input, not a count from the <break> the model must learn. 0 = off (CM3leon, Chameleon).
    # image_ids: [start, stop) of the image-code ids that get it.
    image_positions: int = 0
    image_ids: tuple[int, int] = (0, 0)
    # Canon layers (`layers.Canon`): a causal short convolution on the residual stream before
    # each layer's attention ('A') and/or MLP ('C'), over the previous ``canon_taps`` tokens.
    # '' = off (CM3leon, Chameleon).
    canon: str = ''
    canon_taps: tuple[int, ...] = (1, 2, 3)
    remat: str = 'none'
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, T] positions that restart at 0 where a segment starts."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def image_index(tokens: jax.Array, segment_ids: jax.Array, image_ids: tuple[int, int],
                carry: jax.Array | None = None) -> jax.Array:
    """Int32[B, T]: each image code's place in its run of consecutive codes (0 = the first),
    -1 on every other token. A run ends at any other token and at a segment start.

    carry: Int32[B], the place of the token just before ``tokens[:, 0]`` in the same segment
    (-1: none, or not an image code), so that a cached call continues an image begun earlier.
    """
    lo, hi = image_ids
    is_image = (tokens >= lo) & (tokens < hi)
    t = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    # idx = t - (the last run boundary at or before t) - 1, a boundary sitting on each other
    # token, just before a code that starts a segment, and (for a carried run) before the chunk
    bound = jnp.where(~is_image, t, jnp.where(starts, t - 1, -(1 << 30)))
    if carry is None:
        carry = jnp.full(tokens.shape[:1], -1, jnp.int32)
    first = -carry - 2  # a boundary that puts the chunk's first code at carry + 1
    last = jnp.maximum(first[:, None], jax.lax.cummax(bound, axis=1))
    return jnp.where(is_image, t - last - 1, -1)


def _lookup(table: jax.Array, ids: jax.Array, row_axis: str | None) -> jax.Array:
    """table[ids] from a table made whole along 'embed' first (as FSDP gathers every weight
    before use): gathering from an fsdp-split table makes the partitioner replicate the output."""
    return jnp.take(nn.with_logical_constraint(table, (row_axis, None)), ids, axis=0)


class Attention(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions, kv_segment_ids, kv_positions, layer_cache, end):
        """x: [B, T, d]. With a layer cache {'k': [B, KV, D, S], 'v': [B, KV, S, D]}, this
        step's k/v are written at slots [end, end+T) and attention reads all S slots."""
        cfg = self.cfg
        d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = trunc_normal(cfg.init_std)
        out_init = nn.initializers.zeros if cfg.zero_init_out else init
        wq = param(self, 'wq', init, (d, h, hd), ('embed', 'heads', 'kv'), cfg.param_dtype)
        wk = param(self, 'wk', init, (d, kvh, hd), ('embed', 'kv_heads', 'kv'), cfg.param_dtype)
        wv = param(self, 'wv', init, (d, kvh, hd), ('embed', 'kv_heads', 'kv'), cfg.param_dtype)
        wo = param(self, 'wo', out_init, (h, hd, d), ('heads', 'kv', 'embed'), cfg.param_dtype)
        q = jnp.einsum('btd,dhk->bthk', x, wq.astype(cfg.dtype))
        k = jnp.einsum('btd,dhk->bthk', x, wk.astype(cfg.dtype))
        v = jnp.einsum('btd,dhk->bthk', x, wv.astype(cfg.dtype))
        if cfg.qk_norm:  # Chameleon: LayerNorm over head_dim, its own weight and bias per head
            q = Norm('layernorm', True, cfg.qk_norm_eps, (h, hd), ('heads', 'kv'), cfg.param_dtype, name='q_norm')(q)
            k = Norm('layernorm', True, cfg.qk_norm_eps, (kvh, hd), ('kv_heads', 'kv'), cfg.param_dtype, name='k_norm')(k)
        if cfg.position == 'rope':
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        q = nn.with_logical_constraint(q, ('act_batch', 'act_len', 'act_heads', None))
        k = nn.with_logical_constraint(k, ('act_batch', 'act_len', 'act_kv_heads', None))
        new_cache = None
        if layer_cache is not None:  # k slots [B, KV, D, S], v slots [B, KV, S, D]: see cached_attention
            write = lambda slots, new, axis: jax.lax.dynamic_update_slice_in_dim(
                slots, new.astype(slots.dtype), end, axis=axis)
            new_cache = {'k': write(layer_cache['k'], k.transpose(0, 2, 3, 1), 3),
                         'v': write(layer_cache['v'], v.swapaxes(1, 2), 2)}
            k, v = new_cache['k'].astype(cfg.dtype), new_cache['v'].astype(cfg.dtype)
        out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                        q_positions=positions, kv_positions=kv_positions,
                        implementation=cfg.attention, cached=layer_cache is not None)
        out = nn.with_logical_constraint(out, ('act_batch', 'act_len', 'act_heads', None))
        return jnp.einsum('bthk,hkd->btd', out, wo.astype(cfg.dtype)), new_cache


class Block(nn.Module):
    """One layer; returns (x, layer_cache) so that it can be the body of ``nn.scan``."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, layer_cache, segment_ids, positions, kv_segment_ids, kv_positions, end):
        cfg = self.cfg
        norm = lambda name: Norm(cfg.norm, cfg.norm_params, cfg.norm_eps, param_dtype=cfg.param_dtype, name=name)
        attn = Attention(cfg, name='attn')
        mlp = Mlp(cfg.mlp, cfg.mlp_dim, cfg.init_std, cfg.zero_init_out, cfg.dtype, cfg.param_dtype, name='mlp')
        cached = layer_cache is not None
        histories = {}

        def canon(x, site):
            if site not in cfg.canon:
                return x
            name = f'canon_{site.lower()}'
            y, histories[name] = Canon(cfg.canon_taps, cfg.param_dtype, name=name)(
                x, positions, segment_ids, layer_cache[name] if cached else None)
            return y

        ctx = (segment_ids, positions, kv_segment_ids, kv_positions, layer_cache, end)
        x = canon(x, 'A')
        if cfg.norm_placement == 'pre':
            y, kv = attn(norm('attn_norm')(x), *ctx)
            x = canon(x + y, 'C')
            x = x + mlp(norm('mlp_norm')(x))
        else:  # swin (Chameleon-34B): normalise the branch output, not its input
            y, kv = attn(x, *ctx)
            x = canon(x + norm('attn_norm')(y), 'C')
            x = x + norm('mlp_norm')(mlp(x))
        x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))
        return x, (kv | histories if cached else None)


class Transformer(nn.Module):
    """Decoder-only LM.

    ``__call__(tokens, segment_ids=None, positions=None)`` -> logits Float[B, T, V_padded];
    with ``cache=...`` it returns ``(logits, new_cache)`` (see `prefill`, `decode_step`).
    segment_ids: [B, T], 0 marks padding, packed documents have distinct ids (default: all 1).
    positions: [B, T] (default: restart at 0 at each segment start).
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, cache: Cache | None = None):
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        embed = param(self, 'embed', trunc_normal(cfg.init_std), (cfg.padded_vocab_size, cfg.d_model),
                      ('vocab', 'embed'), cfg.param_dtype)
        x = _lookup(embed, tokens, 'vocab').astype(cfg.dtype)
        if cfg.position == 'learned':
            pos_embed = param(self, 'pos_embed', trunc_normal(cfg.pos_init_std), (cfg.max_len, cfg.d_model),
                              (None, 'embed'), cfg.param_dtype)
            x = x + _lookup(pos_embed, positions, None).astype(cfg.dtype)
        if cfg.image_positions:
            carry = None if cache is None else _image_carry(cache, segment_ids)
            places = image_index(tokens, segment_ids, cfg.image_ids, carry)
            image_embed = param(self, 'image_pos_embed', trunc_normal(cfg.init_std),
                                (cfg.image_positions, cfg.d_model), (None, 'embed'), cfg.param_dtype)
            looked_up = _lookup(image_embed, jnp.clip(places, 0, cfg.image_positions - 1), None)
            x = x + jnp.where(places[..., None] >= 0, looked_up, 0).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))

        end = None
        kv_segment_ids, kv_positions = segment_ids, positions
        if cache is not None:
            if cfg.scan_layers:
                raise ValueError('a cached call needs the unrolled layout: convert with '
                                 '`transformer.unrolled(model, params)` (prefill and decode_step do)')
            end = cache['end']
            kv_segment_ids = jax.lax.dynamic_update_slice_in_dim(cache['segment_ids'], segment_ids, end, axis=1)
            kv_positions = jax.lax.dynamic_update_slice_in_dim(cache['positions'], positions, end, axis=1)
        ctx = (segment_ids, positions, kv_segment_ids, kv_positions, end)

        block = Block
        if cfg.remat != 'none':
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        new_layers = {name: [] for name in _layer_cache_names(cfg)}
        if cfg.scan_layers:
            stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                            in_axes=(0,) + (nn.broadcast,) * len(ctx), length=cfg.num_layers,
                            unroll=min(cfg.scan_unroll, cfg.num_layers), metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, name='layers')
            x, _ = stack(x, None, *ctx)
        else:
            for i in range(cfg.num_layers):
                this = None if cache is None else {name: cache[name][i] for name in new_layers}
                x, this = block(cfg, name=f'layers_{i}')(x, this, *ctx)
                if this is not None:
                    for name in new_layers:
                        new_layers[name].append(this[name])

        x = Norm(cfg.norm, cfg.norm_params, cfg.norm_eps, param_dtype=cfg.param_dtype, name='final_norm')(x)
        if cfg.tie_embeddings:
            logits = dense(x, embed.astype(cfg.dtype).T, preferred_element_type=jnp.float32)
        else:
            head = param(self, 'lm_head', trunc_normal(cfg.init_std), (cfg.d_model, cfg.padded_vocab_size),
                         ('embed', 'vocab'), cfg.param_dtype)
            logits = dense(x, head.astype(cfg.dtype), preferred_element_type=jnp.float32)
        if cfg.padded_vocab_size > cfg.vocab_size:  # padding ids exist only for sharding
            valid = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
            logits = jnp.where(valid, logits, jnp.finfo(logits.dtype).min)
        logits = nn.with_logical_constraint(logits, ('act_batch', 'act_len', 'act_vocab'))
        if cache is None:
            return logits
        new_cache = dict(new_layers, segment_ids=kv_segment_ids, positions=kv_positions, end=end + tokens.shape[1])
        if cfg.image_positions:
            new_cache['image_index'] = jax.lax.dynamic_update_slice_in_dim(cache['image_index'], places, end, axis=1)
        return logits, new_cache


def _image_carry(cache: Cache, segment_ids: jax.Array) -> jax.Array:
    """Int32[B]: the image place of each row's latest cached token of the chunk's first
    segment (the one with the largest position), -1 when there is none."""
    seg = cache['segment_ids']
    same = (seg == segment_ids[:, :1]) & (seg != 0)
    slot = jnp.argmax(jnp.where(same, cache['positions'], -1), axis=1)
    place = jnp.take_along_axis(cache['image_index'], slot[:, None], axis=1)[:, 0]
    return jnp.where(same.any(axis=1), place, -1)


# --- the KV-cache path ---------------------------------------------------------------------
#
# Cached calls run the layers unrolled, each with its own cache buffers: inside a decode loop
# every layer's k/v slots are then written in place and read in place by the attention dots.
# (A layer scan would hand each layer a slice of one stacked [L, ...] cache and stack the
# results again: three copies of the whole cache per token.)

LAYER_CACHE_AXES = ('act_batch', 'act_kv_heads', None, None)  # k: [B, KV, D, S], v: [B, KV, S, D]
CANON_CACHE_AXES = ('act_batch', None, 'act_embed')  # a Canon layer's last inputs: [B, K, d]


def _layer_cache_names(cfg: TransformerConfig) -> tuple[str, ...]:
    """The per-layer entries of the cache: k and v, and each Canon site's input history."""
    return ('k', 'v') + tuple(f'canon_{site.lower()}' for site in 'AC' if site in cfg.canon)


def cache_axes(cfg: TransformerConfig) -> dict:
    """Logical axes of `init_cache`'s pytree, leaf for leaf (for ``parallel.shard_tree``)."""
    axes = {name: [LAYER_CACHE_AXES if name in ('k', 'v') else CANON_CACHE_AXES] * cfg.num_layers
            for name in _layer_cache_names(cfg)}
    axes |= {'segment_ids': ('act_batch', None), 'positions': ('act_batch', None), 'end': ()}
    return axes | ({'image_index': ('act_batch', None)} if cfg.image_positions else {})


def init_cache(cfg: TransformerConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty cache of ``max_len`` slots per row.

    k, v: lists of L arrays, one per layer, k [B, KV, D, S] and v [B, KV, S, D] (the layouts
    whose decode-step dots are plain matrix products; see `attention.cached_attention`), in
    ``dtype`` (default the compute dtype); segment_ids, positions: [B, S] int32 (0 = empty slot);
    end: int32 scalar, the next slot written; with ``cfg.image_positions``, image_index:
    [B, S] int32, each slot's place in its image (-1: not an image code; see `image_index`).
    `cache_axes` gives the logical axes for sharding it.
    """
    if max_len > cfg.max_len and cfg.position == 'learned':
        raise ValueError(f'a cache of {max_len} slots exceeds model.max_len={cfg.max_len}; '
                         f'learned positions exist only up to max_len')
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = dtype or cfg.dtype
    cache = {'k': [jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)],
             'v': [jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)],
             'segment_ids': jnp.zeros((batch, max_len), jnp.int32),
             'positions': jnp.zeros((batch, max_len), jnp.int32),
             'end': jnp.zeros((), jnp.int32)}
    for name in _layer_cache_names(cfg)[2:]:  # Canon histories
        cache[name] = [jnp.zeros((batch, max(cfg.canon_taps), cfg.d_model), dtype) for _ in range(cfg.num_layers)]
    if cfg.image_positions:
        cache['image_index'] = jnp.full((batch, max_len), -1, jnp.int32)
    return cache


def muon_dims(params) -> Any:
    """The weights Muon trains as matrices (``optim.name='muon'``), as
    `optax.contrib.MuonDimensionNumbers` (None elsewhere): each projection's input axes against
    its output axes, with a scanned stack's layer axis (and any other leading axis) batched.
    Embeddings, the output head and norm gains stay on AdamW."""
    from optax.contrib import MuonDimensionNumbers as Dims

    def dims(path, x):
        names = [getattr(k, 'key', getattr(k, 'name', '')) for k in path]
        n, name = x.ndim, names[-1]
        if 'attn' in names and name in ('wq', 'wk', 'wv'):  # [..., embed, heads, head_dim]
            return Dims(n - 3, (n - 2, n - 1))
        if 'attn' in names and name == 'wo':                 # [..., heads, head_dim, embed]
            return Dims((n - 3, n - 2), n - 1)
        if 'mlp' in names and name in ('wi', 'wg', 'wo'):    # [..., in, out]
            return Dims(n - 2, n - 1)
        return None
    return jax.tree_util.tree_map_with_path(dims, params)


def unrolled(model: Transformer, params) -> tuple[Transformer, Any]:
    """(model, params) with the layer stack unrolled: ``layers`` [L, ...] becomes ``layers_0`` ..
    ``layers_{L-1}``, and no remat (decoding keeps no activations). The cached calls need this
    layout; convert once outside a decode loop so that the loop does not slice the stack every
    step. A model already unrolled comes back as is."""
    cfg = dataclasses.replace(model.cfg, scan_layers=False, remat='none')
    if model.cfg.scan_layers:
        params = dict(params)
        stack = params.pop('layers')
        params |= {f'layers_{i}': jax.tree.map(lambda p: p[i], stack) for i in range(cfg.num_layers)}
    return (model if cfg == model.cfg else Transformer(cfg)), params


def prefill(model: Transformer, params, cache: Cache, tokens, segment_ids=None, positions=None):
    """Run a prompt batch through the model and write it into the cache.

    tokens: [B, T]; segment_ids: [B, T] with 0 on padding, so ragged prompts may be left- or
    right-padded (default: all 1); positions default to restarting per segment.
    Returns (logits [B, T, V], cache). Call it on an empty cache (or pass positions).
    """
    slots = cache['segment_ids'].shape[1]
    if tokens.shape[1] > slots:
        raise ValueError(f'the prompt has {tokens.shape[1]} tokens but the cache only {slots} slots; '
                         f'pass a larger max_len to init_cache')
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens, jnp.int32)
    model, params = unrolled(model, params)
    return model.apply({'params': params}, tokens, segment_ids, positions, cache=cache)


def decode_step(model: Transformer, params, cache: Cache, tokens):
    """Append one token per row and return (logits [B, V], cache).

    tokens: [B]. Each token continues its row's last segment at the next position, whatever
    padding the prompt had. The caller keeps ``cache['end']`` below the cache length. In a loop,
    pass the model and params through `unrolled` once before it.
    """
    seg = cache['segment_ids']
    last = seg.max(axis=1, keepdims=True)  # [B, 1]; prompts of zero length start segment 1
    pos = jnp.where((seg == last) & (seg != 0), cache['positions'] + 1, 0).max(axis=1, keepdims=True)
    model, params = unrolled(model, params)
    logits, cache = model.apply({'params': params}, tokens[:, None], jnp.maximum(last, 1), pos, cache=cache)
    return logits[:, 0], cache
