"""Tiny models shared by the tests."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from cm3jax import params as params_lib, parallel
from cm3jax.lm import config as lm_config
from cm3jax.model import transformer
from configs import lm


def one_device_env(**extra: str) -> dict[str, str]:
    """The environment for a command run as a user's laptop runs it: conftest's XLA flags without
    its 8 fake devices (its compile flag stays: most of the suite's time is compiling), plus `extra`."""
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    return {**os.environ, 'XLA_FLAGS': ' '.join(flags), **extra}


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


def hf_clip_dir(path, words, layers: int = 2, max_positions: int = 16, image_size: int = 32):
    """A tiny random HF CLIP saved with ``save_pretrained`` in ``path``, beside a word-level
    tokenizer.json over ``words`` with OpenAI's end tokens (ids 98 and 99): what
    `cm3jax.retrieval.load.load_retriever` reads as HF CLIP weights. Returns (model, vocab)."""
    import pytest
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    from tokenizers import Tokenizer, models, pre_tokenizers
    from cm3jax.retrieval import load
    vocab = {w: i for i, w in enumerate(words)} | {load.CLIP_BOS: 98, load.CLIP_EOS: 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / 'tokenizer.json'))
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                vocab_size=100, max_position_embeddings=max_positions, eos_token_id=99)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                           projection_dim=16)).eval()
    model.save_pretrained(path)
    return model, vocab


def torch_fidelity_inception():
    """torch-fidelity's ``feature_extractor_inceptionv3`` module (the FID Inception reference). It
    needs only torch, but the package's __init__ imports torchvision, which does not import
    beside CPU torch 2.13; then the package is registered without running its __init__ (which
    also lets torchmetrics' FID module import, since it imports torch-fidelity when installed)."""
    import importlib
    import importlib.util
    import sys
    import types
    import pytest
    try:
        return importlib.import_module('torch_fidelity.feature_extractor_inceptionv3')
    except Exception:  # ImportError, or the RuntimeError of a torchvision built for another torch
        spec = importlib.util.find_spec('torch_fidelity')
        if spec is None:
            pytest.skip('torch-fidelity is not installed (the Makefile installs it with --no-deps)')
        for name in [k for k in sys.modules if k.startswith('torch_fidelity')]:
            del sys.modules[name]
        package = types.ModuleType('torch_fidelity')
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules['torch_fidelity'] = package
        return importlib.import_module('torch_fidelity.feature_extractor_inceptionv3')


# What `cm3jax train-tokenizer` writes in config.json for the tests' 32 px random tokenizer.
VQ32 = {'resolution': 32, 'in_channels': 3, 'out_channels': 3, 'ch': 32, 'ch_mult': [1, 2, 2], 'num_res_blocks': 1,
        'attn_resolutions': [], 'z_channels': 16, 'embed_dim': 8, 'num_codes': 64}


def random_vq_params(cfg, size: int, seed: int = 0):
    """Random params of a VQGAN ``cfg`` for ``size`` px images, filled from numpy on the shapes
    ``eval_shape`` gives (XLA:CPU takes over half a minute to compile the VQGAN's init):
    norm scales 1, biases 0, kernels N(0, 1/fan_in), the codebook U(-1/K, 1/K) as in taming."""
    import numpy as np
    from cm3jax.vq import model as vq
    shapes = jax.eval_shape(lambda k: vq.VQGAN(cfg).init(k, jnp.zeros((1, size, size, cfg.in_channels))),
                            jax.random.key(0))['params']
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], 'key', path[-1]))
        if name == 'scale':
            return np.ones(leaf.shape, leaf.dtype)
        if name == 'bias':
            return np.zeros(leaf.shape, leaf.dtype)
        if name == 'embedding':
            return rng.uniform(-1 / cfg.num_codes, 1 / cfg.num_codes, leaf.shape).astype(leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def random_tokenizer_workdir(path, model: dict = VQ32):
    """What `cm3jax train-tokenizer` leaves behind, with random weights: config.json + a
    checkpoint of `random_vq_params`. Returns (params, VQConfig)."""
    import json
    import pathlib
    from cm3jax.train import checkpoint
    from cm3jax.vq import model as vq
    path = pathlib.Path(path)
    path.mkdir()
    (path / 'config.json').write_text(json.dumps({'model': model}))
    cfg = vq.VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
    params = random_vq_params(cfg, cfg.resolution)
    ckpt = checkpoint.Checkpointer(path / 'checkpoints', use_async=False)
    ckpt.save(1, {'step': jnp.int32(1), 'params': {'vq': jax.tree.map(jnp.asarray, params)}}, data_state={'index': 0})
    ckpt.close()
    return params, cfg
