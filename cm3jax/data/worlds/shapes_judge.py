"""The Shapes judge: read an image back into objects, and score a caption against it.

`parse` segments by colour (each pixel is a mix of background and its nearest palette colour;
connected components per colour; tiny components are noise) and classifies each component's
shape by its overlap with each shape's template stretched to the component's box. It reads
rendered images exactly, and is meant to stay right after a VQ round-trip and on generated images.
`score` checks every object, relation and count a template caption states (`parse_caption`
inverts `shapes.caption`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re

import numpy as np
from scipy import ndimage  # a jax dependency, so always present

from cm3jax.data.worlds.shapes import BACKGROUND, DEFAULT, NUMBERS, PALETTE, RELATIONS, ShapesConfig, stamp

MAX_DETECTIONS = 8  # bounds the assignment search; more than this is a failed image anyway


@dataclasses.dataclass(frozen=True)
class Detection:
    """An object read from an image: centre (x, y) of its box (x0, y0, x1, y1), x1/y1 exclusive;
    area in pixels; fit = IoU of the component with its shape's template."""
    shape: str
    colour: str
    size: str
    x: float
    y: float
    box: tuple[int, int, int, int]
    area: int
    fit: float


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    size: str | None  # None when the caption does not say


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    """What a caption states: objects; relation (i, 'left of', j) meaning objects[i] is left of
    objects[j]; count when it says 'two shapes: ...'."""
    objects: tuple[ObjectSpec, ...]
    relation: tuple[int, str, int] | None = None
    count: int | None = None


# --- images -> objects -----------------------------------------------------------------------------

def _palette(cfg: ShapesConfig) -> np.ndarray:
    """float [K + 1, 3]: cfg.colours, then the background."""
    return np.array([PALETTE[c] for c in cfg.colours] + [BACKGROUND], np.float32)


def colour_labels(image: np.ndarray, cfg: ShapesConfig = DEFAULT, tolerance: float | None = None) -> np.ndarray:
    """int [H, W]: index into cfg.colours per pixel, -1 for background or unrecognisable.

    Each pixel is explained as background + alpha * (colour - background) for the palette colour
    whose ray passes nearest; alpha < 0.5 is background. Blurred edges (a VQ decoder's, or a
    generator's) are such mixtures, so this thresholds every colour at half its contrast, where
    nearest-colour classification would cut dark colours wider than bright ones. A pixel farther
    than `tolerance` from every ray (default 0.6 of the closest two palette colours) is
    unrecognisable, so odd colours do not become objects.
    """
    pal = _palette(cfg)
    if tolerance is None:
        dist = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(len(pal)) * 1e9
        tolerance = 0.6 * float(dist.min())
    bg, dirs = pal[-1], pal[:-1] - pal[-1]                                   # [3], [K, 3]
    p = image[..., :3].astype(np.float32) - bg                               # [H, W, 3]
    alpha = np.maximum(p @ dirs.T / (dirs ** 2).sum(-1), 0.0)                # [H, W, K]
    d2 = ((p[..., None, :] - alpha[..., None] * dirs) ** 2).sum(-1)         # [H, W, K]
    k = d2.argmin(-1)
    a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    bad = (a < 0.5) | (np.take_along_axis(d2, k[..., None], -1)[..., 0] > tolerance ** 2)
    return np.where(bad, -1, k)


@functools.lru_cache(maxsize=4096)
def template(shape: str, h: int, w: int) -> np.ndarray:
    """bool [h, w]: the shape's stamp at the radius nearest the box, stretched to h x w."""
    r = max(1, round((max(h, w) - 1) / 2))
    s = stamp(shape, r)
    rows = ((np.arange(h) + 0.5) * s.shape[0] / h).astype(int)
    cols = ((np.arange(w) + 0.5) * s.shape[1] / w).astype(int)
    return s[np.ix_(rows, cols)]


