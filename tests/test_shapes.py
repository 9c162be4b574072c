"""The Shapes world: scenes, captions, edits, questions, the judge, documents and the TFDS builder."""

import dataclasses
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import ndimage

from cm3jax.data.worlds import shapes as S
from cm3jax.data.worlds import shapes_judge as J

CFG = S.DEFAULT


@pytest.fixture(scope='module')
def docs():
    return [S.scene_document(CFG, 11, i) for i in range(1000)]


def scenes(n, split='train', seed=0, cfg=CFG):
    return [S.sample_scene(cfg, np.random.default_rng([seed, i]), split) for i in range(n)]


def assert_valid(scene, cfg=CFG):
    """Inside the canvas with the border, `margin` apart, distinct (shape, colour) pairs."""
    objs = scene.objects
    assert cfg.min_objects <= len(objs) <= cfg.max_objects
    assert len({o.pair for o in objs}) == len(objs)
    for o in objs:
        x0, y0, x1, y1 = o.box
        assert x0 >= cfg.border and y0 >= cfg.border
        assert x1 <= cfg.canvas - cfg.border and y1 <= cfg.canvas - cfg.border
        assert o.radius == cfg.radii[o.size]
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = objs[a].box, objs[b].box
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= cfg.margin, (objs[a], objs[b])


def resolve(ref, objs):
    """The one object (or detection) a description like 'small red one' or 'circle' names."""
    words = ref.split()
    hits = [o for o in objs if all(w == 'one' or w in (o.size, o.colour, o.shape) for w in words)]
    assert len(hits) == 1, (ref, objs)
    return hits[0]


# --- scenes ---------------------------------------------------------------------------------------

def test_documents_are_deterministic_from_seed_and_index():
    a, b = S.scene_document(CFG, 3, 17, 'train'), S.scene_document(CFG, 3, 17, 'train')
    assert a.segments[0] == b.segments[0] and np.array_equal(a.segments[1], b.segments[1])
    assert a.meta == b.meta and a.id == b.id
    assert a.segments[1].dtype == np.uint8 and a.segments[1].shape == (32, 32, 3)
    others = [S.scene_document(CFG, 3, 18, 'train'), S.scene_document(CFG, 4, 17, 'train'),
              S.scene_document(CFG, 3, 17, 'validation')]
    assert all(o.meta != a.meta for o in others)
    scene = S.Scene.from_dict(a.meta['scene'])
    assert np.array_equal(S.render(scene), a.segments[1])
    for f in (S.caption, S.edit, S.question):
        assert f(scene, np.random.default_rng(5)) == f(scene, np.random.default_rng(5))


def test_scene_dict_round_trips_through_json():
    for scene in scenes(50):
        assert S.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_held_out_pairs_only_in_held_out_split():
    held = set(CFG.held_out)
    for split in ('train', 'validation'):
        assert all(not held & {o.pair for o in s.objects} for s in scenes(300, split))
    held_scenes = scenes(300, 'held_out')
    assert all(held & {o.pair for o in s.objects} for s in held_scenes)
    assert {o.pair for s in held_scenes for o in s.objects} >= held


def test_scenes_do_not_overlap_and_cover_the_config():
    all_scenes = scenes(500) + scenes(100, 'held_out')
    for scene in all_scenes:
        assert_valid(scene)
        # Every object's pixels are all its own: nothing painted over it.
        img = S.render(scene)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            painted = (img[y0:y1, x0:x1] == S.PALETTE[o.colour]).all(-1)
            assert np.array_equal(painted, S.stamp(o.shape, o.radius))
    objs = [o for s in all_scenes for o in s.objects]
    assert {o.shape for o in objs} == set(CFG.shapes) and {o.colour for o in objs} == set(CFG.colours)
    assert {o.size for o in objs} == set(CFG.radii)
    assert {len(s.objects) for s in all_scenes} == {1, 2, 3}


