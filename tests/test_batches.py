"""Training batches straight from a document source (`cm3jax.data.batches`): the world's own
scenes in order, exact resumption with and without a shuffle buffer, corrupt records skipped and
counted across epochs, and images of the wrong size refused with the option that fixes them."""

import json

import numpy as np
import pytest
from PIL import Image

from cm3jax.data import batches
from cm3jax.data.sources import Skip, folder_source, make_source
from cm3jax.data.worlds import shapes, shapes_judge

WORLD = {'canvas': 16, 'min_objects': 1, 'max_objects': 1}


def _world(seed=3):
    source = make_source({'kind': 'shapes', 'split': 'train', 'seed': seed, 'cfg': WORLD})
    return batches.SourceBatches(source, 4, batches.first_image(16, 'data.source', 'model.resolution'))


def test_world_batches_are_the_worlds_scenes_and_resume():
    data = _world()
    first, second = next(data), next(data)
    assert first['images'].shape == (4, 16, 16, 3) and first['images'].dtype == np.uint8
    assert not np.array_equal(first['images'], second['images'])
    cfg = shapes.ShapesConfig(**WORLD)
    want = [shapes.render(shapes.sample_scene(cfg, shapes.scene_rng(3, i, 'train'), 'train')) for i in range(4)]
    np.testing.assert_array_equal(first['images'], np.stack(want))  # batch 0 is scenes 0..3 of the seed
    again = _world()
    again.set_state(json.loads(json.dumps(_after_one())))  # the state is JSON, as checkpoints keep it
    np.testing.assert_array_equal(next(again)['images'], second['images'])
    assert all(len(shapes_judge.parse(im, cfg)) == 1 for im in first['images'])  # one object each


def _after_one():
    data = _world()
    next(data)
    return data.get_state()


def _folder(tmp_path, n=6, odd=(), truncated=()):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        size = 24 if i in odd else 16
        name = f'{i}.png' if i % 2 else f'{i}.jpg'
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(tmp_path / name)
        if i in truncated:
            data = (tmp_path / name).read_bytes()
            (tmp_path / name).write_bytes(data[:len(data) // 3])
        lines.append(json.dumps({'image': name, 'caption': f'picture {i}'}))
    (tmp_path / 'captions.jsonl').write_text('\n'.join(lines) + '\n')


class _Counting:
    """A source wrapper that counts how many records' loaders run (decodes)."""

    def __init__(self, source):
        self.source, self.loads = source, 0
        inner = source._records

        def records():
            for ordinal, load in inner():
                yield ordinal, self._counted(load)
        source._records = records

    def _counted(self, load):
        def run():
            self.loads += 1
            return load()
        return run


def test_epochs_skip_and_count_corrupt_records_and_resume_without_decoding(tmp_path):
    _folder(tmp_path, n=6, truncated=(2,))
    source = folder_source(tmp_path)
    data = batches.SourceBatches(source, 2, batches.first_image(16, 'data.source', 'model.resolution'))
    seen = [next(data)['images'] for _ in range(5)]  # 5 usable images a pass: batches wrap into epoch 2
    assert 'skipped 1: 1 undecodable image (2.jpg)' in data.report() and data.report().startswith('epoch 2')
    np.testing.assert_array_equal(seen[2][1], seen[0][0])  # image 0 again after the 5 usable ones (0,1,3,4,5)
    state = data.get_state()

    counting = _Counting(folder_source(tmp_path))
    resumed = batches.SourceBatches(counting.source, 2, batches.first_image(16, 'data.source', 'model.resolution'))
    resumed.set_state(state)
    assert counting.loads == 0  # records before the position are passed over, not decoded
    want = [next(data)['images'] for _ in range(3)]
    for w in want:
        np.testing.assert_array_equal(next(resumed)['images'], w)


def test_a_shuffle_buffer_resumes_exactly():
    def make():
        source = make_source({'kind': 'digits', 'split': 'test', 'seed': None, 'size': 8})
        return batches.SourceBatches(source, 8, batches.first_image(8, 'data.source', 'model.resolution'),
                                     shuffle_buffer=32, seed=1)
    data = make()
    for _ in range(3):
        next(data)
    state = data.get_state()
    want = [next(data)['images'] for _ in range(4)]
    again = make()
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)['images'], w)
    plain = make_source({'kind': 'digits', 'split': 'test', 'seed': None, 'size': 8})
    in_order = np.stack([d.images[0] for d, _ in zip(plain, range(8))])
    assert not np.array_equal(make().__next__()['images'], in_order)  # the buffer mixed them


def test_an_image_of_another_size_is_refused_naming_the_fix(tmp_path):
    _folder(tmp_path, n=3, odd=(1,))
    data = batches.SourceBatches(folder_source(tmp_path), 3, batches.first_image(16, 'data.source', 'model.resolution'))
    with pytest.raises(ValueError, match=r"data.source: document '1.png' has a uint8 image of shape \(24, 24, 3\) but "
                                         r"the model takes uint8 16x16; set model.resolution or the source's size "
                                         r"\(data.source.resize"):
        next(data)
    resized = batches.SourceBatches(folder_source(tmp_path, resize=16), 3,
                                    batches.first_image(16, 'data.source', 'model.resolution'))
    assert next(resized)['images'].shape == (3, 16, 16, 3)


def test_examples_can_skip_documents_and_a_source_with_none_usable_stops():
    def no_caption(doc):
        raise Skip('document without a caption', str(doc.id))
    source = make_source({'kind': 'shapes', 'count': 3, 'cfg': WORLD})
    data = batches.SourceBatches(source, 2, no_caption)
    with pytest.raises(ValueError, match='yielded no usable document in a whole pass'):
        next(data)
    assert source.stats.reasons == {'document without a caption': 3}
    with pytest.raises(ValueError, match='holds 0 usable documents, fewer than the 2 needed'):
        batches.take(make_source({'kind': 'shapes', 'count': 3, 'cfg': WORLD}), 2, no_caption, 'data.eval')
