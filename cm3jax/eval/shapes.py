"""The Shapes judge as an eval: GenEval-like categories of captions, scored on images drawn from
them, held-out (shape, colour) pairs apart; and the image tokenizer's metrics.

Categories (`CATEGORIES`), each a set of captions of unseen scenes and what passing means:

  single_object   'a red circle'                        the object, and nothing else, is there
  two_objects     'a red circle and a small blue square' both, and nothing else
  counting        'three shapes: a red circle, ...'      exactly that many shapes (2 or more), each as stated
  colours         'a red circle'                        every shape drawn has the stated colour
  position        'a red circle left of a blue square'  both objects, and the relation holds
  colour_binding  'a red circle and a blue square'      each colour on its own shape (two colours,
                  (colours and shapes all differ)       two shapes: swapping them fails)

The pass rule of every category but `colours` is the judge's exact match (`shapes_judge.score`).
Per-attribute accuracy (colour, shape, size) reads the largest detected object of the
single-object captions. Scenes holding a `ShapesConfig.held_out` pair are drawn for every
category again and reported apart (compositional generalisation). Categories that need more
objects than the world holds are left out.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cm3jax.data.worlds import shapes, shapes_judge, twins
from cm3jax.eval.stats import rate

CATEGORIES = ('single_object', 'two_objects', 'counting', 'colours', 'position', 'colour_binding')
_OBJECTS = {'single_object': 1, 'two_objects': 2, 'counting': None, 'colours': 1, 'position': 2, 'colour_binding': 2}


@dataclasses.dataclass(frozen=True)
class Item:
    """One caption to draw, the scene it was written from (its ground truth), and its category."""
    category: str
    caption: str
    scene: shapes.Scene
    split: str  # 'validation' (pairs seen in training) or 'held_out'


def _caption(category: str, scene: shapes.Scene, rng: np.random.Generator, size_prob: float) -> str:
    objs = [scene.objects[k] for k in rng.permutation(len(scene.objects))]
    phrases = [shapes.article(o.describe(size=bool(rng.random() < size_prob))) for o in objs]
    if category == 'counting':
        n = len(objs)
        return f"{shapes.NUMBERS[n]} shape{'s' * (n > 1)}: {shapes.join(phrases)}"
    if category == 'position':
        return f'{phrases[0]} {shapes.relation(objs[0], objs[1])} {phrases[1]}'
    if category == 'colour_binding':
        return shapes.join([shapes.article(o.describe(size=False)) for o in objs])
    return shapes.join(phrases)


def _scene(cfg: shapes.ShapesConfig, category: str, rng: np.random.Generator, split: str) -> shapes.Scene | None:
    if cfg.max_objects < (_OBJECTS[category] or 2):  # counting: 2 or more
        return None
    n = _OBJECTS[category] or int(rng.integers(2, cfg.max_objects + 1))
    world = dataclasses.replace(cfg, min_objects=n, max_objects=n)
    for _ in range(100):
        scene = shapes.sample_scene(world, rng, split)
        objs = scene.objects
        if category != 'colour_binding' or (len({o.colour for o in objs}) == len({o.shape for o in objs}) == len(objs)):
            return scene
    return None


def items(cfg: shapes.ShapesConfig, per_category: int, seed: int = 0, held_out: bool = True) -> list[Item]:
    """``per_category`` items of each category the world can hold, from 'validation' scenes,
    then as many from 'held_out' scenes (when the world holds pairs out). Pure in ``seed``."""
    out = []
    for split in ('validation', 'held_out') if held_out and cfg.held_out else ('validation',):
        for c, category in enumerate(CATEGORIES):
            for i in range(per_category):
                rng = np.random.default_rng([seed, c, i, shapes.SPLITS.index(split)])
                scene = _scene(cfg, category, rng, split)
                if scene is None:
                    break
                out.append(Item(category, _caption(category, scene, rng, cfg.size_in_caption), scene, split))
    return out


def binding_probe(cfg: shapes.ShapesConfig, n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """Does a model bind each colour to its own shape? ``n`` unseen scenes of two objects whose
    colours and shapes both differ, each with its caption and the same caption with the two
    shape words swapped, which names the same colours and shapes but binds them the other way
    -> (images UInt8[n, S, S, 3], captions, swapped captions); empty when the world cannot hold
    two such objects; no swap makes a held-out pair. A model that reads colours and shapes as a
    bag of words scores both captions alike; `preference` measures how often it prefers the true one. Pure in ``seed``."""
    images, captions, swapped = [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, len(CATEGORIES), i])
        for _ in range(100):  # a swap must not make a held-out pair, which training never showed
            scene = _scene(cfg, 'colour_binding', rng, 'validation')
            if scene is None or not {(o.shape, c.colour) for o, c in zip(scene.objects, scene.objects[::-1])} \
                    & set(cfg.held_out):
                break
        if scene is None:
            break
        text = shapes.caption(scene, rng, size_prob=cfg.size_in_caption)
        images.append(shapes.render(scene))
        captions.append(text)
        swapped.append(twins.swap_shapes(text, scene.objects[0].shape, scene.objects[1].shape))
    return np.asarray(images, np.uint8).reshape(len(images), cfg.canvas, cfg.canvas, 3), captions, swapped


def preference(true_scores, swapped_scores) -> dict:
    """How often the true caption scores higher than its swapped twin (`binding_probe`), as a rate
    (0.5: no binding at all)."""
    return rate(np.asarray(true_scores) > np.asarray(swapped_scores))


def passes(item: Item, image: np.ndarray, cfg: shapes.ShapesConfig) -> dict:
    """The judge's verdict on one drawn image: 'pass' (the category's rule), 'exact', and
    per-attribute hits for single objects."""
    verdict = shapes_judge.score(image, item.caption, cfg)
    out = {'exact': verdict['exact'], 'pass': verdict['exact']}
    if item.category in ('colours', 'single_object'):
        dets = shapes_judge.parse(image, cfg)
        spec = shapes_judge.parse_caption(item.caption, cfg).objects[0]
    if item.category == 'colours':
        out['pass'] = float(bool(dets) and all(d.colour == spec.colour for d in dets))
    if item.category == 'single_object':
        top = dets[0] if dets else None
        out['colour'] = float(top is not None and top.colour == spec.colour)
        out['shape'] = float(top is not None and top.shape == spec.shape)
        if spec.size is not None:
            out['size'] = float(top is not None and top.size == spec.size)
    return out


def score(items_: Sequence[Item], images, cfg: shapes.ShapesConfig) -> dict:
    """Judge ``images`` (UInt8[N, H, W, 3], one per item) -> {'exact', 'categories':
    {name: rate}, 'attributes': {colour|shape|size: rate}, 'held_out': {...the same}}; each rate
    is {'value', 'se', 'n'}."""
    if len(items_) != len(images):
        raise ValueError(f'{len(items_)} items but {len(images)} images')
    verdicts = [passes(it, im, cfg) for it, im in zip(items_, images)]
    report = {}
    for split, name in (('validation', 'seen_pairs'), ('held_out', 'held_out_pairs')):
        rows = [(it, v) for it, v in zip(items_, verdicts) if it.split == split]
        if not rows:
            continue
        cats = {c: rate([v['pass'] for it, v in rows if it.category == c]) for c in CATEGORIES
                if any(it.category == c for it, _ in rows)}
        attrs = {a: rate([v[a] for _, v in rows if a in v]) for a in ('colour', 'shape', 'size')
                 if any(a in v for _, v in rows)}
        report[name] = {'exact': rate([v['exact'] for _, v in rows]), 'categories': cats, 'attributes': attrs}
    return report


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of UInt8[N, H, W, C] pairs (peak 255; identical images give inf)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(-1)
    with np.errstate(divide='ignore'):
        return 10.0 * np.log10(255.0 ** 2 / mse)


def tokenizer_metrics(vq_params, vq_cfg, images: np.ndarray, captions: Sequence[str] | None = None,
                      cfg: shapes.ShapesConfig | None = None, extractor=None, batch: int = 256) -> dict:
    """The image tokenizer on UInt8[N, R, R, 3] images: PSNR of the round trip (mean dB, images
    reconstructed exactly count as 100 dB), code usage (fraction of the codebook used, and the
    perplexity of the codes' frequencies), the judge's exact match of the reconstructions with
    ``captions`` (Shapes captions of the originals), and rFID (reconstructions against the
    originals) with ``extractor`` (any `fid.FeatureExtractor`)."""
    from cm3jax.eval import fid
    from cm3jax.vq import model as vq
    codes, rebuilt = [], []
    for i in range(0, len(images), batch):
        c = np.asarray(vq.encode(vq_params, images[i:i + batch], vq_cfg))
        codes.append(c)
        rebuilt.append(np.asarray(vq.decode(vq_params, c, vq_cfg)))
    codes, rebuilt = np.concatenate(codes), np.concatenate(rebuilt)
    usage = vq.code_usage(codes, vq_cfg.num_codes)
    db = np.minimum(psnr(images, rebuilt), 100.0)
    out = {'psnr_db': {'value': float(db.mean()), 'se': float(db.std(ddof=1) / np.sqrt(len(db))) if len(db) > 1
                       else float('nan'), 'n': int(len(db))},
           'code_usage': float(usage['used_fraction']), 'code_perplexity': float(usage['perplexity']),
           'num_codes': int(vq_cfg.num_codes)}
    if captions is not None:
        cfg = cfg or shapes.DEFAULT
        out['judge_roundtrip'] = rate([shapes_judge.score(im, c, cfg)['exact'] for im, c in zip(rebuilt, captions)])
    if extractor is not None:
        out['rfid'] = {'value': fid.fid(extractor, rebuilt, images), 'n': int(len(images)),
                       'protocol': extractor.protocol}
    return out


def ground_truth(items_: Sequence[Item]) -> np.ndarray:
    """UInt8[N, S, S, 3]: each item's scene rendered."""
    return np.stack([shapes.render(it.scene) for it in items_])


def reference_captions(scene: shapes.Scene, index: int, k: int = 5, seed: int = 0,
                       size_prob: float = 0.5) -> list[str]:
    """``k`` template captions of scene number ``index`` (the references CIDEr-D scores written
    captions against)."""
    return [shapes.caption(scene, np.random.default_rng([seed, 7, index, j]), size_prob) for j in range(k)]