def test_render_is_fast():
    batch = scenes(500)
    best = min(_timed(lambda: [S.render(s) for s in batch]) for _ in range(3))
    # ~10k scenes/s on one idle core; the bound leaves room for a loaded CI machine.
    assert 500 / best > 1000


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def test_bad_config_names_the_field():
    for kwargs, field in [(dict(canvas=4), 'canvas'), (dict(canvas=16), 'canvas'), (dict(colours=('red', 'pink')), 'colours'),
                          (dict(shapes=('circle', 'hexagon')), 'shapes'),
                          (dict(min_objects=3, max_objects=2), 'min_objects'),
                          (dict(sizes=(('small', 3), ('huge', 20))), 'sizes'),
                          (dict(held_out=(('hexagon', 'red'),)), 'held_out'),
                          (dict(shapes=('circle',), colours=('red', 'blue'), held_out=(('circle', 'red'),)),
                           'held_out')]:
        with pytest.raises(ValueError, match=f'ShapesConfig.{field}'):
            S.ShapesConfig(**kwargs)
    with pytest.raises(ValueError, match='held_out'):
        S.sample_scene(S.ShapesConfig(held_out=()), np.random.default_rng(0), 'held_out')
    with pytest.raises(ValueError, match='split'):
        S.sample_scene(CFG, np.random.default_rng(0), 'test')
    # Lists (as a config file gives them) become tuples, so the config stays hashable.
    cfg = S.ShapesConfig(colours=['red', 'blue'], held_out=[['circle', 'red']])
    assert hash(cfg) and cfg.held_out == (('circle', 'red'),)


# --- captions and the judge ---------------------------------------------------------------------

def test_captions_use_every_template_and_parse_back(docs):
    kinds = set()
    for d in docs:
        text, scene = d.segments[0], S.Scene.from_dict(d.meta['scene'])
        assert text == text.lower() and len(text.split()) <= 25
        spec = J.parse_caption(text)
        stated = sorted((o.shape, o.colour) for o in spec.objects)
        assert stated == sorted(o.pair for o in scene.objects)
        kinds.add('count' if spec.count else 'relation' if spec.relation else
                  'there' if text.startswith('there') else 'list')
    assert kinds == {'count', 'relation', 'there', 'list'}
    spec = J.parse_caption('two shapes: a red circle and a small blue square')
    assert spec == J.CaptionSpec((J.ObjectSpec('circle', 'red', None), J.ObjectSpec('square', 'blue', 'small')),
                                 None, 2)
    spec = J.parse_caption('a red circle left of a blue square, and a large green triangle')
    assert spec.relation == (0, 'left of', 1) and spec.objects[2] == J.ObjectSpec('triangle', 'green', 'large')
    with pytest.raises(ValueError):
        J.parse_caption('a dog on a sofa')
    assert J.score(docs[0].segments[1], 'a dog on a sofa')['exact'] == 0.0


def test_judge_reads_ground_truth(docs):
    scores = [J.score(d.segments[1], d.segments[0]) for d in docs]
    mean = J.mean_scores(scores)
    assert mean['exact'] >= 0.99, mean
    d = docs[0]
    dets = J.parse(d.segments[1])
    assert sorted((x.shape, x.colour, x.size, x.x, x.y) for x in dets) == \
        sorted((o['shape'], o['colour'], o['size'], o['x'], o['y']) for o in d.meta['scene']['objects'])


def test_judge_is_near_chance_on_other_scenes_captions(docs):
    n = len(docs)
    scores = [J.score(docs[i].segments[1], docs[(i + 1) % n].segments[0]) for i in range(n)]
    mean = J.mean_scores(scores)
    assert mean['exact'] < 0.1 and mean['attr'] < 0.3, mean


def test_judge_survives_blur_and_noise(docs):
    """A stand-in for a VQ round-trip: soft edges and colour noise."""
    rng = np.random.default_rng(0)
    scores = []
    for d in docs[:200]:
        img = ndimage.gaussian_filter(d.segments[1].astype(float), (0.8, 0.8, 0)) + rng.normal(0, 15, (32, 32, 3))
        scores.append(J.score(np.clip(img, 0, 255).astype(np.uint8), d.segments[0]))
    assert J.mean_scores(scores)['exact'] >= 0.95


