"""Pure logits processors: Float[b, v] in, Float[b, v] out (docs/paper.md, "Decoding").

Guidance combines streams in log-probability space (each stream log-softmaxed first, so a
per-stream shift of the logits changes nothing); masks and truncations set excluded ids to
-inf and come after guidance, so -inf never meets -inf in a difference. Everything here jits
and vmaps; none of it knows about the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def log_probs(logits: jax.Array) -> jax.Array:
    """Float[b, v] -> log-softmax in float32."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def temperature(logits: jax.Array, t: float | jax.Array) -> jax.Array:
    """logits / t (t > 0; greedy decoding is `sample` with t = 0)."""
    return logits / jnp.maximum(t, 1e-6)


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float | jax.Array) -> jax.Array:
    """CTRL's repetition penalty (Keskar et al. 2019; Meta's Chameleon inference and
    transformers apply it so): the logit of every id already in the row (``seen``: Bool[b, v])
    is divided by ``penalty`` where positive and multiplied by it where negative; 1 = off."""
    if isinstance(penalty, (int, float)) and penalty == 1:
        return logits
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest per row (ties at the k-th value are kept); k = 0 keeps all."""
    if not k:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus: keep the smallest set of ids, largest first, whose probability reaches p (the
    top id always stays; ties at the cut are kept); p >= 1 keeps all (statically: a float32
    cumulative sum reaches 1 before the tail of a large vocab does).

    No sort: the cut is the largest logit c with mass{logit >= c} >= p, found by bisection over
    the 32-bit order-preserving integer image of the logits (32 halvings pin it exactly). Each
    halving is one masked sum over the row, so a step costs O(32 v) streaming work instead of
    an O(v log v) sort, which dominates a CPU decode step at small batch.
    """
    if isinstance(p, (int, float)) and p >= 1:
        return logits
    logits32 = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits32, axis=-1)
    keys = _order_key(logits32)  # int32, ordered as the logits are
    lo = keys.min(-1, keepdims=True)  # mass{key >= lo} = 1 >= p: lo is always a valid cut
    hi = keys.max(-1, keepdims=True)

    def halve(_, bounds):  # invariant: mass{key >= lo} >= p; the answer is in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        ok = jnp.where(keys >= mid, probs, 0).sum(-1, keepdims=True) >= p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.where(keys >= lo, logits, NEG_INF)


def _order_key(x: jax.Array) -> jax.Array:
    """Float32 -> int32 with the same order (-inf lowest), halved so that ``hi - lo + 1`` cannot
    overflow: dropping the low bit merges only pairs of floats 1 ulp apart."""
    x = jnp.where(x == 0, 0.0, x)  # -0.0 equals 0.0 but has other bits
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    ordered = jnp.where(bits < 0, jnp.int32(-2**31) - bits - 1, bits)  # negatives: reverse their order
    return ordered >> 1


def mask(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """allowed: Bool[b, v] or Bool[v] (e.g. `Vocab.allowed('image')`); the rest become -inf."""
    return jnp.where(allowed, logits, NEG_INF)


def cfg(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance, ``uncond + scale * (cond - uncond)`` on log-probs: scale 1 is
    the conditional distribution, 0 the unconditional one."""
    c, u = log_probs(cond), log_probs(uncond)
    return u + scale * (c - u)


def cfg3(full: jax.Array, image_only: jax.Array, none: jax.Array, text_scale: float | jax.Array,
         image_scale: float | jax.Array) -> jax.Array:
    """Three-stream guidance for editing (full prompt / image-only / none; InstructPix2Pix form,
    Chameleon's 3.0 and 1.2): ``none + image_scale * (image_only - none) + text_scale * (full -
    image_only)``. With image_only == none it is `cfg(full, none, text_scale)`."""
    f, i, n = log_probs(full), log_probs(image_only), log_probs(none)
    return n + image_scale * (i - n) + text_scale * (f - i)


def cdk_head(expert: jax.Array, k: int, alpha: float | jax.Array) -> jax.Array:
    """V_head: Bool[b, v], ids whose expert probability is at least alpha times the k-th largest."""
    p = jax.nn.softmax(expert.astype(jnp.float32), axis=-1)
    kth = jax.lax.top_k(p, k)[0][..., -1:]
    return p >= alpha * kth


def cdk(expert: jax.Array, amateur: jax.Array, k: int, alpha: float | jax.Array) -> jax.Array:
    """Contrastive decoding, top-k variant (CM3leon): ``log p_exp - log p_ama`` on V_head, -inf
    elsewhere. The expert is the conditional (or CFG-mixed) stream, the amateur the
    unconditional stream or a smaller model."""
    score = log_probs(expert) - log_probs(amateur)
    return jnp.where(cdk_head(expert, k, alpha), score, NEG_INF)


def sample(rng: jax.Array, logits: jax.Array, temp: float | jax.Array = 1.0, k: int = 0,
           p: float | jax.Array = 1.0) -> jax.Array:
    """Int32[b]: temperature, then top-k, then top-p, then a categorical draw; temp = 0 is greedy."""
    greedy = logits.argmax(-1)
    scaled = top_p(top_k(temperature(logits, temp), k), p)
    drawn = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(jnp.asarray(temp) > 0, drawn, greedy).astype(jnp.int32)
