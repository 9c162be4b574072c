"""Judging instruction-following on the Shapes world (docs/sft.md), one verdict per output:

  edit_success     the edited image holds exactly the target scene's objects: each (shape,
                   colour, size) found once, its centre within ``tolerance`` pixels of the
                   target's, and nothing else; so the asked change happened and nothing else moved
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


def edit_success(image: np.ndarray, target: shapes.Scene, cfg: shapes.ShapesConfig = shapes.DEFAULT,
                 tolerance: float = 2.0) -> bool:
    """Whether uint8 [S, S, 3] ``image`` shows ``target`` (module docstring)."""
    dets = shapes_judge.parse(image, cfg)
    if len(dets) != len(target.objects):
        return False
    left = list(dets)
    for o in target.objects:
        match = next((d for d in left if (d.shape, d.colour, d.size) == (o.shape, o.colour, o.size)
                      and abs(d.x - o.x) <= tolerance and abs(d.y - o.y) <= tolerance), None)
        if match is None:
            return False
        left.remove(match)
    return True


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
