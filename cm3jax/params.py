"""Parameters as sharded pytrees: their abstract layout, creation, placement and restoring.

One helper builds the abstract layout of any parameter tree on a mesh (`abstract`): shapes and
dtypes from ``jax.eval_shape``, shardings from the leaves' logical axis names and the rules.
Everything else starts from it: sharded creation (`init_sharded`), the train state's restore
target, placing host weights (`place`) and restoring parameters from a checkpoint (`restore`).

Reading a checkpoint lives here, not in `cm3jax.train`, so that sampling and conversion load
parameters without importing the trainer. Foreign weight files (safetensors, torch) are read by
`load_state_dict`, which the converters share.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

Rules = Any  # a sequence of (logical name, mesh axes) pairs; see cm3jax.parallel


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not fit the model it is loaded into."""


class WeightMismatch(ValueError):
    """A foreign weight file does not fit the model config it is converted for."""


def abstract(init_fn: Callable, mesh: Mesh, rules: Rules, *args) -> Any:
    """``init_fn(*args)``'s tree as ``jax.ShapeDtypeStruct``s carrying this mesh's shardings;
    nothing is allocated. Leaves made with ``nn.with_logical_partitioning`` take the sharding
    their names map to; other leaves are replicated."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_fn, *args)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)


def shardings_of(tree):
    """The ``.sharding`` of every leaf (arrays or `abstract`'s structs)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def init_sharded(init_fn: Callable, mesh: Mesh, rules: Rules, *args, target=None) -> tuple[Any, Any]:
    """Create ``init_fn(*args)`` already sharded: no host ever holds a full copy. ``target``:
    its `abstract` layout when the caller has it. Returns (unboxed tree, its NamedShardings)."""
    shardings = shardings_of(abstract(init_fn, mesh, rules, *args) if target is None else target)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # waited for: one program in flight at a time (simulated CPU devices can deadlock otherwise)
        tree = jax.block_until_ready(jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args))
    return tree, shardings


def place(host_params, target, where: str = 'the weights'):
    """Host arrays (e.g. converted weights) -> arrays laid out like ``target``, shapes checked."""
    check_fits({'params': host_params}, {'params': target}, where)
    return jax.tree.map(lambda x, t: jax.device_put(np.asarray(x, t.dtype), t.sharding), host_params, target)


# ---- Checkpoints ------------------------------------------------------------------------------

def _path_str(path) -> str:
    """Key path -> 'params/layers/attn/wq'; namedtuple fields, dict keys and list indices
    alike, because orbax's metadata stores optimizer namedtuples as dicts and lists."""
    parts = []
    for key in path:
        for attr in ('key', 'name', 'idx'):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return '/'.join(parts)


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in leaves if hasattr(x, 'shape')}


def check_fits(saved, target, where: str, whole: bool = False) -> None:
    """Raise `CheckpointMismatch` unless the tensors of ``saved`` (orbax metadata, or arrays)
    under ``target``'s top-level keys are exactly ``target``'s, with the same shapes; ``where``
    names the checkpoint in the message. Other top-level keys (e.g. the optimizer state when
    only params are wanted) are not read, unless ``whole``: then they are extra tensors."""
    want = _shapes(target)
    tops = {name.split('/')[0] for name in want}
    if whole:
        tops |= {name.split('/')[0] for name in _shapes(saved)}
    have = {name: v for name, v in _shapes(saved).items() if name.split('/')[0] in tops}
    # parameters first: they name the model change, while optimizer moments only mirror them
    first = lambda names: sorted(names, key=lambda name: (not name.startswith('params'), name))  # noqa: E731
    missing, extra = first(set(want) - set(have)), first(set(have) - set(want))
    if missing or extra:
        name, verb = (missing[0], 'lacks') if missing else (extra[0], 'has')
        raise CheckpointMismatch(f'{where} {verb} tensor {name!r} that the model '
                                 f'{"has" if missing else "lacks"} ({len(missing)} missing, {len(extra)} extra '
                                 f'in all); it was written for a different model or optimizer')
    for name in first(want):
        shape = want[name][0]
        if have[name][0] != shape:
            raise CheckpointMismatch(f'{where}: tensor {name!r} has shape {have[name][0]} in the checkpoint but '
                                     f'{shape} in the model; load it with the config it was trained with')


def checkpoint_dir(directory: str | pathlib.Path) -> pathlib.Path:
    """A run's workdir or its ``checkpoints/`` -> the directory holding the step directories."""
    directory = pathlib.Path(directory).absolute()
    if (directory / 'checkpoints').is_dir():
        return directory / 'checkpoints'
    if not any(p.name.isdigit() for p in directory.glob('*')):
        raise FileNotFoundError(f'{directory} holds no checkpoints (expected step directories in it or in '
                                f'{directory}/checkpoints)')
    return directory


def manager(directory: str | pathlib.Path, **options) -> ocp.CheckpointManager:
    """The orbax manager of a run's checkpoints: items 'state' (the train state) and 'data'
    (the data iterators' positions), with metadata readable (`item_metadata`)."""
    return ocp.CheckpointManager(directory, item_names=('state', 'data'),
                                 item_handlers={'state': ocp.StandardCheckpointHandler(),
                                                'data': ocp.JsonCheckpointHandler()},
                                 options=ocp.CheckpointManagerOptions(**options))


def latest_step(directory: str | pathlib.Path) -> int | None:
    """The newest finished checkpoint step in a run's workdir (or its ``checkpoints/``)."""
    reader = manager(checkpoint_dir(directory), read_only=True)
    try:
        return reader.latest_step()
    finally:
        reader.close()


def restore(directory: str | pathlib.Path, target_params, step: int | None = None):
    """Only the parameters of the checkpoint in ``directory`` (a run's workdir or its
    ``checkpoints/``), laid out like ``target_params`` (`abstract` structs). The optimizer
    state is not read: this is how sampling, evaluation and fine-tuning load a model."""
    directory = checkpoint_dir(directory)
    reader = manager(directory, read_only=True)
    try:
        step = reader.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no finished checkpoint in {directory}')
        where = f'checkpoint {directory}/{step}'
        check_fits(reader.item_metadata(step)['state'], {'params': target_params}, where)
    finally:
        reader.close()
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                                 dtype=x.dtype), target_params)
    restored = ocp.PyTreeCheckpointer().restore(
        directory / str(step) / 'state',
        args=ocp.args.PyTreeRestore(item={'params': target_params}, restore_args={'params': restore_args},
                                    partial_restore=True))
    return restored['params']


# ---- Foreign weight files -----------------------------------------------------------------------

def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file or a torch checkpoint (``weights_only=True``: plain tensors, never
    pickled objects) -> numpy arrays. Lightning checkpoints' ``state_dict`` wrapper is unwrapped."""
    path = pathlib.Path(path)
    if path.suffix == '.safetensors':
        from safetensors.numpy import load_file
        return dict(load_file(str(path)))
    import torch
    state = torch.load(str(path), map_location='cpu', weights_only=True)
    state = state.get('state_dict', state)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()
            if isinstance(v, torch.Tensor)}
