"""The instruction judges of `cm3jax.eval.instructions` on rendered Shapes scenes: an edit counts
when it does what the instruction says and nothing else, and where the instruction leaves the
place open (adding, moving) any place that follows it counts."""

import numpy as np
import pytest

from cm3jax.data.worlds import shapes
from cm3jax.eval import instructions as judge

CFG = shapes.DEFAULT


def _obj(shape, colour, size, x, y):
    return shapes.Object(shape, colour, size, CFG.radii[size], x, y)


def _scene(*objects):
    return shapes.Scene(CFG.canvas, tuple(objects))


@pytest.mark.parametrize('seed', range(40))
def test_the_target_of_every_generated_edit_succeeds_and_the_unedited_scene_fails(seed):
    rng = np.random.default_rng(seed)
    before = shapes.sample_scene(CFG, rng, 'validation')
    instruction, after = shapes.edit(before, rng, CFG)
    assert judge.edit_success(shapes.render(after), before, after, CFG), instruction
    assert not judge.edit_success(shapes.render(before), before, after, CFG), instruction


def test_an_added_object_may_stand_anywhere_but_must_be_the_one_asked_for():
    square = _obj('square', 'blue', 'large', 8, 8)
    before = _scene(square)
    after = _scene(square, _obj('circle', 'red', 'small', 24, 24))  # 'add a small red circle'
    elsewhere = _scene(square, _obj('circle', 'red', 'small', 24, 8))
    assert judge.edit_success(shapes.render(elsewhere), before, after, CFG)
    wrong = _scene(square, _obj('circle', 'green', 'small', 24, 8))
    assert not judge.edit_success(shapes.render(wrong), before, after, CFG)
    moved_the_rest = _scene(_obj('square', 'blue', 'large', 8, 20), _obj('circle', 'red', 'small', 24, 8))
    assert not judge.edit_success(shapes.render(moved_the_rest), before, after, CFG)


def test_a_moved_object_may_go_any_distance_in_the_direction_asked():
    circle = _obj('circle', 'red', 'small', 24, 24)
    before = _scene(_obj('square', 'blue', 'small', 10, 16), circle)
    after = _scene(_obj('square', 'blue', 'small', 14, 16), circle)  # 'move the square right'
    for x, y, ok in ((14, 16, True), (20, 16, True), (11, 16, False), (6, 16, False), (20, 12, False)):
        seen = _scene(_obj('square', 'blue', 'small', x, y), circle)
        assert judge.edit_success(shapes.render(seen), before, after, CFG) == ok, (x, y)
    # a recolour keeps its place: the same colour change elsewhere does not count
    recoloured = _scene(_obj('square', 'green', 'small', 10, 16), circle)
    away = _scene(_obj('square', 'green', 'small', 16, 16), circle)
    assert judge.edit_success(shapes.render(recoloured), before, recoloured, CFG)
    assert not judge.edit_success(shapes.render(away), before, recoloured, CFG)


def test_boxes_and_answers():
    scene = _scene(_obj('square', 'blue', 'large', 8, 8), _obj('circle', 'red', 'small', 24, 24))
    assert judge.box_hits(shapes.render(scene), scene, CFG) == [True, True]
    shifted = _scene(_obj('square', 'blue', 'large', 20, 8), _obj('circle', 'red', 'small', 24, 24))
    assert judge.box_hits(shapes.render(shifted), scene, CFG) == [False, True]
    assert judge.vqa_correct('Two.', 'two') and not judge.vqa_correct('three', 'two')
