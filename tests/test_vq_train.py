"""The tokenizer trainer: it learns to reconstruct held-out shapes, its GAN and restart paths
work on the mesh, and a checkpoint for another codebook is refused."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cm3jax.data.synthetic import ShapeImages
from cm3jax.train.checkpoint import CheckpointMismatch
from cm3jax.vq import train
from configs import vq as vq_configs


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_tiny_tokenizer_reaches_30db_on_held_out_shapes_using_most_codes(tmp_path, repo):
    """The acceptance run, through the command on one CPU device (about ten minutes on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    out = subprocess.run([sys.executable, '-m', 'cm3jax', 'train-tokenizer', '--config=configs/vq.py:tiny',
                          f'--workdir={tmp_path}', '--config.train.progress=False'],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    final = [r for r in _rows(tmp_path) if 'eval/psnr' in r][-1]
    assert final['eval/psnr'] >= 30.0, final
    assert final['eval/codes_used'] >= 0.9, final
    assert (tmp_path / 'images').is_dir() and list((tmp_path / 'images').glob('step_*.png'))


def _config(**train):
    config = vq_configs.get_config('tiny')
    config.mesh.ici = (2, 2, 2)
    config.train.update({'batch': 8, 'steps': 2, 'log_every': 1, 'eval_every': 0, 'image_every': 0, 'progress': False,
                         **train})
    return config


def _data(config, seed=0):
    return ShapeImages(config.train.batch, config.model.resolution, seed), lambda: iter(())


def test_gan_and_dead_code_restart_run_on_the_mesh(tmp_path):
    config = _config()
    config.loss.update(disc_weight=0.8, disc_start=0, adaptive_weight=True)
    config.quantizer.update(restart_every=1, restart_min_count=1e9)  # every code counts as dead
    train.train(config, str(tmp_path), *_data(config))
    rows = [r for r in _rows(tmp_path) if 'loss' in r]
    assert [r['step'] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite([r['loss'], r['d_loss'], r['g_loss'], r['d_weight']]).all()
        assert r['d_weight'] > 0 and r['codes/restarted'] == config.model.num_codes


def test_a_checkpoint_for_another_codebook_size_is_refused(tmp_path):
    config = _config(steps=1)
    config.quantizer.restart_every = 0
    train.train(config, str(tmp_path), *_data(config))
    config.model.num_codes = 64
    config.train.steps = 2
    with pytest.raises(CheckpointMismatch, match=r"'params/vq/quantize/embedding' has shape \(256, 16\) in the "
                                                 r"checkpoint but \(64, 16\)"):
        train.train(config, str(tmp_path), *_data(config))


def test_psnr_of_known_errors():
    x = jax.numpy.zeros((2, 4, 4, 3))
    y = x.at[1].set(0.2)  # error 0.1 on the [0, 1] scale
    np.testing.assert_allclose(train.psnr(x, y), [100.0, 20.0], rtol=1e-5)
