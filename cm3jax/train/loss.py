"""The language-model loss: weighted next-token cross-entropy with an optional z-loss.

Generic over models: it takes logits, targets and per-token weights (sentinels and padding
weigh 0, see DESIGN.md "Loss").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over weighted tokens of ``-log p(target) + z_loss * logsumexp(logits)**2``.

    logits: Float[B, T, V]; targets: Int[B, T]; weights: Float[B, T] (default 1).
    The z-loss (Chameleon: 1e-5) keeps the softmax normaliser near 1 for stability at scale.
    Returns (loss, metrics) with metrics 'nll', 'z_loss', 'accuracy' and 'weight' (the token
    count the means are over).
    """
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    total = weights.sum()
    mean = lambda x: (weights * x).sum() / jnp.maximum(total, 1.0)
    metrics = {'nll': mean(nll), 'z_loss': mean(lse**2),
               'accuracy': mean((logits.argmax(-1) == targets).astype(jnp.float32)),
               'weight': total}
    return metrics['nll'] + z_loss * metrics['z_loss'], metrics