def test_relations_and_missing_objects_are_caught():
    a = S.Object('circle', 'red', 'small', 3, 6, 16)
    b = S.Object('square', 'blue', 'large', 6, 22, 16)
    img = S.render(S.Scene(32, (a, b)))
    assert J.score(img, 'a red circle left of a blue square')['exact'] == 1.0
    wrong = J.score(img, 'a red circle right of a blue square')
    assert wrong['exact'] == 0.0 and wrong['relation'] == 0.0 and wrong['attr'] == 1.0
    assert J.score(img, 'a small red circle and a small blue square')['attr'] == 0.5
    assert J.score(img, 'three shapes: a red circle, a blue square and a red square')['exact'] == 0.0
    assert J.score(img, 'a red circle')['exact'] == 0.0  # the blue square is not in the caption
    assert J.score(img, 'a red circle', strict=False)['exact'] == 1.0



def test_failures_name_what_is_wrong_and_tell_a_borrowed_shape_from_a_wrong_one():
    a = S.Object('circle', 'red', 'small', 3, 6, 16)
    b = S.Object('square', 'blue', 'large', 6, 22, 16)
    img = S.render(S.Scene(32, (a, b)))
    none = dict.fromkeys(('count', 'object', 'borrowed_shape', 'relation'), False)
    assert J.failures(img, 'a red circle left of a blue square') == none
    # the caption's colours and shapes, bound the other way round; or one shape on both colours
    assert J.failures(img, 'a red square and a blue circle') == {**none, 'object': True, 'borrowed_shape': True}
    two_circles = S.render(S.Scene(32, (a, dataclasses.replace(b, shape='circle'))))
    assert J.failures(two_circles, 'a red circle and a large blue square') == {**none, 'object': True,
                                                                             'borrowed_shape': True}
    assert J.failures(img, 'a red square above a blue circle') == {**none, 'object': True, 'borrowed_shape': True,
                                                                   'relation': True}
    # a wrong size, or a shape no stated object has, is not borrowed
    assert J.failures(img, 'a blue square right of a large red circle') == {**none, 'object': True}
    assert J.failures(img, 'a red circle and a blue triangle') == {**none, 'object': True}
    assert J.failures(img, 'three shapes: a red circle, a blue square and a red square') == {
        **none, 'count': True, 'object': True}
    assert J.failures(img, 'a red circle') == {**none, 'count': True}
    with pytest.raises(ValueError):
        J.failures(img, 'a circle of red')


# --- instruction-tuning tasks --------------------------------------------------------------------

def test_edits_do_what_they_say():
    kinds = set()
    for i, scene in enumerate(scenes(300, seed=1)):
        text, new = S.edit(scene, np.random.default_rng(i))
        assert_valid(new)
        assert not set(CFG.held_out) & {o.pair for o in new.objects}
        dets = J.parse(S.render(new))
        assert sorted((d.shape, d.colour, d.size, d.x, d.y) for d in dets) == \
            sorted((o.shape, o.colour, o.size, o.x, o.y) for o in new.objects)
        if m := re.fullmatch(r'(?:make|turn) the (.+?) (?:a|into a) (\w+)', text):
            kind, old = 'shape', resolve(m[1], scene.objects)
            after = resolve(f'{old.colour} {m[2]}', dets)
            assert (after.x, after.y) == (old.x, old.y) and m[2] != old.shape
        elif m := re.fullmatch(r'(?:make|colour|change) the (.+?) (?:to )?(\w+)', text):
            ref, value = m[1], m[2]
            old = resolve(ref, scene.objects)
            kind = next(k for k, names in (('colour', CFG.colours), ('size', CFG.radii)) if value in names)
            after = resolve(f'{value} {old.shape}' if kind == 'colour' else f'{value} {old.colour} {old.shape}', dets)
            assert (after.x, after.y) == (old.x, old.y)
        elif m := re.fullmatch(r'move the (.+?) (left|right|up|down)', text):
            kind, old = 'move', resolve(m[1], scene.objects)
            after = resolve(f'{old.colour} {old.shape}', dets)
            dx, dy = S.DIRECTIONS[m[2]]
            moved = (after.x - old.x, after.y - old.y)
            assert moved[0] * dx + moved[1] * dy >= 3 and moved[0] * dy == moved[1] * dx == 0
        elif m := re.fullmatch(r'(?:remove|delete) the (.+)', text):
            kind, old = 'remove', resolve(m[1], scene.objects)
            assert len(dets) == len(scene.objects) - 1 and old.pair not in {(d.shape, d.colour) for d in dets}
        elif m := re.fullmatch(r'add an? (\w+) (\w+) (\w+)', text):
            kind = 'add'
            assert len(dets) == len(scene.objects) + 1
            resolve(' '.join(m.groups()), dets)
        else:
            pytest.fail(f'unexpected instruction {text!r}')
        kinds.add(kind)
    assert kinds == {'colour', 'size', 'shape', 'move', 'remove', 'add'}


