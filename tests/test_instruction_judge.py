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
    # the verdict's parts: the target is right in every part; the unedited scene kept the objects
    # the edit leaves alone, and did not make the change
    alone = any(o in before.objects for o in after.objects)  # False when the only object is edited
    assert judge.edit_verdict(shapes.render(after), before, after, CFG) == {
        'success': True, 'count': True, 'kept': True if alone else None, 'edited': True}
    unedited = judge.edit_verdict(shapes.render(before), before, after, CFG)
    assert unedited['kept'] is (True if alone else None), (instruction, unedited)
    assert not unedited['edited'] and not unedited['success'], (instruction, unedited)
    kind = judge.edit_kind(before, after)
    verb = instruction.split()[0]
    assert kind in {'add': {'add'}, 'move': {'move'}, 'remove': {'remove'}, 'delete': {'remove'}, 'turn': {'reshape'},
                    'colour': {'recolour'}, 'change': {'recolour'},
                    'make': {'recolour', 'reshape', 'resize'}}[verb], (instruction, kind)


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


def test_the_verdict_says_which_part_of_an_edit_went_wrong():
    circle, square = _obj('circle', 'red', 'small', 24, 24), _obj('square', 'blue', 'small', 8, 8)
    before = _scene(square, circle)
    after = _scene(_obj('square', 'green', 'small', 8, 8), circle)  # 'make the square green'
    assert judge.edit_kind(before, after) == 'recolour'
    # recoloured right, but the circle moved away: the change is made, the rest not kept
    drifted = _scene(after.objects[0], _obj('circle', 'red', 'small', 24, 16))
    assert judge.edit_verdict(shapes.render(drifted), before, after, CFG) == {
        'success': False, 'count': True, 'kept': False, 'edited': True}
    # the circle kept, the square gone: one object short, nothing changed
    assert judge.edit_verdict(shapes.render(_scene(circle)), before, after, CFG) == {
        'success': False, 'count': False, 'kept': True, 'edited': False}
    # a removal is made when the removed object is no longer in its place
    removed = _scene(circle)
    assert judge.edit_kind(before, removed) == 'remove'
    assert judge.edit_verdict(shapes.render(removed), before, removed, CFG)['success']
    assert not judge.edit_verdict(shapes.render(before), before, removed, CFG)['edited']
    with pytest.raises(ValueError, match='no edit'):
        judge.edit_kind(before, before)


def test_boxes_and_answers():
    scene = _scene(_obj('square', 'blue', 'large', 8, 8), _obj('circle', 'red', 'small', 24, 24))
    assert judge.box_hits(shapes.render(scene), scene, CFG) == [True, True]
    shifted = _scene(_obj('square', 'blue', 'large', 20, 8), _obj('circle', 'red', 'small', 24, 24))
    assert judge.box_hits(shapes.render(shifted), scene, CFG) == [False, True]
    assert judge.vqa_correct('Two.', 'two') and not judge.vqa_correct('three', 'two')
