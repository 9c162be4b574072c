"""Losses of the VQ-GAN tokenizer: the taming-transformers recipe (Esser et al. 2021) in JAX.

Images are float NHWC in [-1, 1]. The generator (encoder, quantizer, decoder) minimises

    rec = reconstruction_loss(x, x_rec) + perceptual_weight * perceptual_loss(feature_fn, x, x_rec)
    g   = generator_adversarial_loss(disc(x_rec))
    loss = rec + adopt_weight(disc_weight, step, disc_start) * adaptive_weight(rec_fn, g_fn, last)
           * g + quantizer losses (codebook + commitment, from the quantizer) + entropy_penalty(...)

and the discriminator minimises ``adopt_weight(1, step, disc_start) * hinge_d_loss(disc(x),
disc(stop_gradient(x_rec)))``. Everything here is a pure function of arrays (plus one Linen
module), so it jits and shards like the rest of cm3jax: batch means over a batch-sharded array
are global means under ``jax.jit``.

Plugging in LPIPS (the perceptual loss)
---------------------------------------
No feature network ships with cm3jax and nothing is downloaded at run time, so the perceptual
loss is off by default (``perceptual_weight=0``). To reproduce taming's LPIPS term:

1. Write a Flax VGG16 ``features`` module (13 convs 3x3 pad 1 + ReLU, 2x2 max-pool between the
   5 blocks) that returns the activations after relu1_2, relu2_2, relu3_3, relu4_3 and
   relu5_3, and starts with LPIPS's input scaling ``(x - shift) / scale`` with
   ``shift = [-.030, -.088, -.188]`` and ``scale = [.458, .448, .450]``.
2. Convert torchvision's ``vgg16`` ``features.{i}.weight`` from OIHW to HWIO
   (``w.transpose(2, 3, 1, 0)``) and the biases as they are, from a file you downloaded
   yourself, read with ``torch.load(path, weights_only=True)`` or safetensors.
3. LPIPS's linear heads ``lin{k}.model.1.weight`` ([1, c, 1, 1], non-negative) become
   ``layer_weights[k] = w.reshape(c)``: a per-channel weight is exactly LPIPS's 1x1 conv.
4. Pass the VGG params into the jitted step as an argument (not a closure: closed-over arrays
   are baked into the program as constants) and *outside* the trained ``params``, so the
   optimizer leaves them alone, then build
   ``feature_fn = lambda im: vgg.apply({'params': vgg_params}, im)`` inside the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array


# --------------------------------------------------------------------------- reconstruction

def reconstruction_loss(x: Array, x_rec: Array, kind: str = 'l1') -> Array:
    """Mean over all elements of |x - x_rec| ('l1', taming's default) or (x - x_rec)^2 ('l2').

    x, x_rec: Float[B, H, W, C] in [-1, 1]. Returns a float32 scalar.
    """
    # float32: a bf16 mean over millions of pixels loses most of its digits.
    diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
    if kind == 'l1':
        return jnp.abs(diff).mean()
    if kind == 'l2':
        return jnp.square(diff).mean()
    raise ValueError(f"reconstruction loss kind must be 'l1' or 'l2', got {kind!r}")


# --------------------------------------------------------------------------- discriminator

class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix, as used by taming-transformers): one logit per patch.

    Layers, all 4x4 convs with padding 1 on each side (torch's ``padding=1``):
      conv stride 2 to ndf, LeakyReLU(0.2);
      for n in 1..n_layers-1: conv stride 2 to ndf*min(2**n, 8), norm, LeakyReLU(0.2);
      conv stride 1 to ndf*min(2**n_layers, 8), norm, LeakyReLU(0.2);
      conv stride 1 to 1 channel.
    Each stride-2 conv halves an even side and each stride-1 conv shrinks it by 1, so a
    [B, H, W, C] input gives [B, H/2**n_layers - 2, W/2**n_layers - 2, 1] logits (30x30 for
    256x256 with 3 layers: each logit sees a 70x70 patch).

    Norm: taming uses BatchNorm. Its running statistics are mutable state that would have to be
    threaded through the sharded train step and synchronised across data shards, and its
    batch-dependence makes real and fake batches interact; GroupNorm (``norm='group'``) is
    per-sample and stateless, and ``'none'`` matches taming's layer stack exactly minus the norm
    (the parity test uses it). Every conv keeps its bias, as taming does whenever the norm is not
    BatchNorm (BatchNorm's shift would cancel it).

    Params carry no logical axis names: the whole net is ~2.8M params at ndf=64 and is simply
    replicated.

    Attributes:
      ndf: channels of the first conv.
      n_layers: number of stride-2 convs.
      norm: 'group' or 'none'.
      num_groups: GroupNorm groups (capped at the channel count, which it must divide).
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = 'group'
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: Float[B, H, W, C] in [-1, 1] -> logits Float[B, h, w, 1]."""
        if self.norm not in ('group', 'none'):
            raise ValueError(f"discriminator norm must be 'group' or 'none', got {self.norm!r}")
        pad = ((1, 1), (1, 1))
        # taming's weights_init: conv weights ~ N(0, 0.02).
        conv = lambda features, stride: nn.Conv(features, (4, 4), strides=(stride, stride), padding=pad,
                                                kernel_init=nn.initializers.normal(0.02))

        def norm_act(h):
            if self.norm == 'group':
                h = nn.GroupNorm(num_groups=min(self.num_groups, h.shape[-1]), epsilon=1e-6)(h)
            return nn.leaky_relu(h, 0.2)

        h = nn.leaky_relu(conv(self.ndf, 2)(x.astype(jnp.float32)), 0.2)  # no norm on the first layer
        for n in range(1, self.n_layers):
            h = norm_act(conv(self.ndf * min(2**n, 8), 2)(h))
        h = norm_act(conv(self.ndf * min(2**self.n_layers, 8), 1)(h))
        return conv(1, 1)(h)


# --------------------------------------------------------------------------- adversarial losses

def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))); logits of any shape -> scalar."""
    return 0.5 * (jax.nn.relu(1.0 - logits_real).mean() + jax.nn.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))): the non-saturating GAN's BCE."""
    return 0.5 * (jax.nn.softplus(-logits_real).mean() + jax.nn.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: Array) -> Array:
    """-mean(logits_fake): taming's generator loss, used with either discriminator loss."""
    return -logits_fake.mean()


