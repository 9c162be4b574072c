"""Shapes documents -> `cm3jax prepare` (a tiny random VQ tokenizer's workdir, a BPE trained on
the captions) -> the grain pipeline -> 50 train steps of the tiny LM on the mesh: the loss falls."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cm3jax import trainers
from cm3jax.data import pipeline, prepare
from cm3jax.errors import ConfigError
from cm3jax.vocab import Vocab
from cm3jax.vq import load
from configs import data as data_configs
from tests.helpers import random_tokenizer_workdir, tiny_config


def test_shapes_prepare_pipeline_and_fifty_train_steps(tmp_path):
    params, cfg = random_tokenizer_workdir(tmp_path / 'vq')
    loaded, loaded_cfg = load.load_tokenizer(tmp_path / 'vq')
    assert loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))

    config = data_configs.get_config('shapes')
    config.source.count = 300
    config.out, config.vq_workdir = str(tmp_path / 'data'), str(tmp_path / 'vq')
    config.text_tokenizer.update(vocab_size=300, train_documents=300)
    config.prepare.update(shard_size=100, progress=False)
    manifest = prepare.run(config)
    vocab = Vocab.from_dict(manifest['vocab'])
    assert manifest['documents'] == 300 and len(manifest['shards']) == 3
    assert manifest['image_tokens'] == 300 * 8 * 8  # 32x32 -> 8x8 codes
    assert vocab.num_image_codes == 64 and (tmp_path / 'data' / 'tokenizer.json').exists()

    # One example reads back as caption <break> image or image <break> caption, through CM3
    p = pipeline.Pipeline(tmp_path / 'data', vocab, pipeline.PipelineConfig(seq_len=96, batch=8, shuffle=False))
    batch = next(p)
    assert batch['inputs'].shape == (8, 96) and (batch['segment_ids'] > 0).mean() > 0.8
    assert vocab.is_image(batch['targets']).sum() > 0 and vocab.is_text(batch['targets']).sum() > 0

    lm = tiny_config()
    lm.mesh.ici = (2, 2, 2)
    lm.model.vocab_size = vocab.size
    lm.data.update(dir=str(tmp_path / 'data'))
    lm.train.update(steps=50, eval_every=50, log_every=5, seq_len=96, batch=8, checkpoint_every=50, progress=False)
    lm.optim.update(warmup_steps=10)
    summary = trainers.train(lm, str(tmp_path / 'lm'))
    rows = [json.loads(line) for line in (tmp_path / 'lm' / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert summary['step'] == 50
    assert losses[-1] < losses[0] - 1.0, losses            # from ~log(V) down
    assert 'text/nll' in summary and 'image/nll' in summary
    evals = [r for r in rows if 'eval/loss' in r]
    assert evals and evals[-1]['eval/loss'] < losses[0] - 1.0
    # The pipeline's position is checkpointed with the model (resume continues the stream)
    saved = ''.join(f.read_text() for f in (tmp_path / 'lm' / 'checkpoints' / '50' / 'data').rglob('*')
                    if f.is_file() and f.suffix != '.zarray')
    assert '"position"' in saved

    # `cm3jax sample` finds the tokenizers through the run's data manifest and draws a grid
    done = subprocess.run([sys.executable, '-m', 'cm3jax', 'sample', f'--workdir={tmp_path / "lm"}',
                           '--prompt=a red circle', '--prompt=a blue square above a green triangle', '--num=3',
                           '--cfg=2', '--mode=mixed'], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    grid = np.asarray(Image.open(tmp_path / 'lm' / 'samples' / 'samples.png'))
    assert grid.shape == (2 * 32, 3 * 32, 3)
    record = json.loads((tmp_path / 'lm' / 'samples' / 'samples.json').read_text())
    assert np.array(record['codes']).shape == (2, 3, 8, 8) and record['sample']['mode'] == 'mixed'

    # Image places must name this data's image codes, and cover every code of an image
    codes = (vocab.image_offset, vocab.image_offset + vocab.num_image_codes)
    for places, ids, message in ((64, (codes[0] + 1, codes[1]), 'are not the image codes'),
                                 (16, codes, 'fewer than the 64 codes')):
        bad = tiny_config(image_positions=places, image_ids=ids)
        bad.model.vocab_size = vocab.size
        bad.data.update(dir=str(tmp_path / 'data'))
        with pytest.raises(ConfigError, match=message):
            trainers.train(bad, str(tmp_path / f'bad_{places}'))
