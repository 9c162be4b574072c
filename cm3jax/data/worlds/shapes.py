"""The Shapes world: procedural scenes of coloured shapes, the project's embedded default data.

A scene graph (`Scene` of `Object`s) gives the image (`render`), its caption (`caption`), the
instruction-tuning examples (`edit`, `question`, `boxes`, `edge_map`) and a training document
(`scene_document`). The judge that reads images back into objects is `shapes_judge`.

numpy only. Every sampler is a pure function of the `np.random.Generator` it is given.
Coordinates: x is the column (0 = left), y the row (0 = top). An object's box is
(x0, y0, x1, y1) with x1 and y1 exclusive.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import numpy as np

from cm3jax.data.documents import Document

# Saturated colours far apart in RGB: the judge assigns every pixel to the nearest palette colour,
# and must still do so after a VQ round-trip blurs and shifts them.
PALETTE: dict[str, tuple[int, int, int]] = {
    'red': (230, 30, 30),
    'green': (30, 190, 40),
    'blue': (40, 70, 240),
    'yellow': (240, 230, 30),
    'purple': (160, 40, 210),
    'cyan': (30, 220, 230),
    'white': (245, 245, 245),
    'orange': (250, 140, 20),
}
BACKGROUND = (0, 0, 0)
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
RELATIONS = ('left of', 'right of', 'above', 'below')
DIRECTIONS = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
SPLITS = ('train', 'validation', 'held_out')
MIN_COLOUR_DISTANCE = 80.0  # RGB Euclidean; closer palette colours make the judge unreliable


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """The world's knobs. Sequences may be given as lists (e.g. from a config file).

    canvas: image side in pixels. min_objects / max_objects: objects per scene.
    shapes: names from `SHAPES`. colours: names from `PALETTE`.
    sizes: (name, radius) pairs; an object of radius r fills a (2r+1)-pixel square box.
    held_out: (shape, colour) pairs that never appear in 'train'/'validation' scenes and appear in
      every 'held_out' scene (compositional generalisation).
    margin: minimum gap in pixels between two objects' boxes (so the judge can separate them).
    border: minimum gap between a box and the canvas edge.
    size_in_caption: probability that a caption names an object's size.
    """
    canvas: int = 32
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = ('circle', 'square', 'triangle')
    colours: tuple[str, ...] = ('red', 'green', 'blue', 'yellow', 'purple', 'cyan')
    sizes: tuple[tuple[str, int], ...] = (('small', 3), ('large', 6))
    held_out: tuple[tuple[str, str], ...] = (('triangle', 'blue'), ('square', 'yellow'))
    margin: int = 2
    border: int = 1
    size_in_caption: float = 0.5

    def __post_init__(self):
        # Tuples keep the config hashable whatever container the caller used.
        for name in ('shapes', 'colours', 'sizes', 'held_out'):
            value = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in getattr(self, name))
            object.__setattr__(self, name, value)
        self.validate()

    # cached_property writes the instance __dict__ directly, which a frozen dataclass allows.
    @functools.cached_property
    def radii(self) -> dict[str, int]:
        return dict(self.sizes)

    @functools.cached_property
    def all_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(itertools.product(self.shapes, self.colours))

    @functools.cached_property
    def train_pairs(self) -> tuple[tuple[str, str], ...]:
        """(shape, colour) pairs allowed in training scenes."""
        return tuple(p for p in self.all_pairs if p not in self.held_out)

    def validate(self) -> None:
        def fail(field, msg):
            raise ValueError(f'ShapesConfig.{field}: {msg}')
        if self.canvas < 8:
            fail('canvas', f'must be >= 8 pixels, got {self.canvas}')
        if not 1 <= self.min_objects <= self.max_objects:
            fail('min_objects', f'need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}')
        if self.max_objects >= len(NUMBERS):
            fail('max_objects', f'must be < {len(NUMBERS)} (captions spell counts), got {self.max_objects}')
        for field, names, known in (('shapes', self.shapes, SHAPES), ('colours', self.colours, PALETTE)):
            if not names:
                fail(field, 'must not be empty')
            if len(set(names)) != len(names):
                fail(field, f'has duplicates: {names}')
            bad = [n for n in names if n not in known]
            if bad:
                fail(field, f'unknown {bad}; known: {sorted(known)}')
        rgb = np.array([PALETTE[c] for c in self.colours] + [BACKGROUND], np.float64)
        dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
        if dist.min() < MIN_COLOUR_DISTANCE:
            fail('colours', f'two colours (or one and the background) are closer than {MIN_COLOUR_DISTANCE}')
        if not self.sizes or len({n for n, _ in self.sizes}) != len(self.sizes):
            fail('sizes', f'need unique (name, radius) pairs, got {self.sizes}')
        radii = sorted(r for _, r in self.sizes)
        if radii[0] < 2 or len(set(radii)) != len(radii):
            fail('sizes', f'radii must be distinct and >= 2, got {self.sizes}')
        if 2 * (radii[-1] + self.border) + 1 > self.canvas:
            fail('sizes', f'radius {radii[-1]} does not fit a {self.canvas}-pixel canvas')
        per_side = (self.canvas - 2 * self.border + self.margin) // (2 * radii[0] + 1 + self.margin)
        if per_side ** 2 < self.max_objects:
            fail('canvas', f'{self.canvas} pixels cannot hold max_objects={self.max_objects} objects of '
                           f'radius {radii[0]}, {self.margin} apart')
        for pair in self.held_out:
            if len(pair) != 2 or pair[0] not in self.shapes or pair[1] not in self.colours:
                fail('held_out', f'{pair} is not a (shape, colour) pair of this config')
        if len(self.train_pairs) < self.max_objects:
            fail('held_out', f'leaves {len(self.train_pairs)} training pairs, fewer than max_objects')
        if self.margin < 1 or self.border < 0:
            fail('margin', f'need margin >= 1 and border >= 0, got {self.margin}, {self.border}')
        if not 0.0 <= self.size_in_caption <= 1.0:
            fail('size_in_caption', f'must be a probability, got {self.size_in_caption}')


DEFAULT = ShapesConfig()


@dataclasses.dataclass(frozen=True)
class Object:
    """A shape of radius `radius` pixels centred on pixel (x, y); `size` names the radius."""
    shape: str
    colour: str
    size: str
    radius: int
    x: int
    y: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        r = self.radius
        return (self.x - r, self.y - r, self.x + r + 1, self.y + r + 1)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.shape, self.colour)

    def describe(self, size: bool = True) -> str:
        """'small red circle' (or 'red circle')."""
        return f'{self.size} {self.colour} {self.shape}' if size else f'{self.colour} {self.shape}'


@dataclasses.dataclass(frozen=True)
class Scene:
    canvas: int
    objects: tuple[Object, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable."""
        return {'canvas': self.canvas, 'objects': [dict(vars(o)) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'Scene':
        return cls(int(d['canvas']), tuple(Object(**o) for o in d['objects']))

    def replace(self, i: int, **changes) -> 'Scene':
        objs = list(self.objects)
        objs[i] = dataclasses.replace(objs[i], **changes)
        return Scene(self.canvas, tuple(objs))


# --- sampling -------------------------------------------------------------------------------------

def _free(cfg: ShapesConfig, r: int, others) -> np.ndarray:
    """bool [n, n] over candidate centres (y, x) = (lo + row, lo + col), lo = r + border: the
    centres where an object of radius r is inside the canvas and `margin` from every other box."""
    lo, hi = r + cfg.border, cfg.canvas - 1 - r - cfg.border
    ok = np.ones((hi - lo + 1,) * 2, bool)
    for o in others:
        # Too close means closer than `need` on both axes: a rectangle of centres.
        need = r + o.radius + 1 + cfg.margin
        rows = slice(max(o.y - need + 1 - lo, 0), max(o.y + need - lo, 0))
        ok[rows, max(o.x - need + 1 - lo, 0):max(o.x + need - lo, 0)] = False
    return ok


def _fits(cfg: ShapesConfig, r: int, others, x: int, y: int) -> bool:
    """Whether centre (x, y) is free for radius r (as in `_free`)."""
    lo, hi = r + cfg.border, cfg.canvas - 1 - r - cfg.border
    return lo <= x <= hi and lo <= y <= hi and all(
        max(abs(x - o.x), abs(y - o.y)) >= r + o.radius + 1 + cfg.margin for o in others)


def _place(cfg, rng, r, others):
    """A uniformly drawn free centre (x, y) for radius r, or None when there is none."""
    ok = _free(cfg, r, others)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    k = int(idx[rng.integers(idx.size)])
    lo = r + cfg.border
    return lo + k % ok.shape[1], lo + k // ok.shape[1]


def _subset(rng, k: int, n: int) -> np.ndarray:
    """n distinct indices below k, in random order (rng.choice(replace=False) is ~10x slower)."""
    return rng.random(k).argsort()[:n]


def sample_scene(cfg: ShapesConfig, rng: np.random.Generator, split: str = 'train') -> Scene:
    """A random scene. 'train' and 'validation' scenes hold no `cfg.held_out` pair; 'held_out'
    scenes hold at least one. (shape, colour) pairs are distinct within a scene, so
    'the red circle' always names one object."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if split == 'held_out' and not cfg.held_out:
        raise ValueError("ShapesConfig.held_out is empty, so there is no 'held_out' split")
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(100):
        if split == 'held_out':
            first = cfg.held_out[rng.integers(len(cfg.held_out))]
            rest = [p for p in cfg.all_pairs if p != first]
            pairs = [first] + [rest[k] for k in _subset(rng, len(rest), n - 1)]
        else:
            pairs = [cfg.train_pairs[k] for k in _subset(rng, len(cfg.train_pairs), n)]
        sizes = [cfg.sizes[k] for k in rng.integers(len(cfg.sizes), size=n)]
        # Large objects first: they need the most room.
        order = sorted(range(n), key=lambda i: -sizes[i][1])
        objs: list[Object] = []
        for i in order:
            at = _place(cfg, rng, sizes[i][1], objs)
            if at is None:
                break
            objs.append(Object(pairs[i][0], pairs[i][1], sizes[i][0], sizes[i][1], *at))
        if len(objs) == n:
            return Scene(cfg.canvas, tuple(objs[k] for k in rng.permutation(n)))
    raise RuntimeError(f'could not place {n} objects in 100 tries: enlarge ShapesConfig.canvas or shrink sizes')


# --- rendering ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def stamp(shape: str, r: int) -> np.ndarray:
    """bool [2r+1, 2r+1]: the pixels a `shape` of radius r covers in its box."""
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing='ij')
    if shape == 'circle':
        m = dx * dx + dy * dy <= (r + 0.5) ** 2
    elif shape == 'square':
        m = np.ones_like(dx, bool)
    elif shape == 'triangle':  # apex up, base on the bottom row
        m = np.abs(dx) <= (dy + r) / 2 + 0.5
    elif shape == 'diamond':
        m = np.abs(dx) + np.abs(dy) <= r
    elif shape == 'cross':
        m = (np.abs(dx) <= r / 3) | (np.abs(dy) <= r / 3)
    else:
        raise ValueError(f'unknown shape {shape!r}; known: {SHAPES}')
    m.flags.writeable = False
    return m


def render(scene: Scene) -> np.ndarray:
    """uint8 [S, S, 3]: the scene on a `BACKGROUND` canvas."""
    img = np.empty((scene.canvas, scene.canvas, 3), np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        img[y0:y1, x0:x1][stamp(o.shape, o.radius)] = PALETTE[o.colour]
    return img


def edge_map(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """uint8 [H, W, 3] white-on-black boundaries of an RGB image uint8 [H, W, 3].

    A pixel is an edge when some 4-neighbour differs from it by more than `threshold` (max over
    channels) and it is the brighter of the two, so an object on the dark background gets a
    one-pixel outline on its inside; replicated to 3 channels so the VQ tokenizer can encode it.
    """
    img = image.astype(np.int16)
    lum = img.sum(-1)
    edge = np.zeros(img.shape[:2], bool)
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode='edge')
    pad_lum = np.pad(lum, 1, mode='edge')
    h, w = lum.shape
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nb = pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        nb_lum = pad_lum[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        edge |= (np.abs(img - nb).max(-1) > threshold) & (lum >= nb_lum)
    return np.repeat((edge * np.uint8(255))[..., None], 3, axis=-1)


def boxes(scene: Scene) -> list[tuple[str, tuple[int, int, int, int]]]:
    """[('small red circle', (x0, y0, x1, y1)), ...] in scene order (spatial grounding)."""
    return [(o.describe(), o.box) for o in scene.objects]


# --- captions -------------------------------------------------------------------------------------

def article(phrase: str) -> str:
    return ('an ' if phrase[0] in 'aeiou' else 'a ') + phrase


def join(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


def relation(a: Object, b: Object) -> str:
    """How a lies relative to b, along the axis where their centres differ most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return 'left of' if dx < 0 else 'right of'
    return 'above' if dy < 0 else 'below'


def caption(scene: Scene, rng: np.random.Generator, size_prob: float = 0.5) -> str:
    """A short lowercase caption naming every object, from one of several templates:
    'a red circle', 'two shapes: a red circle and a small blue square',
    'there are a red circle and a blue triangle', 'a red circle left of a blue square'.
    Each object's size is named with probability `size_prob`. `shapes_judge.parse_caption`
    inverts every template."""
    n = len(scene.objects)
    objs = [scene.objects[k] for k in rng.permutation(n)]
    phrases = [article(o.describe(size=bool(rng.random() < size_prob))) for o in objs]
    templates = ['list', 'count', 'there'] + ['relation'] * 2 * (n >= 2)
    t = templates[rng.integers(len(templates))]
    if t == 'list':
        return join(phrases)
    if t == 'count':
        return f"{NUMBERS[n]} shape{'s' * (n > 1)}: {join(phrases)}"
    if t == 'there':
        return f"there {'are' if n > 1 else 'is'} {join(phrases)}"
    text = f'{phrases[0]} {relation(objs[0], objs[1])} {phrases[1]}'
    return text + (f', and {join(phrases[2:])}' if n > 2 else '')


# --- instruction-tuning tasks --------------------------------------------------------------------

_REF_ATTRS = (('shape',), ('colour',), ('size',), ('colour', 'shape'), ('size', 'shape'),
              ('size', 'colour'), ('size', 'colour', 'shape'))


def _refs(scene: Scene, i: int, without: str | None = None) -> list[str]:
    """Descriptions ('circle', 'red one', 'small red circle', ...) that pick out object i alone
    and do not use attribute `without`."""
    o = scene.objects[i]
    out = []
    for attrs in _REF_ATTRS:
        if without in attrs:
            continue
        key = lambda p: tuple(getattr(p, a) for a in attrs)  # noqa: E731
        if sum(key(p) == key(o) for p in scene.objects) == 1:
            words = [getattr(o, a) for a in ('size', 'colour', 'shape') if a in attrs]
            out.append(' '.join(words + ([] if 'shape' in attrs else ['one'])))
    return out


def _pick(rng, seq):
    return seq[rng.integers(len(seq))]


def edit(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig = DEFAULT) -> tuple[str, Scene]:
    """A random edit instruction and the scene after it: recolour ('make the circle green'),
    reshape ('turn the red circle into a square'), move ('move the square left'), resize,
    remove, or add. Edits keep scenes valid (no overlap, distinct pairs) and never create a
    `cfg.held_out` pair."""
    n = len(scene.objects)
    objs = scene.objects
    taken = {o.pair for o in objs}
    ok_pair = lambda p: p not in taken and p not in cfg.held_out  # noqa: E731
    options = []
    for i, o in enumerate(objs):
        others = objs[:i] + objs[i + 1:]
        for c in cfg.colours:
            if ok_pair((o.shape, c)):
                options.append(('recolour', i, c))
        for s in cfg.shapes:
            if ok_pair((s, o.colour)):
                options.append(('reshape', i, s))
        for name, r in cfg.sizes:
            if name != o.size and _fits(cfg, r, others, o.x, o.y):
                options.append(('resize', i, name))
        for d, (ux, uy) in DIRECTIONS.items():
            steps = [k for k in range(3, cfg.canvas // 3 + 1)
                     if _fits(cfg, o.radius, others, o.x + ux * k, o.y + uy * k)]
            if steps:
                options.append(('move', i, (d, steps)))
        if n > 1:
            options.append(('remove', i, None))
    new_pairs = [p for p in cfg.all_pairs if ok_pair(p)]
    new_sizes = [(name, r) for name, r in cfg.sizes if _free(cfg, r, objs).any()]
    if n < cfg.max_objects and new_pairs and new_sizes:
        options.append(('add', None, None))
    # Kinds first, then an option within it, so every kind is about equally likely.
    kinds = sorted({k for k, _, _ in options})
    kind = _pick(rng, kinds)
    _, i, arg = _pick(rng, [op for op in options if op[0] == kind])
    if kind == 'add':
        (shape, colour), (size, r) = _pick(rng, new_pairs), _pick(rng, new_sizes)
        new = Object(shape, colour, size, r, *_place(cfg, rng, r, objs))
        return f'add {article(new.describe())}', Scene(scene.canvas, objs + (new,))
    ref = 'the ' + _pick(rng, _refs(scene, i))
    if kind == 'recolour':
        verb = _pick(rng, ('make {} {}', 'colour {} {}', 'change {} to {}'))
        return verb.format(ref, arg), scene.replace(i, colour=arg)
    if kind == 'reshape':
        verb = _pick(rng, ('make {} a {}', 'turn {} into a {}'))
        return verb.format(ref, arg), scene.replace(i, shape=arg)
    if kind == 'resize':
        return f'make {ref} {arg}', scene.replace(i, size=arg, radius=cfg.radii[arg])
    if kind == 'move':
        d, steps = arg
        k = _pick(rng, steps)
        ux, uy = DIRECTIONS[d]
        return f'move {ref} {d}', scene.replace(i, x=objs[i].x + ux * k, y=objs[i].y + uy * k)
    verb = _pick(rng, ('remove {}', 'delete {}'))
    return verb.format(ref), Scene(scene.canvas, objs[:i] + objs[i + 1:])


def question(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig = DEFAULT) -> tuple[str, str]:
    """A random question about the scene and its one-word answer: 'how many shapes?' -> 'two',
    'what colour is the square?' -> 'red', 'what shape is the red one?' -> 'circle',
    'what size is the red circle?' -> 'small', 'is there a blue square?' -> 'yes'/'no',
    'is the circle left of the square?' -> 'yes'/'no'."""
    objs = scene.objects
    n = len(objs)
    kinds = ['count', 'colour', 'shape', 'exists'] + ['size'] * (len(cfg.sizes) > 1) + ['relation'] * (n > 1)
    kind = _pick(rng, kinds)
    if kind == 'count':
        return 'how many shapes?', NUMBERS[n]
    if kind == 'exists':
        absent = [p for p in cfg.all_pairs if p not in {o.pair for o in objs}]
        if absent and rng.random() < 0.5:
            (s, c), answer = _pick(rng, absent), 'no'
        else:
            (s, c), answer = _pick(rng, objs).pair, 'yes'
        return f'is there {article(c + " " + s)}?', answer
    if kind == 'relation':
        i, j = (int(k) for k in rng.choice(n, 2, replace=False))
        rel = relation(objs[i], objs[j])
        opposite = {'left of': 'right of', 'right of': 'left of', 'above': 'below', 'below': 'above'}
        asked, answer = (rel, 'yes') if rng.random() < 0.5 else (opposite[rel], 'no')
        return f'is the {_pick(rng, _refs(scene, i))} {asked} the {_pick(rng, _refs(scene, j))}?', answer
    # Attribute questions: an object with a description that does not give the answer away.
    candidates = [(i, refs) for i in range(n) if (refs := _refs(scene, i, without=kind))]
    if not candidates:
        return 'how many shapes?', NUMBERS[n]
    i, refs = _pick(rng, candidates)
    return f'what {kind} is the {_pick(rng, refs)}?', getattr(objs[i], kind)


# --- documents ------------------------------------------------------------------------------------

def scene_rng(seed: int, index: int, split: str) -> np.random.Generator:
    """The generator for scene `index` of `split`: independent streams per (seed, index, split)."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    return np.random.default_rng([seed, index, SPLITS.index(split)])


def scene_document(cfg: ShapesConfig, seed: int, index: int, split: str = 'train') -> Document:
    """Document([caption, image uint8 [S, S, 3]], meta={'scene': Scene.to_dict()}), a pure function
    of (cfg, seed, index, split). 'validation' draws from the training distribution."""
    rng = scene_rng(seed, index, split)
    scene = sample_scene(cfg, rng, split)
    text = caption(scene, rng, size_prob=cfg.size_in_caption)
    return Document(segments=[text, render(scene)], id=f'shapes/{split}/{seed}/{index}',
                    meta={'scene': scene.to_dict()})
