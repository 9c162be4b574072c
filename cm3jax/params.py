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

import functools
import json
import logging
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from cm3jax.errors import Cm3jaxError, DamagedCheckpoint

Rules = Any  # a sequence of (logical name, mesh axes) pairs; see cm3jax.parallel


class CheckpointMismatch(Cm3jaxError, ValueError):
    """A checkpoint's tensors do not fit the model it is loaded into."""


class WeightMismatch(Cm3jaxError, ValueError):
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


class _ReadOnlyNotices(logging.Filter):
    """Drops orbax's warnings that a manager opened read-only is read-only (three per opening):
    every load here opens its run that way on purpose, and a quickstart printed 41 of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith('CheckpointManagerOptions.read_only=True')
                    or message.startswith('Given directory is read only'))


_READ_ONLY_NOTICES = _ReadOnlyNotices()


# Orbax splits the write of each replicated array among its replicas. For a small tensor that
# buys nothing and costs a compiled slice per device and shape: about 130 of them (12 s of a
# 58 s two-step VQ-GAN run on 8 CPU devices) at a run's first save. Slices of a MiB or more, the
# ones worth writing in parallel, are still split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
    """Orbax's jax.Array handler, with `MIN_REPLICA_SLICE_BYTES`, for every save (once)."""
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def manager(directory: str | pathlib.Path, **options) -> ocp.CheckpointManager:
    """The orbax manager of a run's checkpoints: items 'state' (the train state) and 'data'
    (the data iterators' positions), with metadata readable (`item_metadata`)."""
    if options.get('read_only'):
        logging.getLogger('absl').addFilter(_READ_ONLY_NOTICES)  # orbax logs through absl; added once
    else:
        _register_array_handler()
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


# What a step directory must hold before orbax is asked to read it: without ``_METADATA`` orbax
# reads an empty tree (and the tensors look like another model's), without the OCDBT manifest it
# finds no arrays, and an empty directory (a save cut off before it wrote anything) has no items.
_ITEM_FILES = {'state': ('_METADATA', 'manifest.ocdbt'), 'data': ('metadata',)}


def check_complete(directory: str | pathlib.Path, step: int, items: tuple[str, ...] = ('state',)) -> None:
    """Raise `DamagedCheckpoint` naming the first missing or unreadable file of step ``step`` in
    ``directory`` (the step directories' parent). Array files cut short are only found when read
    (`read_damage`)."""
    step_dir = pathlib.Path(directory) / str(step)
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
        raise DamagedCheckpoint(f'checkpoint step {step} is damaged: {step_dir} is empty')
    for item in items:
        for name in _ITEM_FILES[item]:
            path = step_dir / item / name
            if not path.is_file():
                raise DamagedCheckpoint(f'checkpoint step {step} is damaged: {path} is missing')
    if 'state' in items:
        path = step_dir / 'state' / '_METADATA'
        try:
            tree = json.loads(path.read_text()).get('tree_metadata')
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise DamagedCheckpoint(f'checkpoint step {step} is damaged: {path} is not readable JSON ({e})') from None
        if not tree:
            raise DamagedCheckpoint(f'checkpoint step {step} is damaged: {path} lists no tensors')


# What tensorstore and orbax raise for array files that are missing, cut short or overwritten
# (NOT_FOUND, OUT_OF_RANGE, DATA_LOSS come as ValueError; a missing item as KeyError).
_READ_ERRORS = (ValueError, KeyError, OSError)


def read_damage(step: int, error: Exception) -> DamagedCheckpoint:
    """The `DamagedCheckpoint` for a read of step ``step`` that failed with ``error``: its first
    line, which names the file tensorstore could not read."""
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    first = first.split(' [tensorstore_spec=')[0]  # the file and the byte range come before tensorstore's spec
    return DamagedCheckpoint(f'checkpoint step {step} is damaged: reading it failed with {type(error).__name__}: '
                             f'{first[:800]}')


def saved_tensors(reader: ocp.CheckpointManager, step: int):
    """The orbax metadata of step ``step``'s train state, or `DamagedCheckpoint` (reading it opens
    every array's zarr header, which lives in the array files)."""
    try:
        return reader.item_metadata(step)['state']
    except _READ_ERRORS as e:
        raise read_damage(step, e) from None


def _other_steps(directory: pathlib.Path, step: int) -> str:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and int(p.name) != step)
    return f'pass --step=N for another one ({", ".join(map(str, steps))})' if steps else 'no other step is saved'


def restore(directory: str | pathlib.Path, target_params, step: int | None = None):
    """Only the parameters of the checkpoint in ``directory`` (a run's workdir or its
    ``checkpoints/``), laid out like ``target_params`` (`abstract` structs); ``step``: the
    latest by default. The optimizer state is not read: this is how sampling, evaluation and
    fine-tuning load a model. A damaged step raises `DamagedCheckpoint`, naming the file and the
    other steps saved."""
    directory = checkpoint_dir(directory)
    reader = manager(directory, read_only=True)
    try:
        steps = list(reader.all_steps())
        step = reader.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no finished checkpoint in {directory}')
        if step not in steps:
            raise FileNotFoundError(f'no checkpoint step {step} in {directory}; it holds steps '
                                    f'{sorted(steps) or "none"}')
        where = f'checkpoint {directory}/{step}'
        try:
            check_complete(directory, step)
            saved = saved_tensors(reader, step)
        except DamagedCheckpoint as e:
            raise DamagedCheckpoint(f'{e}; {_other_steps(directory, step)}') from None
        check_fits(saved, {'params': target_params}, where)
    finally:
        reader.close()
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                                 dtype=x.dtype), target_params)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restored = checkpointer.restore(
            directory / str(step) / 'state',
            args=ocp.args.PyTreeRestore(item={'params': target_params}, restore_args={'params': restore_args},
                                        partial_restore=True))
    except _READ_ERRORS as e:
        raise DamagedCheckpoint(f'{read_damage(step, e)}; {_other_steps(directory, step)}') from None
    finally:
        checkpointer.close()
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
