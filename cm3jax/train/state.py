"""The train state: a plain dict ``{'step', 'params', 'opt'}`` created already sharded.

``init_fn(*args)`` returns a parameter pytree whose leaves carry logical axis names (for a
Flax module: ``lambda rng, x: model.init(rng, x)['params']``). Optimizer moments take their
parameter's sharding; scalars (step, Adam's count, injected hyperparameters) are replicated
global arrays, which multi-process orbax saves require.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cm3jax import params as params_lib
from cm3jax.params import shardings_of

State = dict[str, Any]


def state_target(params, optimizer: optax.GradientTransformation, mesh: Mesh) -> State:
    """The state around abstract ``params`` (`cm3jax.params.abstract`), as structs with
    shardings: the restore target for a checkpoint written on any other mesh."""
    opt = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, P())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 (the params a partitioned optimizer skips)
    opt_shardings = optax.tree_map_params(optimizer, lambda x, s: x if masked(x) else s, opt, shardings_of(params),
                                          transform_non_params=lambda _: replicated, is_leaf=masked)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt, opt_shardings)
    return {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), 'params': params, 'opt': opt}


def abstract_state(init_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh, rules, *args) -> State:
    """`state_target` of the params ``init_fn(*args)`` would create on this mesh; nothing is allocated."""
    return state_target(params_lib.abstract(init_fn, mesh, rules, *args), optimizer, mesh)


def init_state(init_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh, rules, *args) -> State:
    """Create the state on the mesh: every leaf is born sharded, no host holds a full copy."""
    target = abstract_state(init_fn, optimizer, mesh, rules, *args)
    params, _ = params_lib.init_sharded(init_fn, mesh, rules, *args, target=target['params'])
    return fresh_optimizer(params, optimizer, target)


def fresh_optimizer(params, optimizer: optax.GradientTransformation, target: State) -> State:
    """A step-0 state around ``params`` (e.g. loaded for fine-tuning), laid out like ``target``."""
    init = lambda params: {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': optimizer.init(params)}  # noqa: E731
    shardings = shardings_of({k: target[k] for k in ('step', 'params', 'opt')})
    # waited for: one program in flight at a time (simulated CPU devices can deadlock otherwise)
    return jax.block_until_ready(jax.jit(init, out_shardings=shardings)(params))
