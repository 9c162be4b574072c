"""Depth growth: a pretrained `Transformer` made deeper by blocks that start as the identity
(LLaMA Pro's block expansion, Wu et al. 2024), so that fine-tuning begins from exactly the
pretrained model's function and only the new blocks' residual branches have to be learned.

A fresh block is already the identity in this model: its attention and MLP output projections
start at zero (``zero_init_out``) and so do its Canon taps. Growing is therefore a matter of
placing the pretrained blocks' weights among fresh blocks; nothing is rescaled.

    placement(2, 2) -> ('old', 'new', 'old', 'new')   # a new block after each pretrained one
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def placement(old: int, new: int) -> tuple[str, ...]:
    """Which blocks of the grown stack are pretrained ('old') and which fresh ('new'): the new
    ones spread evenly, each after a group of pretrained ones (LLaMA Pro interleaves them, which
    did better there than stacking them on top)."""
    if old < 1 or new < 0:
        raise ValueError(f'placement({old}, {new}): need at least one pretrained block and new >= 0')
    order, placed = [], 0
    for i in range(old):
        order.append('old')
        due = (i + 1) * new // old  # new blocks placed once i + 1 pretrained ones are
        order.extend(['new'] * (due - placed))
        placed = due
    return tuple(order)


def _stacked(params) -> bool:
    return 'layers' in params


def _is_block(key: str) -> bool:
    """Whether a top-level params key holds blocks (``layers`` stacked, or ``layers_i``)."""
    return key == 'layers' or key.startswith('layers_')


def num_layers(params) -> int:
    """The number of blocks in ``params`` (scanned ``layers`` [L, ...] or ``layers_0`` ...)."""
    if _stacked(params):
        return jax.tree.leaves(params['layers'])[0].shape[0]
    return sum(1 for k in params if _is_block(k))


def shrunk(target, old: int):
    """``target`` (a grown model's params or `cm3jax.params.abstract` structs) laid out for
    ``old`` blocks: the tree a pretrained checkpoint restores into."""
    if _stacked(target):
        def cut(x):
            return jax.ShapeDtypeStruct((old, *x.shape[1:]), x.dtype, sharding=getattr(x, 'sharding', None))
        return {**target, 'layers': jax.tree.map(cut, target['layers'])}
    return {k: v for k, v in target.items() if not _is_block(k) or int(k.split('_')[1]) < old}


def grow(pretrained, fresh):
    """The grown params: ``fresh`` (an initialised model with L + N blocks) with its blocks at
    the 'old' places of ``placement(L, N)`` replaced by ``pretrained``'s L blocks, in order, and
    every other weight (embeddings, norms, head) from ``pretrained``. Fresh blocks fill the
    'new' places. Both trees use the same layout (scanned or not). Pure: jit it with the grown
    model's shardings as ``out_shardings`` (every host then places only its own shards)."""
    old, total = num_layers(pretrained), num_layers(fresh)
    # grown block k is pretrained block src[k] (< old) or fresh block src[k] - old
    olds, news = iter(range(old)), iter(range(old, total))
    src = [next(olds) if kind == 'old' else next(news) for kind in placement(old, total - old)]
    out = {k: v for k, v in pretrained.items() if not _is_block(k)}
    missing = {k for k in fresh if not _is_block(k)} - set(out)
    if missing:
        raise ValueError(f'the pretrained params lack {sorted(missing)}: not the same model but deeper')
    if _stacked(fresh):
        idx = jnp.asarray(src)

        def place(p, f):
            return jnp.concatenate([p.astype(f.dtype), f[:total - old]])[idx]
        out['layers'] = jax.tree.map(place, pretrained['layers'], fresh['layers'])
    else:
        for k, s in enumerate(src):
            out[f'layers_{k}'] = pretrained[f'layers_{s}'] if s < old else fresh[f'layers_{s - old}']
    return out
