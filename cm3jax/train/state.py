"""The train state: a plain dict ``{'step', 'params', 'opt'}`` created already sharded.

``init_fn(*args)`` returns a parameter pytree whose leaves carry logical axis names (for a
Flax module: ``lambda rng, x: model.init(rng, x)['params']``). Optimizer moments take their
parameter's sharding; scalars (step, Adam's count, injected hyperparameters) are replicated
global arrays, which multi-process orbax saves require.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cm3jax import parallel

State = dict[str, Any]


def abstract_state(init_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh,
                   rules: parallel.Rules, *args) -> State:
    """The state as ``jax.ShapeDtypeStruct``s carrying this mesh's shardings; nothing is
    allocated. It is the restore target for a checkpoint written on any other mesh."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_fn, *args)
        param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = nn.unbox(boxed)
    opt = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, P())
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    shapes = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params, 'opt': opt}
    shardings = {'step': replicated, 'params': param_shardings, 'opt': opt_shardings}
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def shardings_of(tree):
    """The ``.sharding`` of every leaf (arrays or `abstract_state`'s structs)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def init_state(init_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh,
               rules: parallel.Rules, *args) -> State:
    """Create the state on the mesh: every leaf is born sharded, no host holds a full copy."""
    target = abstract_state(init_fn, optimizer, mesh, rules, *args)

    def init(*args):
        params = nn.unbox(init_fn(*args))
        return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': optimizer.init(params)}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # waited for: one program in flight at a time (see cm3jax.quickstart.generate)
        return jax.block_until_ready(jax.jit(init, out_shardings=shardings_of(target))(*args))


def fresh_optimizer(params, optimizer: optax.GradientTransformation, target: State) -> State:
    """A step-0 state around ``params`` (e.g. loaded for fine-tuning), laid out like ``target``."""
    init = lambda params: {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': optimizer.init(params)}
    return jax.block_until_ready(jax.jit(init, out_shardings=shardings_of(target))(params))
