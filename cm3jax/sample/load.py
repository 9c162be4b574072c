"""A `Generator` from a `cm3jax train` workdir trained on prepared data: the LM's config and
latest params, the vocab and text tokenizer its data was prepared with, and that data's image
tokenizer (all found through ``config.json`` and the data's ``manifest.json``); or from a
directory `cm3jax convert chameleon` wrote, which holds all of them itself."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from cm3jax import params as params_lib, parallel
from cm3jax.data import prepare
from cm3jax.lm import config as lm_config
from cm3jax.model import transformer
from cm3jax.sample.generate import Generator
from cm3jax.vocab import Vocab

# What `cm3jax convert chameleon` writes beside config.json and checkpoints/ (cm3jax.convert.converted)
VOCAB_FILE, TOKENIZER_FILE, VQ_DIR = 'vocab.json', 'tokenizer.json', 'vqgan'


def is_converted(directory: str | pathlib.Path) -> bool:
    """Whether ``directory`` was written by `cm3jax convert` (it holds its own vocab and tokenizers)."""
    return (pathlib.Path(directory) / VOCAB_FILE).is_file()


def read_converted(directory: str | pathlib.Path):
    """(config, vocab, text tokenizer, VQ params or None, VQ config or None) of a converted
    directory; its params are read with `cm3jax.params.restore`."""
    from cm3jax.text_tokenizer import TextTokenizer
    from cm3jax.vq import load as vq_load
    directory = pathlib.Path(directory)
    config = ConfigDict(json.loads((directory / 'config.json').read_text()))
    vocab = Vocab.from_dict(json.loads((directory / VOCAB_FILE).read_text()))
    tok = TextTokenizer.load(directory / TOKENIZER_FILE)
    vq_params, vq_cfg = vq_load.load_tokenizer(directory / VQ_DIR) if (directory / VQ_DIR).is_dir() else (None, None)
    return config, vocab, tok, vq_params, vq_cfg


def read_run(workdir: str | pathlib.Path):
    """(config, vocab, text tokenizer, VQ params, VQ config, paths) of a `cm3jax train` workdir on
    prepared data (its tokenizers found through the data's manifest) or of a converted
    directory (which holds them); paths: where the tokenizers live ('vq_workdir',
    'text_tokenizer_path'), for what is prepared with them next."""
    workdir = pathlib.Path(workdir)
    path = workdir / 'config.json'
    if not path.exists():
        raise FileNotFoundError(f'{path} is missing: point --workdir at a `cm3jax train` run (or --checkpoint at '
                                f'the output of `cm3jax convert chameleon`)')
    if is_converted(workdir):  # released weights: the tokenizers sit in the directory
        config, vocab, tok, vq_params, vq_cfg = read_converted(workdir)
        paths = {'vq_workdir': str((workdir / VQ_DIR).absolute()),
                 'text_tokenizer_path': str((workdir / TOKENIZER_FILE).absolute())}
        return config, vocab, tok, vq_params, vq_cfg, paths
    config = ConfigDict(json.loads(path.read_text()))
    if not config.data.get('dir'):
        raise ValueError(f'{workdir} trained on the synthetic task; sampling images needs a run on prepared '
                         f'multimodal data (data.dir, the output of `cm3jax prepare`)')
    manifest, vocab, tok, vq_params, vq_cfg = prepare.load_tokenizers(config.data.dir)
    return config, vocab, tok, vq_params, vq_cfg, {k: manifest[k] for k in ('vq_workdir', 'text_tokenizer_path')}


def load_generator(workdir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                   step: int | None = None) -> tuple[Generator, jax.sharding.Mesh, parallel.Rules]:
    """(generator, mesh, rules) for the LM in ``workdir``; params are laid out on ``mesh``
    (default: every device on the batch axes). Decode under ``jax.set_mesh(mesh)`` and
    ``nn.logical_axis_rules(rules)``."""
    workdir = pathlib.Path(workdir)
    config, vocab, tok, vq_params, vq_cfg, _ = read_run(workdir)

    mesh = mesh or parallel.create_mesh((1, -1, 1))
    rules = parallel.rules_from_config(config)
    model = transformer.Transformer(lm_config.transformer_config(config, mesh, rules))
    example = jnp.zeros((parallel.axis_size(mesh, rules, 'act_batch'), 8), jnp.int32)
    target = params_lib.abstract(lambda rng: model.init(rng, example)['params'], mesh, rules, jax.random.key(0))
    params = params_lib.restore(workdir, target, step)
    dropout = bool(config.data.get('caption_dropout', 0.0))
    return Generator(model, params, vocab, tok, vq_params, vq_cfg, caption_dropout=dropout), mesh, rules
