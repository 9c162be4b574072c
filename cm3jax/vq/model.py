"""A taming-style VQ-GAN image tokenizer: encoder, vector quantizer, decoder (NHWC, Flax Linen).

CM3leon tokenizes 256x256 images into 32x32 codes from 8,192 (Make-A-Scene style); Chameleon
512x512 into 32x32. The layout follows taming-transformers, so taming, Chameleon and
LlamaGen/Janus checkpoints convert by renaming (`cm3jax.convert.vqgan`):

- Encoder: conv_in, per level ``num_res_blocks`` ResnetBlocks (+ AttnBlocks at
  ``attn_resolutions``) and a stride-2 downsample except at the last level, a middle of
  resnet / attention / resnet, GroupNorm + swish, conv_out to ``z_channels``.
- ``quant_conv`` (1x1) maps to the codebook's ``embed_dim``; a small ``embed_dim`` is the
  factorised low-dimensional lookup of ViT-VQGAN / LlamaGen, ``l2_normalize`` its cosine form.
- Decoder mirrors the encoder with nearest-neighbour upsampling and one more block per level.

Quantizer training updates that are not gradients (EMA codebook, dead-code restart) are pure
functions of arrays here; the trainer applies them.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VQConfig:
    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 64
    embed_dim: int = 64           # codebook vector size; small = factorised lookup
    num_codes: int = 512
    beta: float = 0.25            # commitment weight (VQ-VAE)
    l2_normalize: bool = False    # cosine codes: z and codebook unit-normalised (ViT-VQGAN, LlamaGen)
    norm_groups: int = 32
    norm_eps: float = 1e-6
    # pixels per side folded into channels before the encoder and unfolded after the decoder
    # (space-to-depth): the convolutions then start at resolution / patch. 1 is taming's layout;
    # 2 or 4 take most of the cost out of small flat-colour images, where full-resolution
    # convolutions dominate the step on a CPU.
    patch: int = 1
    # Each code sees only its own patch: the encoder's convolutions are 1x1 (2x2 with stride 2 to
    # downsample), its norms per position and it has no attention. With taming's encoder a code also
    # carries its surroundings and its place on the canvas (a flat black patch gets one of hundreds
    # of codes), which an LM must then learn to predict; with a local encoder the same patch is the
    # same code wherever it is. The decoder keeps its context to draw edges between codes.
    local_encoder: bool = False

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.patch // 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> 'VQConfig':
        for c in {self.ch * m for m in (1, *self.ch_mult)}:
            if c % self.norm_groups:
                raise ValueError(f'vq channel count {c} (ch x ch_mult) is not divisible by norm_groups='
                                 f'{self.norm_groups}; GroupNorm needs it')
        if self.patch < 1 or self.resolution % (self.patch * 2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f'vq resolution {self.resolution} does not split into patches of {self.patch} and then '
                             f'halve {len(self.ch_mult) - 1} times evenly (patch must be >= 1)')
        return self


def swish(x):
    return x * jax.nn.sigmoid(x)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p block of pixels becomes one position."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of `space_to_depth`: [B, h, w, p*p*C] -> [B, h*p, w*p, C]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding='SAME') -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, name=name)


def _norm(cfg: VQConfig, name: str, local: bool = False) -> nn.Module:
    # GroupNorm's statistics span the whole image; a local encoder normalises each position alone
    if local:
        return nn.LayerNorm(epsilon=cfg.norm_eps, name=name)
    return nn.GroupNorm(cfg.norm_groups, epsilon=cfg.norm_eps, name=name)


class ResnetBlock(nn.Module):
    out_channels: int
    cfg: VQConfig
    local: bool = False  # 1x1 convolutions and per-position norms (`VQConfig.local_encoder`)

    @nn.compact
    def __call__(self, x):  # [B, H, W, C] -> [B, H, W, out_channels]
        k = 1 if self.local else 3
        h = _conv(self.out_channels, k, 'conv1')(swish(_norm(self.cfg, 'norm1', self.local)(x)))
        h = _conv(self.out_channels, k, 'conv2')(swish(_norm(self.cfg, 'norm2', self.local)(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, 'nin_shortcut')(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (1x1 convs are Dense layers)."""
    cfg: VQConfig

    @nn.compact
    def __call__(self, x):  # [B, H, W, C]
        b, hh, ww, c = x.shape
        h = nn.GroupNorm(self.cfg.norm_groups, epsilon=self.cfg.norm_eps, name='norm')(x)
        q, k, v = (nn.Dense(c, name=n)(h).reshape(b, hh * ww, c) for n in ('q', 'k', 'v'))
        w = jax.nn.softmax(jnp.einsum('bic,bjc->bij', q, k) * c**-0.5, axis=-1)
        out = jnp.einsum('bij,bjc->bic', w, v).reshape(b, hh, ww, c)
        return x + nn.Dense(c, name='proj_out')(out)


