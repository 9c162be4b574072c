"""Pure train and eval steps over any loss, with gradient accumulation and a NaN/inf guard.

A loss function has the signature ``loss_fn(params, batch, rng) -> (loss_sum, stats)``: the
*sum* of per-token losses and `cm3jax.train.loss.Stats` whose ``'loss'`` entry is
``(loss_sum, count)``. The step differentiates the sum and divides by the total count, so
accumulating microbatches gives the full batch's mean gradient exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm3jax.errors import Cm3jaxError
from cm3jax.train import optim
from cm3jax.train.loss import Stats, means
from cm3jax.train.state import State

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Stats]]


class NonFiniteError(Cm3jaxError, FloatingPointError):
    """The loss or the gradients became NaN/inf; the update was not applied."""


def split_microbatches(batch, num: int):
    """[B, ...] leaves -> [num, B/num, ...]; microbatch m takes rows m, m+num, m+2*num, ...

    Interleaved rather than contiguous so every microbatch keeps rows on every batch shard:
    a device's contiguous block of rows holds rows of each microbatch.
    """
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f'batch of {x.shape[0]} rows does not split into {num} microbatches')
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def loss_and_grads(loss_fn: LossFn, params, batch, rng: jax.Array, microbatches: int = 1):
    """(stats summed over the batch, gradient of the mean loss) with ``microbatches`` passes."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if microbatches == 1:
        grads, stats = grad_fn(params, batch, rng)
    else:
        def accumulate(carry, inputs):
            index, micro = inputs
            grads, stats = grad_fn(params, micro, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (grads, stats)), None

        micro = split_microbatches(batch, microbatches)
        zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, stats), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), micro))
    count = jnp.maximum(stats['loss'][1], 1e-9)
    return stats, jax.tree.map(lambda g: g / count.astype(g.dtype), grads)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, microbatches: int = 1):
    """``train_step(state, batch, rng) -> (state, metrics)``, pure; jit it with `jit_train_step`.

    metrics: the loss stats as means, the gradient / parameter / update global norms, the
    learning rate, and 'finite/loss', 'finite/grads'. When either is False the returned state
    is the input state unchanged, so a bad batch never reaches the parameters.
    """
    def train_step(state: State, batch, rng: jax.Array):
        stats, grads = loss_and_grads(loss_fn, state['params'], batch, rng, microbatches)
        updates, opt = optimizer.update(grads, state['opt'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        metrics = means(stats)
        metrics.update({
            'tokens': stats['loss'][1],
            'grad_norm': optax.tree.norm(grads),
            'param_norm': optax.tree.norm(params),
            'update_norm': optax.tree.norm(updates),
            'finite/loss': jnp.isfinite(stats['loss'][0]),
            'finite/grads': jnp.isfinite(optax.tree.norm(grads)),
        })
        lr = optim.current_learning_rate(opt)
        if lr is not None:
            metrics['learning_rate'] = lr
        ok = metrics['finite/loss'] & metrics['finite/grads']
        new = {'step': state['step'] + 1, 'params': params, 'opt': opt}
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state), metrics

    return train_step


def jit_train_step(train_step, state_shardings, batch_shardings):
    """Jit with pinned shardings, donating the input state (its buffers become the output's)."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, None),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(loss_fn: LossFn):
    """``eval_step(params, batch, rng) -> stats`` as (sum, count) pairs, to add over batches."""
    def eval_step(params, batch, rng):
        return loss_fn(params, batch, rng)[1]
    return eval_step


def check_finite(metrics: dict, step: int) -> None:
    """Raise `NonFiniteError` naming the step and what went non-finite (host-side metrics)."""
    bad = [name for name in ('loss', 'grads') if not bool(np.asarray(metrics.get(f'finite/{name}', True)))]
    if bad:
        raise NonFiniteError(
            f'step {step}: the {" and the ".join(bad)} became NaN/inf (loss {float(metrics["loss"]):.4g}, '
            f'grad norm {float(metrics["grad_norm"]):.4g}); the update was not applied and the run stopped. '
            f'Lower optim.learning_rate, raise optim.warmup_steps, or inspect this step\'s batch.')