def adopt_weight(weight: float | Array, step: int | Array, start_step: int | Array) -> Array:
    """``weight`` from ``start_step`` on, 0 before (taming's ``disc_start``); jittable in ``step``.

    The discriminator only joins once reconstructions are reasonable: an early GAN term on blurry
    outputs destabilises the autoencoder.
    """
    return jnp.where(jnp.asarray(step) < start_step, 0.0, jnp.asarray(weight, jnp.float32))


def adaptive_weight_from_norms(nll_grad_norm: Array, g_grad_norm: Array, max_weight: float = 1e4,
                               eps: float = 1e-4) -> Array:
    """``clip(||grad nll|| / (||grad g|| + eps), 0, max_weight)``, with no gradient."""
    return jax.lax.stop_gradient(jnp.clip(nll_grad_norm / (g_grad_norm + eps), 0.0, max_weight))


def adaptive_weight(nll_fn: Callable[[Array], Array], g_fn: Callable[[Array], Array], last_layer: Array,
                    max_weight: float = 1e4, eps: float = 1e-4) -> Array:
    """Taming's ``calculate_adaptive_weight``: balances the GAN term against the reconstruction.

    The generator loss is scaled so that its gradient at the decoder's last layer has the norm of
    the reconstruction loss's gradient there (Esser et al. 2021, eq. 7).

    JAX has no ``.grad`` on a layer, so the two losses are passed as functions of the last
    layer's kernel: ``nll_fn(kernel) -> scalar``, ``g_fn(kernel) -> scalar``. The cheap way to
    write them: both losses see the kernel only through the decoder output
    ``x_rec = conv(h, kernel) + b``, so take ``h`` (the last conv's input) with
    ``stop_gradient`` and close over it:
    ``nll_fn = lambda k: rec_loss(x, last_conv(h, k, b))``; this gives the same gradients w.r.t.
    the kernel as re-running the whole generator with the kernel swapped into ``params``.

    last_layer: the kernel, any shape (e.g. Float[3, 3, C, 3]). Returns a float32 scalar in
    [0, max_weight], wrapped in stop_gradient as in taming (``.detach()``).
    """
    nll_grad = jax.grad(nll_fn)(last_layer)
    g_grad = jax.grad(g_fn)(last_layer)
    return adaptive_weight_from_norms(jnp.linalg.norm(nll_grad.ravel()), jnp.linalg.norm(g_grad.ravel()),
                                      max_weight, eps)