def parse(image: np.ndarray, cfg: ShapesConfig = DEFAULT, tolerance: float | None = None,
          min_area: int | None = None) -> list[Detection]:
    """Objects in a uint8 [H, W, 3] image, largest first.

    Components smaller than `min_area` pixels (default: a third of the smallest object the
    world renders) are noise and ignored.
    """
    if min_area is None:
        r = min(cfg.radii.values())
        min_area = int(min(stamp(s, r).sum() for s in cfg.shapes) / 3)
    labels = colour_labels(image, cfg, tolerance)
    diameters = {name: 2 * r + 1 for name, r in cfg.sizes}
    out = []
    for k, colour in enumerate(cfg.colours):
        # 4-connectivity: two objects of one colour, a margin apart, stay apart after a blur.
        comp, n = ndimage.label(labels == k)
        if n == 0:
            continue
        for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[sl] == idx
            area = int(mask.sum())
            if area < min_area:
                continue
            h, w = mask.shape
            fits = {}
            for s in cfg.shapes:
                t = template(s, h, w)
                fits[s] = (mask & t).sum() / (mask | t).sum()
            shape = max(fits, key=fits.get)
            extent = max(h, w)
            size = min(diameters, key=lambda name: abs(diameters[name] - extent))
            y0, x0 = sl[0].start, sl[1].start
            out.append(Detection(shape, colour, size, x0 + (w - 1) / 2, y0 + (h - 1) / 2,
                                 (x0, y0, x0 + w, y0 + h), area, float(fits[shape])))
    return sorted(out, key=lambda d: -d.area)


# --- captions -> claims -----------------------------------------------------------------------------

def parse_caption(caption: str, cfg: ShapesConfig = DEFAULT) -> CaptionSpec:
    """Invert `shapes.caption`'s templates. Raises ValueError on anything else."""
    text = caption.strip().lower().rstrip('.')
    count = None
    if m := re.fullmatch(r'(\w+) shapes?: (.+)', text):
        if m[1] not in NUMBERS:
            raise ValueError(f'not a count: {m[1]!r}')
        count, text = NUMBERS.index(m[1]), m[2]
    elif m := re.fullmatch(r'there (?:is|are) (.+)', text):
        text = m[1]
    rels = '|'.join(RELATIONS)
    relation = None
    if m := re.fullmatch(rf'(.+?) ({rels}) (an? .+?)(?:, and (.+))?', text):
        phrases = [m[1], m[3]] + (_split(m[4]) if m[4] else [])
        relation = (0, m[2], 1)
    else:
        phrases = _split(text)
    sizes = '|'.join(cfg.radii)
    colours, shapes = '|'.join(cfg.colours), '|'.join(cfg.shapes)
    objects = []
    for p in phrases:
        m = re.fullmatch(rf'an? (?:({sizes}) )?({colours}) ({shapes})', p)
        if not m:
            raise ValueError(f'not an object phrase: {p!r} in {caption!r}')
        objects.append(ObjectSpec(m[3], m[2], m[1]))
    return CaptionSpec(tuple(objects), relation, count)


def _split(text: str) -> list[str]:
    return re.split(r', | and ', text)


def _holds(rel: str, a, b) -> bool:
    """Relations are judged by the sign of the centres' difference on the relation's axis."""
    return {'left of': a.x < b.x, 'right of': a.x > b.x, 'above': a.y < b.y, 'below': a.y > b.y}[rel]


def score(image: np.ndarray, caption: str, cfg: ShapesConfig = DEFAULT, strict: bool = True) -> dict[str, float]:
    """How well a uint8 [H, W, 3] image matches a caption.

    Objects are matched one-to-one to detections, maximising (objects matched, relation holds).
    Returns floats: parsed (0 when the caption is not a template caption; then all else fails);
    attr (fraction of stated objects found with their colour, shape, and size when stated);
    relation / count (1 or 0; NaN when the caption states none); extra (detections beyond the
    stated objects); exact (1 when all of it holds, and with `strict` no extra object: the
    templates name every object of a scene).
    """
    nan = float('nan')
    try:
        spec = parse_caption(caption, cfg)
    except ValueError:
        return {'parsed': 0.0, 'attr': 0.0, 'relation': nan, 'count': nan, 'extra': nan, 'exact': 0.0}
    return score_spec(parse(image, cfg), spec, strict)


