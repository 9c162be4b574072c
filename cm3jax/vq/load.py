"""Load a trained image tokenizer from a `cm3jax train-tokenizer` workdir (or any directory that
holds its ``config.json`` and ``checkpoints/``): the data preparation encodes with it and the
sampler decodes with it."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp

from cm3jax import params as params_lib
from cm3jax.vq import model as vq


def config_of(workdir: str | pathlib.Path) -> vq.VQConfig:
    """The tokenizer's `VQConfig` from ``workdir/config.json``."""
    path = pathlib.Path(workdir) / 'config.json'
    if not path.exists():
        raise FileNotFoundError(f'{path} is missing: point at a `cm3jax train-tokenizer` workdir')
    model = json.loads(path.read_text()).get('model', {})
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k in vq.VQConfig.__dataclass_fields__}
    if 'num_codes' not in fields:
        raise ValueError(f'{path} is not an image-tokenizer config (no model.num_codes)')
    return vq.VQConfig(**fields).validate()


def load_tokenizer(workdir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                   step: int | None = None) -> tuple[dict, vq.VQConfig]:
    """(params, config) of the tokenizer in ``workdir``, replicated over ``mesh`` (default: all
    local devices). The discriminator, if any, is not read."""
    cfg = config_of(workdir)
    mesh = mesh or jax.make_mesh((jax.local_device_count(),), ('data',),
                                 axis_types=(jax.sharding.AxisType.Auto,), devices=jax.local_devices())
    example = jnp.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels))
    # the tokenizer's params carry no logical names: replicated on every device of the mesh
    target = params_lib.abstract(lambda rng: vq.VQGAN(cfg).init(rng, example)['params'], mesh, (),
                                 jax.random.key(0))
    return params_lib.restore(workdir, {'vq': target}, step)['vq'], cfg