class Encoder(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, x):  # [B, R, R, in_channels] in [-1, 1] -> [B, r, r, z_channels]
        cfg = self.cfg
        local = cfg.local_encoder
        k = 1 if local else 3
        if cfg.patch > 1:
            x = space_to_depth(x, cfg.patch)
        h = _conv(cfg.ch, k, 'conv_in')(x)
        res = cfg.resolution // cfg.patch
        for i, mult in enumerate(cfg.ch_mult):
            for j in range(cfg.num_res_blocks):
                h = ResnetBlock(cfg.ch * mult, cfg, local, name=f'down_{i}_block_{j}')(h)
                if res in cfg.attn_resolutions and not local:
                    h = AttnBlock(cfg, name=f'down_{i}_attn_{j}')(h)
            if i != len(cfg.ch_mult) - 1:
                if local:  # non-overlapping: each output still sees one patch
                    h = _conv(h.shape[-1], 2, f'down_{i}_downsample', stride=2, padding='VALID')(h)
                else:  # torch pads (0, 1, 0, 1) then convolves with stride 2 and no padding
                    h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                    h = _conv(h.shape[-1], 3, f'down_{i}_downsample', stride=2, padding='VALID')(h)
                res //= 2
        h = ResnetBlock(h.shape[-1], cfg, local, name='mid_block_1')(h)
        if not local:
            h = AttnBlock(cfg, name='mid_attn_1')(h)
        h = ResnetBlock(h.shape[-1], cfg, local, name='mid_block_2')(h)
        h = swish(_norm(cfg, 'norm_out', local)(h))
        return _conv(cfg.z_channels, k, 'conv_out')(h)


class Decoder(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, z):  # [B, r, r, z_channels] -> [B, R, R, out_channels]
        cfg = self.cfg
        levels = len(cfg.ch_mult)
        h = _conv(cfg.ch * cfg.ch_mult[-1], 3, 'conv_in')(z)
        h = ResnetBlock(h.shape[-1], cfg, name='mid_block_1')(h)
        h = AttnBlock(cfg, name='mid_attn_1')(h)
        h = ResnetBlock(h.shape[-1], cfg, name='mid_block_2')(h)
        res = cfg.latent_resolution
        for i in reversed(range(levels)):
            for j in range(cfg.num_res_blocks + 1):
                h = ResnetBlock(cfg.ch * cfg.ch_mult[i], cfg, name=f'up_{i}_block_{j}')(h)
                if res in cfg.attn_resolutions:
                    h = AttnBlock(cfg, name=f'up_{i}_attn_{j}')(h)
            if i != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
                h = _conv(h.shape[-1], 3, f'up_{i}_upsample')(h)
                res *= 2
        h = swish(nn.GroupNorm(cfg.norm_groups, epsilon=cfg.norm_eps, name='norm_out')(h))
        if cfg.patch > 1:
            return depth_to_space(_conv(cfg.out_channels * cfg.patch ** 2, 3, 'conv_out')(h), cfg.patch)
        return _conv(cfg.out_channels, 3, 'conv_out')(h)


def _normalize(x, axis=-1):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def nearest_codes(z: jax.Array, codebook: jax.Array, l2_normalize: bool = False) -> tuple[jax.Array, jax.Array]:
    """z: Float[N, D], codebook: Float[K, D] -> (codes Int[N], squared distances Float[N, K])."""
    if l2_normalize:
        z, codebook = _normalize(z), _normalize(codebook)
    z, codebook = z.astype(jnp.float32), codebook.astype(jnp.float32)
    d = (z**2).sum(-1, keepdims=True) + (codebook**2).sum(-1) - 2 * z @ codebook.T
    return d.argmin(-1).astype(jnp.int32), d