def score_spec(detections: list[Detection], spec: CaptionSpec, strict: bool = True) -> dict[str, float]:
    """`score` of a parsed image against a parsed caption."""
    nan = float('nan')
    dets = detections[:MAX_DETECTIONS]
    m = len(spec.objects)
    best = (-1, False)
    for assign in set(itertools.permutations(list(range(len(dets))) + [None] * m, m)):
        hits = sum(a is not None and _matches(o, dets[a]) for o, a in zip(spec.objects, assign))
        rel_ok = False
        if spec.relation is not None:
            i, rel, j = spec.relation
            if assign[i] is not None and assign[j] is not None:
                rel_ok = _holds(rel, dets[assign[i]], dets[assign[j]])
        if (hits, rel_ok) > best:
            best = (hits, rel_ok)
    attr = best[0] / m
    relation = nan if spec.relation is None else float(best[1])
    count = nan if spec.count is None else float(len(dets) == spec.count)
    extra = max(0, len(dets) - m)
    exact = attr == 1.0 and relation != 0.0 and count != 0.0 and not (strict and extra)
    return {'parsed': 1.0, 'attr': attr, 'relation': relation, 'count': count, 'extra': float(extra),
            'exact': float(exact)}


def failures(image: np.ndarray, caption: str, cfg: ShapesConfig = DEFAULT) -> dict[str, bool]:
    """What is wrong with an image drawn for a template caption, by kind (any number may hold):
    ``count`` (not as many objects as the caption names), ``object`` (a stated object missing its
    colour, shape or size), ``borrowed_shape`` (of ``object``: the picture is right once a stated
    object takes another stated object's shape, or two of them exchange shapes; a binding error,
    where the model drew the caption's shapes on the wrong colours) and ``relation`` (a stated
    relation broken). All False for an exact image; ValueError for a caption that is not a
    template caption."""
    spec = parse_caption(caption, cfg)
    dets = parse(image, cfg)
    s = score_spec(dets, spec)
    borrowed = False
    if s['attr'] < 1:
        objs = spec.objects
        for i, j in itertools.permutations(range(len(objs)), 2):
            if objs[i].shape == objs[j].shape:
                continue
            took = list(objs)
            took[i] = dataclasses.replace(objs[i], shape=objs[j].shape)
            both = list(took)
            both[j] = dataclasses.replace(objs[j], shape=objs[i].shape)
            if any(score_spec(dets, dataclasses.replace(spec, objects=tuple(o)))['attr'] == 1 for o in (took, both)):
                borrowed = True
                break
    return {'count': len(dets) != len(spec.objects), 'object': s['attr'] < 1, 'borrowed_shape': borrowed,
            'relation': s['relation'] == 0}


def describes(spec: CaptionSpec, objects) -> bool:
    """Whether a parsed caption describes a scene's objects (`shapes.Object`s) exactly: the
    templates name every object, so the counts agree and some one-to-one assignment satisfies
    every phrase and the relation. The scene-graph twin of `score`, which reads an image."""
    if len(spec.objects) != len(objects) or spec.count not in (None, len(objects)):
        return False
    for perm in itertools.permutations(objects):
        if not all(o.shape == d.shape and o.colour == d.colour and o.size in (None, d.size)
                   for o, d in zip(spec.objects, perm)):
            continue
        if spec.relation is None or _holds(spec.relation[1], perm[spec.relation[0]], perm[spec.relation[2]]):
            return True
    return False


def _matches(o: ObjectSpec, d: Detection) -> bool:
    return o.colour == d.colour and o.shape == d.shape and (o.size is None or o.size == d.size)


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each `score` field over images, skipping NaN (fields a caption did not state)."""
    out = {}
    for k in scores[0]:
        vals = [s[k] for s in scores if not math.isnan(s[k])]
        out[k] = float(np.mean(vals)) if vals else float('nan')
    return out
