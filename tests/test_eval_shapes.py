"""The Shapes suite: ground-truth images score >= 0.99 exact in every category, shuffled
captions near chance, each category has an example that fails it, and the tokenizer metrics
read a round trip right."""

import dataclasses
import re

import numpy as np
import pytest

from cm3jax.data.worlds import shapes as world, shapes_judge
from cm3jax.eval import fid, shapes
from cm3jax.vq import model as vq
from tests.helpers import random_vq_params

CFG = world.ShapesConfig(canvas=32, min_objects=1, max_objects=3)


@pytest.fixture(scope='module')
def todo():
    return shapes.items(CFG, 40, seed=0)


def test_ground_truth_scores_exact_and_shuffled_captions_near_chance(todo):
    assert {it.category for it in todo} == set(shapes.CATEGORIES)
    assert {it.split for it in todo} == {'validation', 'held_out'}
    assert all(any(o.pair in CFG.held_out for o in it.scene.objects) for it in todo if it.split == 'held_out')
    truth = shapes.ground_truth(todo)
    report = shapes.score(todo, truth, CFG)
    for split in ('seen_pairs', 'held_out_pairs'):
        assert report[split]['exact']['value'] >= 0.99, report[split]
        for name, r in report[split]['categories'].items():
            assert r['value'] >= 0.99 and r['n'] == 40, (split, name, r)
        assert all(r['value'] >= 0.99 for r in report[split]['attributes'].values())
    shuffled = truth[np.random.default_rng(0).permutation(len(truth))]
    chance = shapes.score(todo, shuffled, CFG)['seen_pairs']
    assert chance['exact']['value'] < 0.1, chance
    assert chance['attributes']['colour']['value'] < 0.4  # 6 colours


def _scene(*objects):
    return world.Scene(32, tuple(world.Object(s, c, z, dict(CFG.sizes)[z], x, y) for s, c, z, x, y in objects))


RED_CIRCLE = ('circle', 'red', 'large', 8, 8)
BLUE_SQUARE = ('square', 'blue', 'large', 24, 24)
FAILURES = {  # category: (caption, the scene drawn instead)
    'single_object': ('a red circle', _scene(('square', 'red', 'large', 8, 8))),
    'two_objects': ('a red circle and a blue square', _scene(RED_CIRCLE)),
    'counting': ('two shapes: a red circle and a blue square',
                 _scene(RED_CIRCLE, BLUE_SQUARE, ('triangle', 'green', 'small', 24, 6))),
    'colours': ('a red circle', _scene(('circle', 'green', 'large', 8, 8))),
    'position': ('a red circle right of a blue square', _scene(RED_CIRCLE, BLUE_SQUARE)),
    'colour_binding': ('a red circle and a blue square',
                       _scene(('circle', 'blue', 'large', 8, 8), ('square', 'red', 'large', 24, 24))),
}


@pytest.mark.parametrize('category', shapes.CATEGORIES)
def test_each_category_has_an_example_that_fails_it(category):
    caption, drawn = FAILURES[category]
    truth = shapes.Item(category, caption, drawn, 'validation')
    assert shapes.passes(truth, world.render(drawn), CFG)['pass'] == 0.0
    # and the same caption passes on a scene that fits it
    fitting = {'single_object': _scene(RED_CIRCLE), 'colours': _scene(RED_CIRCLE),
               'position': _scene(('circle', 'red', 'large', 24, 24), ('square', 'blue', 'large', 8, 8))}.get(
        category, _scene(RED_CIRCLE, BLUE_SQUARE))
    assert shapes.passes(dataclasses.replace(truth, scene=fitting), world.render(fitting), CFG)['pass'] == 1.0


def test_colour_binding_needs_the_colour_on_its_own_shape():
    caption, swapped = FAILURES['colour_binding']
    item = shapes.Item('colour_binding', caption, swapped, 'validation')
    dets = shapes.shapes_judge.parse(world.render(swapped), CFG)
    assert {d.colour for d in dets} == {'red', 'blue'} and {d.shape for d in dets} == {'circle', 'square'}
    assert shapes.passes(item, world.render(swapped), CFG)['pass'] == 0.0  # only the binding is wrong


def test_a_world_of_one_object_leaves_the_others_out():
    cats = {it.category for it in shapes.items(dataclasses.replace(CFG, max_objects=1), 3)}
    assert cats == {'single_object', 'colours'}


def test_tokenizer_metrics():
    small = world.ShapesConfig(canvas=16, max_objects=1)
    cfg = vq.VQConfig(resolution=16, ch=32, ch_mult=(1, 2), z_channels=8, embed_dim=4, num_codes=16)
    params = random_vq_params(cfg, 16)
    todo = shapes.items(small, 4)
    images = shapes.ground_truth(todo)
    ext = fid.callable_extractor(lambda x: x.reshape(len(x), -1, 3).mean(1), 'mean-colour')
    m = shapes.tokenizer_metrics(params, cfg, images, [it.caption for it in todo], small, ext)
    assert m['psnr_db']['n'] == len(images) == 16 and 0 < m['psnr_db']['value'] < 30  # random weights
    assert 0 < m['code_usage'] <= 1 and 1 <= m['code_perplexity'] <= 16 and m['num_codes'] == 16
    assert m['judge_roundtrip']['value'] < 0.5  # a random tokenizer destroys the scenes
    assert m['rfid']['value'] > 0 and m['rfid']['protocol']['extractor'] == 'mean-colour'


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] += 1  # mse 1
    b[1, 0, 0, 0] = 255  # mse 255^2 / 48
    np.testing.assert_allclose(shapes.psnr(a, b), [20 * np.log10(255.0), 10 * np.log10(48.0)])
    assert shapes.psnr(a[:1], a[:1])[0] == np.inf


def test_the_binding_probe_swaps_only_the_two_shape_words():
    images, captions, swapped = shapes.binding_probe(CFG, 60, seed=3)
    assert images.shape == (60, 32, 32, 3) and len(captions) == len(swapped) == 60
    for image, text, other in zip(images, captions, swapped):
        assert other != text and sorted(re.findall(r'\w+', other)) == sorted(re.findall(r'\w+', text))  # two words moved
        judged = shapes_judge.score(image, text, CFG), shapes_judge.score(image, other, CFG)
        assert judged[0]['exact'] == 1.0 and judged[1]['exact'] == 0.0, (text, other)
        for pair in CFG.held_out:
            assert ' '.join(pair[::-1]) not in other  # no swap names a pair training never shows
    again = shapes.binding_probe(CFG, 60, seed=3)
    assert again[1] == captions and np.array_equal(again[0], images)
    one = dataclasses.replace(CFG, min_objects=1, max_objects=1)
    assert len(shapes.binding_probe(one, 5)[1]) == 0  # no two objects: nothing to bind
    assert shapes.preference([2.0, 1.0, 3.0, 0.0], [1.0, 1.0, 2.0, 1.0])['value'] == 0.5  # ties fail
