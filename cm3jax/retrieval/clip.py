"""CLIP dual encoder: the frozen retriever of retrieval augmentation and the CLIP-score judge.

docs/paper.md, "Retrieval augmentation": the retriever is a CLIP ViT-B/32 bi-encoder. Each document is split into a
text part and an image part, each part is embedded and L2-normalised, and the two are averaged
(`embed_document`); retrieval is maximum inner product search over those vectors. Section 5
re-ranks sampled images by CLIP score (`clip_score`).

The architecture is OpenAI CLIP's, numerically as transformers' ``CLIPModel`` computes it
(`cm3jax.convert.clip` loads its checkpoints):

- image tower: a bias-free patch "conv", a class token, learned positions, a LayerNorm before
  the encoder (OpenAI's ``ln_pre``, transformers' ``pre_layrnorm``), pre-LN blocks, LayerNorm on
  the class token, a bias-free projection;
- text tower: token + learned position embeddings, causal pre-LN blocks (padding keys masked
  too), a final LayerNorm, the state at the end-of-text token, a bias-free projection;
- a learned temperature ``logit_scale`` (log of the inverse temperature).

Text pooling follows transformers' ``CLIPTextTransformer``: a checkpoint whose config says
``eos_token_id == 2`` (the value configs carried before transformers PR #24773, including
openai/clip-vit-base-patch32's) pools at ``argmax(ids)``, which is the end-of-text token only
because OpenAI's ``<|endoftext|>`` (49407) is the largest id; any other ``eos_token_id`` pools at
its *first* occurrence (pads may equal it), and at position 0 in a row without one.

Usage (all functions are pure; those taking ``cfg`` jit with it static)::

    cfg = ClipConfig(...)                       # or cm3jax.convert.clip.config_from_hf(...)
    params = init(cfg, jax.random.key(0))       # or cm3jax.convert.clip.load(path, cfg)
    t = embed_text(params, cfg, ids, mask)      # Float[B, P], unit norm
    v = embed_image(params, cfg, images)        # Float[B, P], unit norm
    docs = embed_document(t, v, has_text, has_image)

Sharded init: ``cm3jax.params.init_sharded(functools.partial(init_variables, cfg), mesh, rules, rng)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from cm3jax.model.layers import canon_problem, param
from cm3jax.retrieval.clip_layers import ACTIVATIONS, Encoder, layer_norm, normal

# OpenAI CLIP's preprocessing statistics (RGB); every released CLIP was trained with these.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
POOLINGS = ('auto', 'argmax', 'eos')
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the inverse temperature at 100


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Hyperparameters; the defaults are ViT-B/32 (and transformers' CLIPConfig defaults)."""

    # text tower
    vocab_size: int = 49408
    max_len: int = 77  # context length: learned positions exist for this many tokens
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    # Canon layers in the text tower (`cm3jax.model.layers.Canon`): 'A' before each attention, 'C'
    # before each MLP, over the previous `text_canon_taps` tokens; '' = off (CLIP, and its checkpoints)
    text_canon: str = ''
    text_canon_taps: tuple[int, ...] = (1, 2, 3)
    # image tower
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    image_channels: int = 3
    image_mean: tuple[float, ...] = OPENAI_MEAN
    image_std: tuple[float, ...] = OPENAI_STD
    # shared
    projection_dim: int = 512
    eos_token_id: int = 49407
    pooling: str = 'auto'  # 'auto': 'argmax' iff eos_token_id == 2 (transformers' rule); 'argmax' | 'eos'
    norm_eps: float = 1e-5
    activation: str = 'quick_gelu'  # 'quick_gelu' (OpenAI) | 'gelu' (exact erf)
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: Any = jnp.float32  # compute dtype; LayerNorm, softmax and the outputs stay float32
    scan_unroll: int = 1  # encoder layers per scan iteration, params stacked either way (as TransformerConfig's)

    def __post_init__(self):
        positive = ('vocab_size', 'max_len', 'text_width', 'text_layers', 'text_heads', 'text_mlp_dim',
                    'image_size', 'patch_size', 'vision_width', 'vision_layers', 'vision_heads',
                    'vision_mlp_dim', 'image_channels', 'projection_dim', 'scan_unroll')
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'ClipConfig.{name}={value!r} must be a positive int')
        for tower in ('text', 'vision'):
            width, heads = getattr(self, f'{tower}_width'), getattr(self, f'{tower}_heads')
            if width % heads:
                raise ValueError(f'ClipConfig.{tower}_width={width} is not divisible by {tower}_heads={heads}')
        if self.image_size % self.patch_size:
            raise ValueError(f'ClipConfig.image_size={self.image_size} is not a multiple of '
                             f'patch_size={self.patch_size}')
        for name in ('image_mean', 'image_std'):
            value = getattr(self, name)
            if len(value) != self.image_channels:
                raise ValueError(f'ClipConfig.{name} has {len(value)} entries but image_channels='
                                 f'{self.image_channels}')
        if min(self.image_std) <= 0:
            raise ValueError(f'ClipConfig.image_std={self.image_std} must be positive')
        if self.activation not in ACTIVATIONS:
            raise ValueError(f'ClipConfig.activation={self.activation!r} is unknown; use one of {ACTIVATIONS}')
        if self.pooling not in POOLINGS:
            raise ValueError(f'ClipConfig.pooling={self.pooling!r} is unknown; use one of {POOLINGS}')
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f'ClipConfig.eos_token_id={self.eos_token_id} is outside the vocabulary '
                             f'[0, {self.vocab_size})')
        problem = canon_problem(self.text_canon, self.text_canon_taps, 'ClipConfig.text_canon')
        if problem:
            raise ValueError(problem)
        if not self.norm_eps > 0:
            raise ValueError(f'ClipConfig.norm_eps={self.norm_eps} must be positive')
        if not math.isfinite(self.logit_scale_init):
            raise ValueError(f'ClipConfig.logit_scale_init={self.logit_scale_init} must be finite')

    @property
    def text_pooling(self) -> str:
        """'argmax' or 'eos', with 'auto' resolved as transformers resolves it."""
        if self.pooling != 'auto':
            return self.pooling
        return 'argmax' if self.eos_token_id == 2 else 'eos'

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _lookup(table: jax.Array, ids: jax.Array, row_axis: str | None) -> jax.Array:
    """table[ids], the table made whole along 'embed' first: gathering from an fsdp-split table
    makes the partitioner replicate the output (as in the LM)."""
    return jnp.take(nn.with_logical_constraint(table, (row_axis, None)), ids, axis=0)