def test_answers_agree_with_the_judge():
    kinds = set()
    for i, scene in enumerate(scenes(300, seed=2)):
        q, a = S.question(scene, np.random.default_rng(i))
        dets = J.parse(S.render(scene))
        if q == 'how many shapes?':
            kind, expected = 'count', S.NUMBERS[len(dets)]
        elif m := re.fullmatch(r'what (colour|shape|size) is the (.+)\?', q):
            kind, expected = m[1], getattr(resolve(m[2], dets), m[1])
        elif m := re.fullmatch(r'is there an? (\w+) (\w+)\?', q):
            kind = 'exists'
            expected = 'yes' if (m[2], m[1]) in {(d.shape, d.colour) for d in dets} else 'no'
        elif m := re.fullmatch(r'is the (.+?) (left of|right of|above|below) the (.+)\?', q):
            kind = 'relation'
            expected = 'yes' if S.relation(resolve(m[1], dets), resolve(m[3], dets)) == m[2] else 'no'
        else:
            pytest.fail(f'unexpected question {q!r}')
        assert a == expected, (q, a, scene)
        kinds.add(kind)
    assert kinds == {'count', 'colour', 'shape', 'size', 'exists', 'relation'}


def test_boxes_and_edge_map():
    scene = scenes(1, seed=3)[0]
    img = S.render(scene)
    for (label, box), o in zip(S.boxes(scene), scene.objects):
        assert label == f'{o.size} {o.colour} {o.shape}' and box == o.box
    edges = S.edge_map(img)
    assert edges.dtype == np.uint8 and edges.shape == img.shape and set(np.unique(edges)) <= {0, 255}
    on = edges[..., 0] > 0
    foreground = img.any(-1)
    assert not (on & ~foreground).any()  # outlines lie on the objects' inner boundary
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        inner = ndimage.binary_erosion(S.stamp(o.shape, o.radius))
        assert np.array_equal(on[y0:y1, x0:x1], S.stamp(o.shape, o.radius) & ~inner)


# --- the TFDS builder ----------------------------------------------------------------------------

def test_world_imports_without_tfds():
    code = ('import sys, cm3jax.data.worlds.shapes, cm3jax.data.worlds.shapes_judge; '
            'assert "tensorflow_datasets" not in sys.modules')
    subprocess.run([sys.executable, '-c', code], check=True)


def test_tfds_builder_writes_and_reads_back(tmp_path):
    tfds = pytest.importorskip('tensorflow_datasets')
    from cm3jax.data.worlds import shapes_tfds

    sizes = {'train': 12, 'validation': 3, 'held_out': 4}
    shapes_tfds.Cm3jaxShapes(data_dir=str(tmp_path), split_sizes=sizes, seed=5).download_and_prepare()
    for split, n in sizes.items():
        src = tfds.data_source('cm3jax_shapes', data_dir=str(tmp_path), split=split)
        assert len(src) == n
        for i in (0, n - 1):
            rec = src[i]
            doc = S.scene_document(CFG, 5, i, split)
            scene = S.Scene.from_dict(json.loads(rec['scene']))
            assert rec['image'].dtype == np.uint8 and rec['image'].shape == (32, 32, 3)
            assert np.array_equal(rec['image'], S.render(scene))
            assert np.array_equal(rec['image'], doc.segments[1])
            assert rec['caption'].decode() == doc.segments[0]
            if split == 'held_out':
                assert set(CFG.held_out) & {o.pair for o in scene.objects}
