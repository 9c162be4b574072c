"""cm3jax's config presets, installed with the package: ``--config=configs/lm.py:tiny`` works from
any directory, and ``from configs import lm`` from any Python."""
