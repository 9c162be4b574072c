"""Hard-negative twins (cm3jax.data.worlds.twins) and the retriever's use of them: a twin is a
valid scene that differs from its original in something a caption states, both ways, as the
judge reads the rendered images; the retriever's batches append them, and its eval counts how
often a pair beats its twin."""

import collections
import re

import numpy as np
import pytest

from cm3jax.data.sources import make_source
from cm3jax.data.worlds import shapes, shapes_judge, twins
from cm3jax.errors import ConfigError
from cm3jax.retrieval import load, train
from cm3jax.text_tokenizer import train_bpe
from configs import clip as clip_configs

WORLD = shapes.ShapesConfig(canvas=32, min_objects=1, max_objects=3)


@pytest.mark.parametrize('split', ['train', 'held_out'])
def test_twins_differ_in_what_a_caption_states(split):
    kinds = collections.Counter()
    for i in range(150):
        doc = shapes.scene_document(WORLD, 0, i, split)
        scene = shapes.Scene.from_dict(doc.meta['scene'])
        other, text = twins.twin(scene, doc.texts[0], np.random.default_rng(i), WORLD)
        image = shapes.render(other)
        assert shapes_judge.score(image, text, WORLD)['exact'] == 1.0, text
        assert shapes_judge.score(image, doc.texts[0], WORLD)['exact'] == 0.0, (doc.texts[0], text)
        assert shapes_judge.score(doc.images[0], text, WORLD)['exact'] == 0.0, (doc.texts[0], text)
        objs = other.objects
        assert all(shapes._fits(WORLD, o.radius, objs[:k] + objs[k + 1:], o.x, o.y) for k, o in enumerate(objs))
        assert len({o.pair for o in objs}) == len(objs)
        new = {o.pair for o in objs} - {o.pair for o in scene.objects}
        assert not new & set(WORLD.held_out), 'a twin never brings in a held-out pair'
        before = collections.Counter((o.shape, o.colour, o.size) for o in scene.objects)
        after = collections.Counter((o.shape, o.colour, o.size) for o in objs)
        kinds['same objects, other places' if before == after else 'other objects'] += 1
    assert kinds['same objects, other places'] > 0 and kinds['other objects'] > 0, kinds


def test_a_twin_is_a_pure_function_of_its_generator():
    doc = shapes.scene_document(WORLD, 0, 3)
    a = twins.twin_example(doc, np.random.default_rng(7), WORLD)
    b = twins.twin_example(doc, np.random.default_rng(7), WORLD)
    assert a[1] == b[1] and np.array_equal(a[0], b[0])


def _config(fraction):
    config = clip_configs.get_config('tiny')
    config.data.twins = fraction
    return config


def test_retriever_batches_append_the_twins_of_their_first_rows():
    source = make_source(_config(0.25).data.source)
    rows = 16
    twin_rows = train.twin_rows(_config(0.25), source, rows)
    assert twin_rows == 4
    docs = [d for _, d in zip(range(40), make_source(_config(0.25).data.source))]
    layout = load.text_layout(train_bpe([d.texts[0] for d in docs], 300), 24)
    example = train.pair_example(32, 'data.source')
    batch = train.pair_collate(layout, twin_rows, source.cfg, seed=0)([example(d) for d in docs[:rows - twin_rows]])
    assert batch['images'].shape == (rows, 32, 32, 3) and batch['ids'].shape[0] == rows
    for k in range(twin_rows):  # row 12 + k is the twin of row k, drawn from (seed, document id)
        image, text = twins.twin_example(docs[k], train.twin_rng(0, docs[k]), source.cfg)
        np.testing.assert_array_equal(batch['images'][rows - twin_rows + k], image)
        ids, _, _ = layout.encode([text])
        np.testing.assert_array_equal(batch['ids'][rows - twin_rows + k], ids[0])
    assert train.twin_rows(_config(0.0), source, rows) == 0


def test_twin_config_errors_say_what_to_change():
    source = make_source(_config(0.25).data.source)
    with pytest.raises(ConfigError, match=r'data.twins=0.7: .* must be in \[0, 0.5\]'):
        train.twin_rows(_config(0.7), source, 16)
    digits = make_source({'kind': 'digits'})
    with pytest.raises(ConfigError, match='data.twins=0.25 needs a Shapes source .* set data.twins=0'):
        train.twin_rows(_config(0.25), digits, 16)