class TextTower(nn.Module):
    cfg: ClipConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids: Int[B, T]; mask: Bool[B, T] (False = padding) -> projected Float[B, P] (not normalised)."""
        cfg = self.cfg
        w = cfg.text_width
        tokens = param(self, 'token_embed', normal(0.02), (cfg.vocab_size, w),
                       ('vocab', 'embed'), jnp.float32)
        positions = param(self, 'pos_embed', normal(0.01), (cfg.max_len, w),
                          (None, 'embed'), jnp.float32)
        t = ids.shape[1]
        x = (_lookup(tokens, ids, 'vocab') + positions[:t]).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))
        # Causal, and no query sees a padding key; positions stay 0..T-1 whatever the padding,
        # as in transformers (so right padding, which CLIP's tokenizers use, changes nothing).
        causal = jnp.tril(jnp.ones((t, t), bool))
        attend = causal[None, None] & mask[:, None, None, :]
        x = Encoder(cfg.text_layers, cfg.text_heads, cfg.text_mlp_dim, cfg.activation, cfg.norm_eps,
                    cfg.dtype, cfg.scan_unroll, cfg.text_canon, tuple(cfg.text_canon_taps), name='encoder')(x, attend)
        x = layer_norm(cfg.norm_eps, 'final_norm')(x)
        # transformers' two rules (module docstring): argmax(ids) for legacy eos 2, else the first eos
        if cfg.text_pooling == 'argmax':
            at = jnp.argmax(ids, axis=-1)
        else:
            at = jnp.argmax(ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
        proj = param(self, 'projection', normal(w**-0.5), (w, cfg.projection_dim),
                     ('embed', None), jnp.float32)
        return jnp.einsum('bw,wp->bp', pooled, proj.astype(cfg.dtype)).astype(jnp.float32)


class VisionTower(nn.Module):
    cfg: ClipConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: Float[B, S, S, C], already normalised -> projected Float[B, P] (not normalised)."""
        cfg = self.cfg
        b, w, p, c = pixels.shape[0], cfg.vision_width, cfg.patch_size, cfg.image_channels
        g = cfg.image_size // p
        patch = param(self, 'patch_embed', normal(0.02), (p, p, c, w),
                      (None, None, None, 'embed'), jnp.float32)
        cls = param(self, 'cls_token', normal(w**-0.5), (w,), ('embed',), jnp.float32)
        positions = param(self, 'pos_embed', normal(0.02), (cfg.num_patches + 1, w),
                          (None, 'embed'), jnp.float32)
        # A stride-p, bias-free p x p conv is an einsum over non-overlapping patches, taken
        # row-major as torch's conv output is flattened.
        patches = pixels.astype(cfg.dtype).reshape(b, g, p, g, p, c)
        x = jnp.einsum('bgiyjc,ijcw->bgyw', patches, patch.astype(cfg.dtype)).reshape(b, g * g, w)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(cfg.dtype), (b, 1, w)), x], axis=1)
        x = x + positions.astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))
        x = layer_norm(cfg.norm_eps, 'pre_norm')(x)
        everything = jnp.ones((1, 1, 1, 1), bool)
        x = Encoder(cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_dim, cfg.activation, cfg.norm_eps,
                    cfg.dtype, cfg.scan_unroll, name='encoder')(x, everything)
        pooled = layer_norm(cfg.norm_eps, 'post_norm')(x[:, 0])
        proj = param(self, 'projection', normal(w**-0.5), (w, cfg.projection_dim),
                     ('embed', None), jnp.float32)
        return jnp.einsum('bw,wp->bp', pooled, proj.astype(cfg.dtype)).astype(jnp.float32)