# --------------------------------------------------------------------------- codebook entropy

def entropy_penalty(distances: Array, temperature: float = 1.0) -> tuple[Array, dict[str, Array]]:
    """MaskGIT's codebook entropy loss: mean per-sample entropy minus entropy of the batch average.

    distances: Float[N, K] (or [..., K], flattened), distance of each latent to each code (for
    affinities or logits, pass their negation). The soft assignment is
    ``p = softmax(-distances / temperature)``. Minimising the loss makes each latent confident
    (low per-sample entropy) while the batch spreads over many codes (high entropy of the mean),
    which fights codebook collapse. Range: [-log K, log K]; -log K is one distinct confident code
    per sample with uniform usage.

    The batch average is over the N rows given: under ``jax.jit`` with a batch-sharded input that
    is the global batch, but with microbatching it is each microbatch.

    Returns (loss, stats) with stats 'sample_entropy', 'avg_entropy' and 'perplexity'
    (``exp(avg_entropy)``, the effective number of codes in soft use).
    """
    logits = -distances.reshape(-1, distances.shape[-1]).astype(jnp.float32) / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    avg_probs = probs.mean(0)
    # 1e-5 as in MaskGIT: an unused code has avg prob 0, whose log would be -inf (and 0 * -inf NaN).
    avg_entropy = -(avg_probs * jnp.log(avg_probs + 1e-5)).sum()
    stats = {'sample_entropy': sample_entropy, 'avg_entropy': avg_entropy, 'perplexity': jnp.exp(avg_entropy)}
    return sample_entropy - avg_entropy, stats


# --------------------------------------------------------------------------- perceptual

def _normalize_channels(f: Array, eps: float = 1e-10) -> Array:
    """f / ||f|| over channels (LPIPS's ``normalize_tensor``).

    ``sqrt(sum f^2 + eps^2)`` instead of LPIPS's ``sqrt(sum f^2) + eps``: the same values to
    ~1e-10, but a zero feature vector (common after a ReLU) gets gradient 0, not 0 * inf = NaN.
    """
    f = f.astype(jnp.float32)
    return f / jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + eps * eps)


def perceptual_loss(feature_fn: Callable[[Array], Sequence[Array]], x: Array, x_rec: Array,
                    layer_weights: Sequence[float | Array] | None = None) -> Array:
    """LPIPS-style distance between x and x_rec in the features of ``feature_fn``; batch mean.

    feature_fn: Float[B, H, W, C] images in [-1, 1] -> list of Float[B, h_l, w_l, c_l] maps.
    x, x_rec: Float[B, H, W, C].
    layer_weights: one per map, each a scalar or a per-channel Float[c_l] (LPIPS's linear head);
    default 1. Per map: unit-normalise each pixel's feature vector over channels, square the
    difference, weighted sum over channels, mean over space; then sum over maps and mean over
    the batch. Returns a float32 scalar; 0 (up to rounding) when x == x_rec.

    See the module docstring for plugging in converted LPIPS/VGG16 weights.
    """
    feats, feats_rec = feature_fn(x), feature_fn(x_rec)
    if layer_weights is None:
        layer_weights = [1.0] * len(feats)
    if len(layer_weights) != len(feats):
        raise ValueError(f'{len(layer_weights)} layer weights for {len(feats)} feature maps')
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for f, f_rec, w in zip(feats, feats_rec, layer_weights):
        diff = jnp.square(_normalize_channels(f) - _normalize_channels(f_rec))  # [B, h, w, c]
        total = total + (diff * jnp.asarray(w, jnp.float32)).sum(-1).mean((1, 2))
    return total.mean()