def test_twin_accuracy_counts_pairs_that_beat_their_twin():
    text = np.eye(3, dtype=np.float32)
    image = np.eye(3, dtype=np.float32)
    twin_image = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 1]], np.float32)  # ties with rows 1 and 2: misses
    twin_text = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], np.float32)
    out = {k: float(v) for k, v in train.twin_accuracy(text, image, twin_text, twin_image).items()}
    assert out == {'twin_t2i': pytest.approx(1 / 3), 'twin_i2t': 1.0}


def test_binding_negatives_bind_the_same_words_the_other_way():
    found = 0
    for i in range(300):
        doc = shapes.scene_document(WORLD, 0, i)
        scene = shapes.Scene.from_dict(doc.meta['scene'])
        negative = twins.binding_negative(scene, doc.texts[0], np.random.default_rng(i), WORLD)
        if len(scene.objects) == 1:
            assert negative is None
        if negative is None:
            continue
        found += 1
        words = lambda t: sorted(re.findall(r'\w+', t))  # noqa: E731
        assert words(negative) == words(doc.texts[0]) and negative != doc.texts[0]
        assert not shapes_judge.describes(shapes_judge.parse_caption(negative, WORLD), scene.objects), negative
        spec = shapes_judge.parse_caption(negative, WORLD)
        assert not {(o.shape, o.colour) for o in spec.objects} & set(WORLD.held_out), negative
    assert found > 50


def test_retriever_batches_carry_binding_negatives_for_their_drawn_rows():
    config = _config(0.25)
    source = make_source(config.data.source)
    docs = [d for _, d in zip(range(40), make_source(config.data.source))]
    layout = load.text_layout(train_bpe([d.texts[0] for d in docs], 300), 24)
    example = train.pair_example(32, 'data.source')
    batch = train.pair_collate(layout, 4, source.cfg, seed=0, negatives=True)([example(d) for d in docs[:12]])
    assert batch['negative_ids'].shape == batch['ids'].shape == (16, 24) and batch['negative_valid'].shape == (16,)
    assert not batch['negative_valid'][12:].any()  # twins have none
    for k, doc in enumerate(docs[:12]):
        text = twins.binding_negative(shapes.Scene.from_dict(doc.meta['scene']), doc.texts[0],
                                      train.twin_rng(1, doc), source.cfg)
        assert batch['negative_valid'][k] == (text is not None)
        if text is not None:
            np.testing.assert_array_equal(batch['negative_ids'][k], layout.encode([text])[0][0])
    assert batch['negative_valid'].any()


def test_a_binding_negative_is_one_more_text_its_image_must_beat():
    from cm3jax.retrieval import clip
    rs = np.random.RandomState(0)
    text, image = (np.array(clip.l2_normalize(rs.randn(4, 8).astype(np.float32))) for _ in range(2))
    scale = np.log(10.0)
    plain, _ = clip.contrastive_loss_from_embeddings(text, image, scale)
    none, metrics = clip.contrastive_loss_from_embeddings(text, image, scale, text[::-1], np.zeros(4, bool))
    np.testing.assert_allclose(none, plain, rtol=1e-6)  # rows without a negative change nothing
    assert metrics['negative_accuracy'] == 0.0
    # each image's negative is its own image: it outscores the caption, and the loss grows
    worse, metrics = clip.contrastive_loss_from_embeddings(text, image, scale, image, np.ones(4, bool))
    assert worse > plain and metrics['negative_accuracy'] == 0.0
    # a negative that is the opposite of the image is beaten, and costs almost nothing
    easy, metrics = clip.contrastive_loss_from_embeddings(text, image, scale, -image, np.ones(4, bool))
    assert plain < easy < plain + 0.05 and metrics['negative_accuracy'] == 1.0


def test_binding_negatives_need_a_shapes_source():
    config = _config(0.0)
    config.data.binding_negatives = True
    config.data.source = {'kind': 'digits'}
    env = type('Env', (), {'config': config, 'model': type('M', (), {'cfg': None, 'layout': None})()})()
    with pytest.raises(ConfigError, match='data.binding_negatives needs a Shapes source'):
        train.train_data(env)