class ClipModel(nn.Module):
    """Both towers and the temperature. ``__call__`` exists to create every parameter at init;
    use `text_features` / `image_features` (or the module-level functions) to run it."""

    cfg: ClipConfig

    def setup(self):
        self.text = TextTower(self.cfg)
        self.vision = VisionTower(self.cfg)
        self.logit_scale = param(self, 'logit_scale', nn.initializers.constant(self.cfg.logit_scale_init),
                                 (), (), jnp.float32)

    def text_features(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return self.text(ids, mask)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        return self.vision(pixels)

    def __call__(self, pixels, ids, mask):
        return self.image_features(pixels), self.text_features(ids, mask), self.logit_scale


# --- inputs --------------------------------------------------------------------------------

def normalize_images(cfg: ClipConfig, images: jax.Array) -> jax.Array:
    """Float[B, H, W, C] in [0, 1], or UInt8[B, H, W, C] -> CLIP's normalised float32 pixels.

    Resizing and cropping are the caller's job: H = W = ``cfg.image_size`` is required.
    """
    want = (cfg.image_size, cfg.image_size, cfg.image_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f'images have shape {tuple(images.shape)} but this CLIP expects [B, {want[0]}, '
                         f'{want[1]}, {want[2]}] (image_size={cfg.image_size}, image_channels='
                         f'{cfg.image_channels}); resize or centre-crop to {cfg.image_size}x{cfg.image_size} first')
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    return (x - jnp.asarray(cfg.image_mean, jnp.float32)) / jnp.asarray(cfg.image_std, jnp.float32)


def _text_inputs(cfg: ClipConfig, ids, mask):
    if ids.ndim != 2:
        raise ValueError(f'ids have shape {tuple(ids.shape)}; expected [B, T]')
    if ids.shape[1] > cfg.max_len:
        raise ValueError(f'ids have {ids.shape[1]} tokens but this CLIP has max_len={cfg.max_len} positions; '
                         f'truncate the text')
    if mask is None:
        return ids, jnp.ones(ids.shape, bool)
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f'mask has shape {tuple(mask.shape)} but ids have {tuple(ids.shape)}')
    return ids, mask.astype(bool)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| over the last axis; an all-zero row stays zero."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


# --- the public, pure functions ------------------------------------------------------------

def init_variables(cfg: ClipConfig, rng: jax.Array) -> dict:
    """Boxed variables (``{'params': ...}`` with logical axis names), for `cm3jax.params.init_sharded`."""
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.image_channels), jnp.float32)
    ids = jnp.zeros((1, cfg.max_len), jnp.int32)
    return ClipModel(cfg).init(rng, pixels, ids, jnp.ones((1, cfg.max_len), bool))


def init(cfg: ClipConfig, rng: jax.Array) -> dict:
    """Random params (a plain pytree, unsharded)."""
    return nn.unbox(jax.jit(init_variables, static_argnums=0)(cfg, rng))['params']


