"""Meshes, logical sharding rules, sharded initialisation, multi-host setup and global batches.

Mesh axes are ``('data', 'fsdp', 'tensor')``, all ``AxisType.Auto`` (logical constraints fail
on Explicit axes, which ``jax.make_mesh`` defaults to). Parameters and activations carry
logical names; `DEFAULT_RULES` (overridable from the config) maps them onto mesh axes.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from cm3jax.errors import Cm3jaxError

MESH_AXES = ('data', 'fsdp', 'tensor')

Rules = Sequence[tuple[str, Any]]

# Parameters: FSDP shards the model dimension, tensor parallelism heads / MLP / vocab.
# Activations: the batch over data x fsdp; at block boundaries the model dimension is whole,
# inside a block heads and MLP columns are split over 'tensor' (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
    ('act_batch', ('data', 'fsdp')),
    ('act_len', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)

log = logging.getLogger(__name__)


class MeshError(Cm3jaxError, ValueError):
    """A mesh shape that does not fit the devices."""


def resolve_mesh_shape(ici: Sequence[int], dcn: Sequence[int], num_devices: int,
                       num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Fill the one -1 allowed in each of ``ici`` (within a slice/host group) and ``dcn``
    (across slices) so that the products match; raise `MeshError` naming the field if not."""

    def fill(shape, total, field):
        shape = [int(s) for s in shape]
        if len(shape) != len(MESH_AXES):
            raise MeshError(f'{field}={tuple(shape)} must have {len(MESH_AXES)} entries, one per axis {MESH_AXES}')
        if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
            raise MeshError(f'{field}={tuple(shape)}: entries must be positive, with at most one -1 (auto-fill)')
        known = math.prod(s for s in shape if s != -1)
        if -1 in shape:
            if total % known:
                raise MeshError(f'{field}={tuple(shape)}: {total} devices do not split evenly into {known}')
            shape[shape.index(-1)] = total // known
        if math.prod(shape) != total:
            raise MeshError(f'{field}={tuple(shape)} has {math.prod(shape)} devices but there are {total}; '
                            f'change {field} (use -1 on one axis to auto-fill)')
        return tuple(shape)

    if num_devices % num_slices:
        raise MeshError(f'{num_devices} devices do not split into {num_slices} slices')
    dcn = fill(dcn, num_slices, 'mesh.dcn')
    ici = fill(ici, num_devices // num_slices, 'mesh.ici')
    return ici, dcn


def create_mesh(ici: Sequence[int] = (1, -1, 1), dcn: Sequence[int] = (1, 1, 1),
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; ``ici`` inside a slice, ``dcn`` across slices.

    The global axis size is ici * dcn. Slices are TPU slices (``device.slice_index``); on
    GPU clusters and CPUs each process counts as one when ``dcn`` asks for more than one.
    """
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = resolve_mesh_shape(ici, dcn, len(devices), count_slices(dcn, devices))
    if math.prod(dcn) > 1:
        granule, found = _granules(devices)
        if found != math.prod(dcn):
            raise MeshError(f'mesh.dcn={dcn} asks for {math.prod(dcn)} slices but the devices form {found} '
                            f'(by {granule}); set mesh.dcn to multiply to {found}')
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=granule == 'process_index')
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):  # topologies mesh_utils cannot place
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def count_slices(dcn: Sequence[int], devices: Sequence[jax.Device] | None = None) -> int:
    """How many slices ``dcn`` spans: its product, or with a -1, the slices the devices form
    (TPU ``slice_index``; elsewhere one per process)."""
    if -1 not in dcn:
        return math.prod(dcn)
    devices = list(devices if devices is not None else jax.devices())
    return _granules(devices)[1]


def _granules(devices) -> tuple[str, int]:
    """What a DCN slice is (a TPU slice where devices know theirs, else a process) and how
    many the devices form."""
    tpu_slices = devices[0].platform == 'tpu' and hasattr(devices[0], 'slice_index')
    key = 'slice_index' if tpu_slices else 'process_index'
    return key, len({getattr(d, key) for d in devices})


def mesh_from_config(mesh_config, devices=None) -> Mesh:
    """``config.mesh`` (fields ``ici`` and ``dcn``) -> Mesh."""
    return create_mesh(tuple(mesh_config.ici), tuple(mesh_config.dcn), devices)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
    """``config.sharding.rules`` if set, else `DEFAULT_RULES`; lists become tuples."""
    rules = config.get('sharding', {}).get('rules', None) or DEFAULT_RULES
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def axis_size(mesh: Mesh, rules: Rules, logical_name: str) -> int:
    """How many shards ``logical_name`` is split into on this mesh."""
    axes = dict(rules).get(logical_name)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def padded_vocab_size(vocab_size: int, mesh: Mesh, rules: Rules, multiple: int = 128) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple`` that the vocab's mesh axes divide."""
    step = math.lcm(multiple, axis_size(mesh, rules, 'vocab'), axis_size(mesh, rules, 'embed'))
    return -(-vocab_size // step) * step


def logical_sharding(mesh: Mesh, rules: Rules, names: Sequence[str | None]) -> NamedSharding:
    """NamedSharding for an array whose axes have these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(names), rules))


def check_sharding(params, *, min_size: int = 2**20, max_replicated_fraction: float = 0.1) -> float:
    """Raise if more than ``max_replicated_fraction`` of the bytes in parameters of at least
    ``min_size`` elements sit fully replicated on a multi-device mesh (a forgotten logical
    name or rule would waste memory on every device). Returns that fraction."""
    big = [x for x in jax.tree.leaves(params) if x.size >= min_size and len(x.sharding.device_set) > 1]
    total = sum(x.nbytes for x in big)
    if not total:
        return 0.0
    replicated = [x for x in big if x.sharding.is_fully_replicated]
    fraction = sum(x.nbytes for x in replicated) / total
    if fraction > max_replicated_fraction:
        shapes = ', '.join(str(x.shape) for x in replicated[:5])
        raise ValueError(f'{fraction:.0%} of large-parameter bytes are replicated on every device '
                         f'(limit {max_replicated_fraction:.0%}; e.g. shapes {shapes}); '
                         f'add logical axis names or sharding.rules that split them')
    return fraction


def maybe_initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when the environment asks for it.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (any launcher).
    Detected by JAX itself: a SLURM job step with more than one task, or a multi-host Cloud TPU
    (TPU_WORKER_HOSTNAMES lists several hosts). Returns whether it initialised.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return False
    if 'JAX_COORDINATOR_ADDRESS' in env:
        missing = [k for k in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID') if k not in env]
        if missing:
            raise ValueError(f'JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three')
        jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                                   num_processes=int(env['JAX_NUM_PROCESSES']),
                                   process_id=int(env['JAX_PROCESS_ID']))
    elif int(env.get('SLURM_NTASKS', '1')) > 1 or len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
        jax.distributed.initialize()
    else:
        return False
    log.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())
    return True


def global_batch(local_batch, mesh: Mesh, rules: Rules, names: Sequence[str | None] = ('act_batch', 'act_len')):
    """Host-local numpy rows -> global ``jax.Array``s sharded on the batch axes.

    Each process passes its own rows ([B_local, ...] per leaf); the global batch is the
    concatenation over processes in process order. ``names`` are the logical axes of a leaf's
    leading dims (missing trailing dims are unsharded).
    """

    def put(x):
        x = np.asarray(x)
        sharding = logical_sharding(mesh, rules, tuple(names[:x.ndim]) + (None,) * max(0, x.ndim - len(names)))
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, local_batch)


def shard_tree(tree, mesh: Mesh, rules: Rules, axes):
    """Device-put ``tree`` with one tuple of logical names per leaf (``axes`` mirrors ``tree``)."""
    shardings = jax.tree.map(lambda names: logical_sharding(mesh, rules, names), axes,
                             is_leaf=lambda x: isinstance(x, tuple))
    return jax.device_put(tree, shardings)


def num_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
