"""The retriever trainer: resuming on the (2, 2, 2) mesh matches an uninterrupted run, config
errors say what to change, recall and Shapes relevance are counted right, and `load_retriever`
reads converted HF weights with their tokenizer. The acceptance run (the tiny CLIP learning
held-out Shapes retrieval) is in test_retriever_learns.py."""

import json
import os

import jax
import numpy as np
import pytest

from cm3jax import parallel, trainers
from cm3jax.data.documents import Document
from cm3jax.data.worlds import shapes
from cm3jax.retrieval import clip, load, train
from configs import clip as clip_configs
from tests.helpers import hf_clip_dir


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def _mesh_config(steps):
    """The tiny preset shrunk (one layer per tower, fewer pairs) to compile quickly on (2, 2, 2)."""
    config = clip_configs.get_config('tiny')
    config.model.update(vision_layers=1, text_layers=1, vision_width=32, vision_mlp_dim=64, text_width=32,
                        text_mlp_dim=64, patch_size=8)
    config.tokenizer.train_documents = 300
    config.data.eval_size = 16
    config.data.twins = 0.25  # the resumed batches hold the same hard-negative twins
    config.mesh.ici = (2, 2, 2)
    config.train.update(steps=steps, batch=16, log_every=1, eval_every=2, checkpoint_every=2, progress=False)
    return config


def test_resuming_on_the_mesh_matches_an_uninterrupted_run(tmp_path):
    """Steps 0-2, saved, then 2-4 in a second call: the same losses, recall and params as 0-4 in
    one call (the data iterator resumes where it was, the tokenizer is the workdir's)."""
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    trainers.train(_mesh_config(4), str(straight))
    trainers.train(_mesh_config(2), str(resumed))
    assert sorted(p.name for p in (resumed / 'checkpoints').iterdir()) == ['2']
    trainers.train(_mesh_config(4), str(resumed))

    def by_step(workdir):
        return {(r['step'], k): v for r in _rows(workdir) for k, v in r.items()
                if k == 'loss' or k.startswith('eval/') or k.endswith('accuracy')}

    a, b = by_step(straight), by_step(resumed)
    assert {s for s, _ in a} == {0, 1, 2, 3, 4} and set(a) == set(b)
    assert (4, 'eval/validation/twin_t2i') in a and (4, 'eval/held_out/twin_i2t') in a  # Shapes sets: twins too
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=str(key))
    mesh = parallel.create_mesh((-1, 1, 1))
    pa, pb = load.load_retriever(straight, mesh=mesh).params, load.load_retriever(resumed, mesh=mesh).params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6), pa, pb)


def test_config_errors_say_what_to_change(tmp_path):
    config = _mesh_config(1)
    config.model.vocab_size = 100
    with pytest.raises(ValueError, match='model.vocab_size is set by the text tokenizer'):
        trainers.train(config, str(tmp_path / 'a'))
    config = _mesh_config(1)
    config.train.batch = 6
    with pytest.raises(ValueError, match=r'train.batch=6 must be a multiple of the 4 batch shards'):
        trainers.train(config, str(tmp_path / 'b'))
    config = _mesh_config(1)
    config.data.source.cfg.canvas = 48
    with pytest.raises(ValueError, match=r'model takes uint8 32x32; set model.image_size'):
        trainers.train(config, str(tmp_path / 'c'))


def test_shapes_relevance_is_what_the_caption_states():
    def scene(*objects):
        return shapes.Scene(32, tuple(shapes.Object(s, c, z, {'small': 3, 'large': 6}[z], x, y)
                                      for s, c, z, x, y in objects))
    scenes = [scene(('circle', 'red', 'small', 8, 8)),
              scene(('circle', 'red', 'large', 20, 20)),
              scene(('circle', 'red', 'small', 8, 8), ('square', 'blue', 'large', 22, 10)),
              scene(('circle', 'red', 'small', 24, 8), ('square', 'blue', 'large', 8, 20))]
    docs = [Document(['', shapes.render(s)], meta={'scene': s.to_dict()}) for s in scenes]
    captions = ['a red circle', 'one shape: a large red circle', 'a red circle left of a blue square',
                'there are a blue square and a small red circle']
    want = [[1, 1, 0, 0],   # no size stated: both single red circles
            [0, 1, 0, 0],
            [0, 0, 1, 0],   # the relation holds only in the third scene
            [0, 0, 1, 1]]
    np.testing.assert_array_equal(train.relevance(captions, docs, shapes.DEFAULT), np.asarray(want, bool))
    plain = train.relevance(['a', 'b', 'a'], docs[:3])
    np.testing.assert_array_equal(plain, [[1, 0, 1], [0, 1, 0], [1, 0, 1]])


def test_recall_counts_ties_against_the_query():
    emb = np.eye(4, dtype=np.float32)
    rel = np.eye(4, dtype=bool)
    assert float(train.recall(emb, emb, rel)['t2i_r1']) == 1.0
    collapsed = np.ones((4, 4), np.float32) / 2
    out = {k: float(v) for k, v in train.recall(collapsed, collapsed, rel).items()}
    assert out['t2i_r1'] == out['i2t_r1'] == 0.0 and out['t2i_r5'] == 1.0


def test_hf_clip_directory_loads_with_its_tokenizer(tmp_path):
    """A save_pretrained directory plus a tokenizer.json with OpenAI's end tokens: the
    retriever's embeddings are transformers' normalised features."""
    torch = pytest.importorskip('torch')
    model, vocab = hf_clip_dir(tmp_path, ['[UNK]', 'a', 'red', 'blue', 'circle', 'square', 'left', 'of'])

    r = load.load_retriever(tmp_path, batch_size=8)
    captions = ['a red circle', 'a blue square left of a red circle', 'circle']
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ids = [[98] + [vocab[w] for w in c.split()] + [99] for c in captions]
    with torch.no_grad():
        want_text = np.concatenate([model.get_text_features(input_ids=torch.tensor([i])).pooler_output.numpy() for i in ids])
        pixels = (images / 255.0 - np.asarray(clip.OPENAI_MEAN)) / np.asarray(clip.OPENAI_STD)
        want_image = model.get_image_features(
            pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2), dtype=torch.float32)).pooler_output.numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(r.embed_texts(captions), unit(want_text), atol=1e-4)
    np.testing.assert_allclose(r.embed_images(images), unit(want_image), atol=1e-4)
