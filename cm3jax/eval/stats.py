"""Proportions with their standard error: how every accuracy in cm3jax's reports is given."""

from __future__ import annotations

import numpy as np


def rate(hits) -> dict:
    """A proportion with its binomial standard error and count: {'value', 'se', 'n'}."""
    hits = np.asarray(hits, np.float64)
    p = float(hits.mean()) if len(hits) else float('nan')
    return {'value': p, 'se': float(np.sqrt(p * (1 - p) / max(len(hits), 1))), 'n': int(len(hits))}