@functools.partial(jax.jit, static_argnames='cfg')
def text_features(params, cfg: ClipConfig, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ids: Int32[B, T] (T <= max_len); mask: Bool/Int[B, T], 0 on padding (default: none)
    -> projected Float32[B, P], not normalised (transformers' ``get_text_features``)."""
    ids, mask = _text_inputs(cfg, ids, mask)
    return ClipModel(cfg).apply({'params': params}, ids, mask, method=ClipModel.text_features)


@functools.partial(jax.jit, static_argnames='cfg')
def image_features(params, cfg: ClipConfig, images: jax.Array) -> jax.Array:
    """images: Float[B, S, S, 3] in [0, 1] or UInt8 (S = image_size) -> projected Float32[B, P],
    not normalised (transformers' ``get_image_features``)."""
    pixels = normalize_images(cfg, images)
    return ClipModel(cfg).apply({'params': params}, pixels, method=ClipModel.image_features)


def embed_text(params, cfg: ClipConfig, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`text_features`, L2-normalised: Float32[B, P]."""
    return l2_normalize(text_features(params, cfg, ids, mask))


def embed_image(params, cfg: ClipConfig, images: jax.Array) -> jax.Array:
    """`image_features`, L2-normalised: Float32[B, P]."""
    return l2_normalize(image_features(params, cfg, images))


def embed_document(text_emb: jax.Array, image_emb: jax.Array, has_text: jax.Array,
                   has_image: jax.Array) -> jax.Array:
    """The retrieval key of a document (docs/paper.md, "Retrieval augmentation"): the L2-normalised mean of the unit
    embeddings of the parts it has.

    text_emb, image_emb: Float[B, P] (rows of a missing part are ignored, even NaN);
    has_text, has_image: Bool[B]. A one-modality document gets that part's embedding; one with
    neither gets the zero vector, which scores 0 against everything.
    """
    has_text, has_image = has_text.astype(bool)[:, None], has_image.astype(bool)[:, None]
    total = jnp.where(has_text, text_emb, 0.0) + jnp.where(has_image, image_emb, 0.0)
    return l2_normalize(total / jnp.maximum(has_text.astype(total.dtype) + has_image, 1.0))


def contrastive_loss_from_embeddings(text_emb: jax.Array, image_emb: jax.Array, logit_scale: jax.Array,
                                     negative_emb: jax.Array | None = None,
                                     negative_valid: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE over in-batch negatives; row i of each is a positive pair.

    text_emb, image_emb: Float[B, P], unit norm; logit_scale: the log inverse temperature,
    clipped at log(100) as CLIP does (beyond it the temperature gets no gradient).
    negative_emb: Float[B, P], unit norm, a hard-negative caption for each image (NegCLIP), one
    more text its image must score below its own; negative_valid: Bool[B], the rows that have one.
    Returns (loss, metrics) with both directions' in-batch top-1 accuracy (and, with negatives,
    how often an image prefers its caption to its negative).
    """
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    logits = scale * jnp.einsum('tp,ip->ti', text_emb, image_emb, preferred_element_type=jnp.float32)
    labels = jnp.arange(logits.shape[0])
    t2i = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1))
    columns = logits  # image i's candidates: column i, one text per row
    if negative_emb is not None:
        negative = scale * jnp.sum(negative_emb * image_emb, axis=-1, dtype=jnp.float32)
        negative = jnp.where(negative_valid, negative, -jnp.inf)
        columns = jnp.concatenate([logits, negative[None, :]], axis=0)
    i2t = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(columns, axis=0), labels[None, :], axis=0))
    loss = (t2i + i2t) / 2
    metrics = {
        'loss': loss,
        'text_to_image_accuracy': jnp.mean(jnp.argmax(logits, axis=1) == labels),
        'image_to_text_accuracy': jnp.mean(jnp.argmax(logits, axis=0) == labels),
        'logit_scale': scale,
    }
    if negative_emb is not None:
        wins = (jnp.diagonal(logits) > negative) & negative_valid
        metrics['negative_accuracy'] = jnp.sum(wins) / jnp.maximum(jnp.sum(negative_valid), 1)
    return loss, metrics


def contrastive_loss(params, cfg: ClipConfig, batch: dict) -> tuple[jax.Array, dict]:
    """CLIP's training loss on a batch of aligned pairs.

    batch: ``images`` Float[B, S, S, 3] in [0, 1] or UInt8; ``ids`` Int32[B, T]; optional
    ``mask`` [B, T]; optional hard-negative captions ``negative_ids``, ``negative_mask`` [B, T]
    and ``negative_valid`` Bool[B] (`contrastive_loss_from_embeddings`). Differentiable in
    ``params``; under a mesh the in-batch negatives span the global batch. Returns (loss, metrics).
    """
    text = embed_text(params, cfg, batch['ids'], batch.get('mask'))
    image = embed_image(params, cfg, batch['images'])
    negative = None
    if 'negative_ids' in batch:
        negative = embed_text(params, cfg, batch['negative_ids'], batch['negative_mask'])
    return contrastive_loss_from_embeddings(text, image, params['logit_scale'], negative, batch.get('negative_valid'))


def clip_score(params, cfg: ClipConfig, images: jax.Array, ids: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """CLIPScore of each (image, text) pair: 100 * max(cos, 0), Float32[B] (as torchmetrics
    defines it; the re-ranking of docs/paper.md, "Decoding", keeps the highest)."""
    cos = jnp.sum(embed_image(params, cfg, images) * embed_text(params, cfg, ids, mask), axis=-1)
    return 100.0 * jnp.maximum(cos, 0.0)
