"""Judging instruction-following on the Shapes world (docs/sft.md), one verdict per output:

  edit_success     the edited image holds exactly the target scene's objects: each (shape,
                   colour, size) found once, its centre within ``tolerance`` pixels of the
                   target's, and nothing else; so the asked change happened and nothing else moved.
                   Where the instruction leaves the place open, any place that follows it counts:
                   an added object may be anywhere ('add a red circle'), and a moved one any
                   distance in its direction ('move the square left': more than ``tolerance``
                   pixels that way, within it across)
  edit_verdict     edit_success and its parts: the object count, the objects left alone kept,
                   the asked change made; edit_kind names the change
  box_hits         per object of a grounded prompt, whether a detection of its colour and shape
                   overlaps its box with IoU >= 0.5
  vqa_correct      the answer equals the true one after VQA's answer normalisation
  structure / captioning use the judge's caption exact match (`shapes_judge.score`), and
  how-to-write `glyphs.legible`.
"""

from __future__ import annotations

import numpy as np

from cm3jax.data.worlds import shapes, shapes_judge
from cm3jax.eval import vqa


def edit_success(image: np.ndarray, before: shapes.Scene, after: shapes.Scene,
                 cfg: shapes.ShapesConfig = shapes.DEFAULT, tolerance: float = 2.0) -> bool:
    """Whether uint8 [S, S, 3] ``image`` shows ``before`` edited into ``after`` (module docstring)."""
    return edit_verdict(image, before, after, cfg, tolerance)['success']


def edit_verdict(image: np.ndarray, before: shapes.Scene, after: shapes.Scene,
                 cfg: shapes.ShapesConfig = shapes.DEFAULT, tolerance: float = 2.0) -> dict[str, bool | None]:
    """`edit_success` and the parts of it that say what went wrong -> {success, count (as many
    objects as ``after``), kept (every object the edit leaves alone found in its place; None
    when it leaves none alone, an edit of a scene's only object), edited (the changed or added
    object found where it may stand; for a removal, the removed object not found at its place)}.
    ``success`` is count and every object of ``after`` found."""
    dets = list(shapes_judge.parse(image, cfg))
    attrs = lambda o: (o.shape, o.colour, o.size)  # noqa: E731
    gone = [b for b in before.objects if b not in after.objects]
    rules = []  # (index in `after`, where it may stand: None = its own place)
    for k, o in enumerate(after.objects):
        if o in before.objects:
            rules.append((k, None))
        elif len(after.objects) == len(before.objects) + 1:  # added, where the instruction does not say
            rules.append((k, 'anywhere'))
        else:  # changed in place (None), or moved along one axis from its place before
            rules.append((k, next((b for b in gone if attrs(b) == attrs(o) and (b.x == o.x) != (b.y == o.y)),
                                  None)))
    found, free = {}, list(dets)
    for k, how in sorted(rules, key=lambda r: r[1] is not None):  # the exact ones claim theirs first
        o = after.objects[k]
        found[k] = next((d for d in free if attrs(d) == attrs(o) and _placed(d, o, how, tolerance)), None)
        if found[k] is not None:
            free.remove(found[k])
    kept = [found[k] is not None for k, o in enumerate(after.objects) if o in before.objects]
    new = [found[k] is not None for k, o in enumerate(after.objects) if o not in before.objects]
    edited = all(new) if new else not any(attrs(d) == attrs(g) and _placed(d, g, None, tolerance)
                                          for d in dets for g in gone)
    count = len(dets) == len(after.objects)
    return {'success': count and all(v is not None for v in found.values()), 'count': count,
            'kept': all(kept) if kept else None, 'edited': edited}


def edit_kind(before: shapes.Scene, after: shapes.Scene) -> str:
    """Which of `shapes.edit`'s kinds turns ``before`` into ``after``: add, remove, recolour,
    reshape, resize or move."""
    n, m = len(before.objects), len(after.objects)
    if m != n:
        return 'add' if m > n else 'remove'
    for a, b in zip(before.objects, after.objects):
        if a != b:
            for field, kind in (('colour', 'recolour'), ('shape', 'reshape'), ('size', 'resize')):
                if getattr(a, field) != getattr(b, field):
                    return kind
            return 'move'
    raise ValueError('the two scenes are the same: no edit')


def _placed(d, o: shapes.Object, how, tolerance: float) -> bool:
    """Whether detection ``d`` stands where ``o`` may: at its place; anywhere (added); or moved
    from ``how`` (its place before) any distance in the direction it was moved (the instruction
    gives only the direction), keeping its place across it."""
    if how is None:
        return abs(d.x - o.x) <= tolerance and abs(d.y - o.y) <= tolerance
    if how == 'anywhere':
        return True
    ux, uy = np.sign(o.x - how.x), np.sign(o.y - how.y)
    along = (d.x - how.x) * ux + (d.y - how.y) * uy
    across = (d.x - how.x) * uy - (d.y - how.y) * ux
    return along > tolerance and abs(across) <= tolerance


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes, x1 and y1 exclusive."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def box_hits(image: np.ndarray, scene: shapes.Scene, cfg: shapes.ShapesConfig = shapes.DEFAULT,
             threshold: float = 0.5) -> list[bool]:
    """Per object of ``scene`` (the grounded prompt's boxes), whether the image has it in place."""
    dets = shapes_judge.parse(image, cfg)
    return [any(d.colour == o.colour and d.shape == o.shape and iou(d.box, o.box) >= threshold for d in dets)
            for o in scene.objects]


def vqa_correct(prediction: str, answer: str) -> bool:
    return vqa.normalize(prediction) == vqa.normalize(answer)
