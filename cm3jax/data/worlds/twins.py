"""Hard negatives for contrastive training on the Shapes world: a scene's *twin* is the same
scene with one thing changed that a caption states (a colour, a shape, a size, which object is
where, one object more or less), with a caption of its own.

With random in-batch negatives two Shapes scenes almost always differ in their colours, so a
CLIP trained on them learns colours and little else: it cannot tell "a red circle left of a blue
square" from the same two objects swapped, or from a red square and a blue circle. Those are
exactly the mistakes a text-to-image sampler makes, and the ones CLIP re-ranking must catch. A
batch that holds a scene and its twin makes the contrastive loss separate them (NegCLIP's hard
negatives, drawn here from the scene graph instead of by rewriting text).

A twin is a valid scene (objects inside the canvas and apart, distinct (shape, colour) pairs, no
held-out pair that its original lacks), and neither caption describes the other scene
(`shapes_judge.describes`), so the pair's contrastive labels are right.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from cm3jax.data.worlds import shapes, shapes_judge
from cm3jax.data.worlds.shapes import Scene, ShapesConfig

KINDS = ('edit', 'swap_colours', 'swap_shapes', 'swap_places')
TRIES = 64


def _swap(scene: Scene, i: int, j: int, fields: tuple[str, ...]) -> Scene:
    a, b = scene.objects[i], scene.objects[j]
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(a, **{f: getattr(b, f) for f in fields})
    objs[j] = dataclasses.replace(b, **{f: getattr(a, f) for f in fields})
    return Scene(scene.canvas, tuple(objs))


def _valid(scene: Scene, before: Scene, cfg: ShapesConfig) -> bool:
    objs = scene.objects
    pairs = [o.pair for o in objs]
    new = set(pairs) - {o.pair for o in before.objects}
    if len(set(pairs)) < len(pairs) or new & set(cfg.held_out):
        return False
    return all(shapes._fits(cfg, o.radius, objs[:k] + objs[k + 1:], o.x, o.y) for k, o in enumerate(objs))


def perturb(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> Scene | None:
    """One change of ``scene``, of a kind drawn uniformly from those it allows: an instruction
    edit (`shapes.edit`: recolour, reshape, resize, move, remove, add), or two objects swapping
    their colours, shapes or places. None when the drawn change gives an invalid scene."""
    kinds = KINDS if len(scene.objects) > 1 else KINDS[:1]
    kind = kinds[rng.integers(len(kinds))]
    if kind == 'edit':
        return shapes.edit(scene, rng, cfg)[1]
    i, j = (int(k) for k in rng.choice(len(scene.objects), 2, replace=False))
    fields = {'swap_colours': ('colour',), 'swap_shapes': ('shape',), 'swap_places': ('x', 'y')}[kind]
    out = _swap(scene, i, j, fields)
    return out if _valid(out, scene, cfg) else None


def twin(scene: Scene, text: str, rng: np.random.Generator, cfg: ShapesConfig) -> tuple[Scene, str]:
    """A hard negative of (scene, its caption ``text``): (twin scene, twin caption), such that
    ``text`` does not describe the twin and the twin's caption does not describe ``scene``."""
    spec = shapes_judge.parse_caption(text, cfg)
    for _ in range(TRIES):
        other = perturb(scene, rng, cfg)
        if other is None or shapes_judge.describes(spec, other.objects):
            continue  # e.g. a resize the caption does not mention, a move that keeps the relation
        other_text = shapes.caption(other, rng, size_prob=cfg.size_in_caption)
        if not shapes_judge.describes(shapes_judge.parse_caption(other_text, cfg), scene.objects):
            return other, other_text
    raise RuntimeError(f'no twin of {text!r} in {TRIES} tries: the world allows almost no change of this scene '
                       f'(ShapesConfig with more colours or a larger canvas)')


def twin_example(doc, rng: np.random.Generator, cfg: ShapesConfig) -> tuple[np.ndarray, str]:
    """A Shapes document's twin as (image uint8 [S, S, 3], caption)."""
    other, text = twin(Scene.from_dict(doc.meta['scene']), doc.texts[0], rng, cfg)
    return shapes.render(other), text


def swap_shapes(caption: str, a: str, b: str) -> str:
    """``caption`` with the shape words ``a`` and ``b`` exchanged ('a red circle and a blue square'
    -> 'a red square and a blue circle')."""
    return re.sub(rf'\b({re.escape(a)}|{re.escape(b)})\b', lambda m: b if m.group(1) == a else a, caption)


def binding_negative(scene: Scene, text: str, rng: np.random.Generator, cfg: ShapesConfig) -> str | None:
    """A caption that names the same colours and shapes as ``text`` but binds them the other way:
    the shape words of two objects whose colours and shapes both differ, exchanged (NegCLIP's
    swapped-word negatives, made from the scene graph). Only shapes no third object has are
    swapped, so the words name just those two; None when the scene has no such two objects, or
    when every swap would name a held-out pair (one training never shows) or a pair another
    object has."""
    objs = scene.objects
    once = {o.shape for o in objs if sum(p.shape == o.shape for p in objs) == 1}
    pairs = []
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            made = {(b.shape, a.colour), (a.shape, b.colour)}
            if a.shape in once and b.shape in once and a.colour != b.colour \
                    and not made & (set(cfg.held_out) | {o.pair for o in objs}):
                pairs.append((i, j))
    if not pairs:
        return None
    i, j = pairs[rng.integers(len(pairs))]
    return swap_shapes(text, objs[i].shape, objs[j].shape)
