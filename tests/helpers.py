"""Tiny models shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cm3jax import params as params_lib, parallel
from cm3jax.lm import config as lm_config
from cm3jax.model import transformer
from configs import lm


def tiny_config(variant: str = 'cm3leon', **model_overrides):
    config = lm.get_config('tiny,chameleon' if variant == 'chameleon' else 'tiny')
    config.model.update(model_overrides)
    return config


def build(config, mesh=None):
    """(model, params, mesh, rules) for a config; params created sharded on ``mesh``."""
    mesh = mesh or parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = parallel.rules_from_config(config)
    cfg = lm_config.transformer_config(config, mesh, rules)
    model = transformer.Transformer(cfg)
    variables, _ = params_lib.init_sharded(model.init, mesh, rules, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    return model, variables['params'], mesh, rules


def random_tokens(key, shape, vocab_size):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab_size, jnp.int32)


def forward(model):
    """Jitted ``(params, tokens, segment_ids=None) -> logits``; eager Flax is slow on CPU."""
    return jax.jit(lambda params, tokens, segment_ids=None: model.apply({'params': params}, tokens, segment_ids))