def code_usage(codes: jax.Array, num_codes: int) -> dict[str, jax.Array]:
    """Counts per code, the fraction of codes used, and the perplexity exp(H(p)) of their
    frequencies (num_codes when all are used equally, 1 on collapse)."""
    counts = jnp.bincount(codes.reshape(-1), length=num_codes)
    p = counts / jnp.maximum(counts.sum(), 1)
    entropy = -(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)).sum()
    return {'counts': counts, 'used_fraction': (counts > 0).mean(), 'perplexity': jnp.exp(entropy)}


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with the straight-through estimator.

    Returns (z_q, codes, aux): z_q [B, h, w, D] carries the encoder's gradient; aux holds the
    codebook loss ``|z_q - sg(z)|^2``, the commitment loss ``beta |sg(z_q) - z|^2`` and the
    distances [N, K] (for an entropy penalty). taming and Chameleon swap beta onto the
    codebook term; the sum differs only in that weighting.
    """
    cfg: VQConfig

    def setup(self):
        k = self.cfg.num_codes  # taming's U(-1/K, 1/K)
        self.embedding = self.param('embedding', lambda key, shape: jax.random.uniform(key, shape, jnp.float32,
                                                                                       -1.0 / k, 1.0 / k),
                                    (k, self.cfg.embed_dim))

    def __call__(self, z):
        return quantize(z, self.embedding, self.cfg)

    def lookup(self, codes):  # Int[...] -> the (normalised) code vectors [..., D]
        return (_normalize(self.embedding) if self.cfg.l2_normalize else self.embedding)[codes]


def quantize(z, codebook, cfg: VQConfig):
    """Functional core of `VectorQuantizer` (z: [B, h, w, D], codebook: [K, D])."""
    flat = z.reshape(-1, z.shape[-1])
    codes, distances = nearest_codes(flat, codebook, cfg.l2_normalize)
    if cfg.l2_normalize:
        z, codebook = _normalize(z), _normalize(codebook)
    z_q = codebook[codes].reshape(z.shape).astype(z.dtype)
    aux = {'codebook_loss': jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2),
           'commitment_loss': cfg.beta * jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2),
           'distances': distances}
    return z + jax.lax.stop_gradient(z_q - z), codes.reshape(z.shape[:-1]), aux


class VQGAN(nn.Module):
    """``__call__(images [B, R, R, C] in [-1, 1]) -> (reconstruction, codes [B, r, r], aux)``;
    ``encode_codes`` and ``decode_codes`` are the two halves."""
    cfg: VQConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.quant_conv = nn.Dense(self.cfg.embed_dim)
        self.quantize = VectorQuantizer(self.cfg)
        self.post_quant_conv = nn.Dense(self.cfg.z_channels)
        self.decoder = Decoder(self.cfg)

    def __call__(self, images):
        z = self.quant_conv(self.encoder(images))
        z_q, codes, aux = self.quantize(z)
        aux['z'] = z
        return self.decoder(self.post_quant_conv(z_q)), codes, aux

    def encode_latents(self, images):  # pre-quantization latents [B, r, r, embed_dim]
        return self.quant_conv(self.encoder(images))

    def encode_codes(self, images):
        return self.quantize(self.encode_latents(images))[1]

    def decode_codes(self, codes):  # [B, r, r] -> images [B, R, R, C], float
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))


def _check_images(images, cfg: VQConfig) -> None:
    shape = (cfg.resolution, cfg.resolution, cfg.in_channels)
    if getattr(images, 'dtype', None) != np.uint8:
        raise TypeError(f'encode takes uint8 images [B, {cfg.resolution}, {cfg.resolution}, {cfg.in_channels}] '
                        f'(0..255); got dtype {getattr(images, "dtype", type(images))}')
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise ValueError(f'this tokenizer takes images of shape [B, {", ".join(map(str, shape))}] '
                         f'(vq resolution {cfg.resolution}, {cfg.in_channels} channels); got {tuple(images.shape)}. '
                         f'Resize or crop them first')


def encode(params, images, cfg: VQConfig) -> jax.Array:
    """uint8 images [B, R, R, C] -> codes Int[B, r, r], r = R / 2**(len(ch_mult) - 1)."""
    _check_images(images, cfg)
    return _encode(params, jnp.asarray(images), cfg)


def decode(params, codes, cfg: VQConfig) -> jax.Array:
    """codes Int[B, r, r] -> uint8 images [B, R, R, C]."""
    r = cfg.latent_resolution
    if codes.ndim != 3 or tuple(codes.shape[1:]) != (r, r):
        raise ValueError(f'decode takes codes of shape [B, {r}, {r}] for this tokenizer; got {tuple(codes.shape)}')
    return _decode(params, jnp.asarray(codes, jnp.int32), cfg)


# Jitted as a whole: called eagerly, Flax compiles every op on its own (seconds per call on a CPU).
@functools.partial(jax.jit, static_argnames='cfg')
def _encode(params, images, cfg: VQConfig) -> jax.Array:
    x = images.astype(jnp.float32) / 127.5 - 1.0
    return VQGAN(cfg).apply({'params': params}, x, method=VQGAN.encode_codes)


@functools.partial(jax.jit, static_argnames='cfg')
def _decode(params, codes, cfg: VQConfig) -> jax.Array:
    return to_uint8(VQGAN(cfg).apply({'params': params}, codes, method=VQGAN.decode_codes))


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 0..255, rounded."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def ema_init(codebook: jax.Array) -> dict:
    """The EMA state for ``codebook`` [K, D]: every code counts once, at its current vector.

    Starting from zeros sends an unused code to the origin (``0 / eps``), and a zero count under
    a nonzero sum blows it up (``sum / eps``); starting from one
    pseudo-member at the code's own vector keeps ``sum / count`` equal to the code until real
    members arrive, which then take over at the EMA's rate (the pseudo-member's weight decays as
    ``decay**t``). The sum is a copy, so it never aliases the parameter (the trainer donates both).
    """
    codebook = jnp.asarray(codebook, jnp.float32)
    return {'count': jnp.ones(codebook.shape[:1], jnp.float32), 'sum': jnp.array(codebook, copy=True)}


def code_sums(z: jax.Array, codes: jax.Array, num_codes: int, l2_normalize: bool = False) -> jax.Array:
    """Per-code sums of the latents, ``onehot(codes).T @ z``: Float32[K, D].

    z: [..., D] pre-quantization latents; codes: Int[...] their codes. With ``l2_normalize``
    the latents are unit-normalised first, as `quantize` compares them. Summed by segment, not
    by a one-hot matmul, so it stays exact f32 on every backend and never builds [N, K].
    """
    z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    if l2_normalize:
        z = _normalize(z)
    return jax.ops.segment_sum(z, codes.reshape(-1), num_segments=num_codes)


def ema_step(ema: dict, counts: jax.Array, sums: jax.Array, decay: float = 0.99, eps: float = 1e-5):
    """EMA codebook (VQ-VAE-2): one update of the moving per-code counts and vector sums.

    ema: {'count': [K], 'sum': [K, D]}; counts: Float[K] and sums: Float[K, D] are one batch's
    (`code_usage` counts, `code_sums`), so microbatches can add theirs up first.
    Returns (new ema, codebook [K, D]) with Laplace smoothing so unused codes stay finite.
    """
    k = ema['count'].shape[0]
    count = decay * ema['count'] + (1 - decay) * counts.astype(jnp.float32)
    total = decay * ema['sum'] + (1 - decay) * sums.astype(jnp.float32)
    n = count.sum()
    smoothed = (count + eps) / (n + k * eps) * n
    return {'count': count, 'sum': total}, total / smoothed[:, None]


def ema_update(ema: dict, z: jax.Array, codes: jax.Array, decay: float = 0.99, eps: float = 1e-5):
    """`ema_step` on a batch's latents z: Float[N, D] and their codes: Int[N]."""
    k = ema['count'].shape[0]
    return ema_step(ema, code_usage(codes, k)['counts'], code_sums(z, codes, k), decay, eps)


def ema_reset(ema: dict, codebook: jax.Array, where: jax.Array) -> dict:
    """`ema_init`'s entries for the codes marked in ``where`` (Bool[K]), e.g. just restarted onto
    new vectors in ``codebook``; without it the next `ema_step` drags them back."""
    fresh = ema_init(codebook)
    return {'count': jnp.where(where, fresh['count'], ema['count']),
            'sum': jnp.where(where[:, None], fresh['sum'], ema['sum'])}


def restart_dead_codes(codebook: jax.Array, counts: jax.Array, z: jax.Array, rng: jax.Array,
                       min_count: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Move every code used fewer than ``min_count`` times to a random recent latent.

    codebook: [K, D]; counts: [K] (e.g. summed `code_usage` counts over recent steps);
    z: Float[N, D] recent latents. Returns (codebook, number of codes restarted).
    """
    dead = counts < min_count
    picks = jax.random.randint(rng, (codebook.shape[0],), 0, z.shape[0])
    fresh = z.reshape(-1, z.shape[-1])[picks].astype(codebook.dtype)
    return jnp.where(dead[:, None], fresh, codebook), dead.sum()
