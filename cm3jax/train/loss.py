"""The language-model loss: weighted next-token cross-entropy with an optional z-loss.

Generic over models: it takes logits, targets and per-token weights (sentinels and padding
weigh 0, see docs/architecture.md, "Conventions").

Statistics travel as ``(sum, count)`` pairs, not means, so that microbatches and eval batches
add up exactly: the mean over a whole batch is ``sum(sums) / sum(counts)`` however it was split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Stats = dict[str, tuple[jax.Array, jax.Array]]  # name -> (sum, count); the metric is sum / count


def token_stats(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None, z_loss: float = 0.0,
                groups: dict[str, jax.Array] | None = None) -> tuple[jax.Array, Stats]:
    """Weighted sums of ``-log p(target) + z_loss * logsumexp(logits)**2``, and of its parts.

    logits: Float[B, T, V]; targets: Int[B, T]; weights: Float[B, T] (default 1).
    groups: name -> Bool[B, T] (e.g. text / image targets); each adds ``name/nll`` and
    ``name/accuracy`` over its own weighted tokens.
    The z-loss (Chameleon: 1e-5) keeps the softmax normaliser near 1 for stability at scale.
    Returns (loss_sum, stats) with stats 'loss', 'nll', 'z_loss', 'accuracy' (and per group);
    ``stats['loss'] == (loss_sum, total weight)``.
    """
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (logits.argmax(-1) == targets).astype(jnp.float32)
    total = weights.sum()
    loss_sum = (weights * (nll + z_loss * lse**2)).sum()
    stats = {'loss': (loss_sum, total), 'nll': ((weights * nll).sum(), total),
             'z_loss': ((weights * lse**2).sum(), total), 'accuracy': ((weights * correct).sum(), total)}
    for name, mask in (groups or {}).items():
        w = weights * mask
        count = w.sum()
        stats[f'{name}/nll'] = ((w * nll).sum(), count)
        stats[f'{name}/accuracy'] = ((w * correct).sum(), count)
    return loss_sum, stats


def means(stats: Stats) -> dict[str, jax.Array]:
    """(sum, count) pairs -> means; a group with no tokens reports 0."""
    return {name: s / jnp.maximum(c, 1e-9) * (c > 0) for name, (s, c) in stats.items()}


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over weighted tokens of `token_stats`' loss.

    Returns (loss, metrics) with metrics 'loss', 'nll', 'z_loss', 'accuracy' and 'weight' (the
    token count the means are over).
    """
    _, stats = token_stats(logits, targets, weights, z_loss)
    metrics = means(stats)
    metrics['weight'] = stats['loss'][1]
    return metrics['loss'], metrics
