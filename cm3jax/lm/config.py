"""Reading an LM ConfigDict at the edge: `validate` it, then build the static `TransformerConfig`.

Inner code never sees the ConfigDict; it takes a `TransformerConfig` or plain values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cm3jax import parallel
from cm3jax.errors import ConfigError
from cm3jax.model.attention import IMPLEMENTATIONS
from cm3jax.model.layers import canon_problem
from cm3jax.model.transformer import REMAT_POLICIES, TransformerConfig

CHOICES = {
    'norm': ('layernorm', 'rmsnorm'),
    'norm_placement': ('pre', 'swin'),
    'mlp': ('gelu', 'swiglu'),
    'position': ('learned', 'rope'),
    'attention': IMPLEMENTATIONS,
    'remat': tuple(REMAT_POLICIES),
    'dtype': ('float32', 'bfloat16', 'float16'),
    'param_dtype': ('float32', 'bfloat16'),
}
POSITIVE = ('vocab_size', 'vocab_multiple', 'num_layers', 'd_model', 'num_heads', 'num_kv_heads',
            'mlp_dim', 'max_len', 'norm_eps', 'qk_norm_eps', 'init_std', 'pos_init_std', 'rope_theta')


def validate(config, num_devices: int | None = None):
    """Check ``config`` and return it; raise `ConfigError` naming the first bad field.

    ``num_devices`` (default: all devices) is what ``config.mesh`` must multiply out to.
    """
    m = config.model
    for name in POSITIVE:
        if not m[name] > 0:
            raise ConfigError(f'model.{name}={m[name]} must be positive')
    if not (isinstance(m.get('scan_unroll', 1), int) and m.get('scan_unroll', 1) >= 1):  # absent in older runs
        raise ConfigError(f'model.scan_unroll={m.scan_unroll!r} must be an int >= 1 (layers per scan iteration)')
    places, (lo, hi) = m.get('image_positions', 0), tuple(m.get('image_ids', (0, 0)))  # absent in older runs
    if not (isinstance(places, int) and places >= 0):
        raise ConfigError(f'model.image_positions={places!r} must be an int >= 0 (0 = off)')
    if places and not 0 <= lo < hi <= m.vocab_size:
        raise ConfigError(f'model.image_positions={places} needs model.image_ids=(start, stop), the image-code ids '
                          f'within the vocab of {m.vocab_size}; got ({lo}, {hi})')
    problem = canon_problem(m.get('canon', ''), m.get('canon_taps', (1, 2, 3)), 'model.canon')  # absent in older runs
    if problem:
        raise ConfigError(problem)
    for name, allowed in CHOICES.items():
        if m[name] not in allowed:
            raise ConfigError(f'model.{name}={m[name]!r} is unknown; choose one of {allowed}')
    if m.d_model % m.num_heads:
        raise ConfigError(f'model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; '
                          f'pick a head count that divides it')
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f'model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads} '
                          f'(GQA shares each k/v head among an equal group of query heads)')
    if m.position == 'rope' and (m.d_model // m.num_heads) % 2:
        raise ConfigError(f'model.position=rope needs an even head dim, got d_model/num_heads='
                          f'{m.d_model // m.num_heads}')
    if config.loss.z_loss < 0:
        raise ConfigError(f'loss.z_loss={config.loss.z_loss} must be >= 0')

    num_devices = jax.device_count() if num_devices is None else num_devices
    try:
        ici, dcn = parallel.resolve_mesh_shape(config.mesh.ici, config.mesh.dcn, num_devices,
                                               parallel.count_slices(config.mesh.dcn))
    except parallel.MeshError as e:
        raise ConfigError(str(e)) from None
    tensor = ici[2] * dcn[2]
    for name in ('num_heads', 'num_kv_heads'):
        if m[name] % tensor:
            raise ConfigError(f'model.{name}={m[name]} is not divisible by the tensor-parallel size {tensor} '
                              f'(mesh.ici[2] * mesh.dcn[2]); lower the tensor axis of mesh.ici')
    return config


def transformer_config(config, mesh: Mesh, rules: parallel.Rules) -> TransformerConfig:
    """The model's static config, with the vocab padded to fit ``mesh``."""
    m = config.model
    fields = {f: m[f] for f in TransformerConfig.__dataclass_fields__ if f in m and f not in ('dtype', 'param_dtype')}
    if 'image_ids' in fields:  # a list after a JSON round trip; the static config must hash
        fields['image_ids'] = tuple(int(i) for i in fields['image_ids'])
    if 'canon_taps' in fields:
        fields['canon_taps'] = tuple(int(i) for i in fields['canon_taps'])
    return TransformerConfig(**fields,
                             padded_vocab_size=parallel.padded_vocab_size(m.vocab_size, mesh, rules, m.vocab_multiple),
                             dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
