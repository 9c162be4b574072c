"""The tokenizer trainer: it learns to reconstruct held-out shapes, its GAN and restart paths
work on the mesh, and a checkpoint for another codebook is refused."""

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cm3jax import trainers
from cm3jax.data.sources import digits_source
from cm3jax.params import CheckpointMismatch
from cm3jax.vq import train
from configs import vq as vq_configs
from tests.helpers import one_device_env


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_tiny_tokenizer_reaches_30db_on_held_out_shapes_using_most_codes(tmp_path, repo):
    """The acceptance run, through the command on one CPU device, on held-out scenes of the real
    Shapes world (one object at 16 px; about three minutes on 2 cores, the timeout a hang guard)."""
    env = one_device_env()
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


def test_gan_and_dead_code_restart_run_on_the_mesh(tmp_path):
    config = _config()
    config.loss.update(disc_weight=0.8, disc_start=0, adaptive_weight=True)
    config.quantizer.update(restart_every=1, restart_min_count=1e9)  # every code counts as dead
    trainers.train(config, str(tmp_path))
    rows = [r for r in _rows(tmp_path) if 'loss' in r]
    assert [r['step'] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite([r['loss'], r['d_loss'], r['g_loss'], r['d_weight']]).all()
        assert r['d_weight'] > 0 and r['codes/restarted'] == config.model.num_codes


def test_a_checkpoint_for_another_codebook_size_is_refused(tmp_path):
    config = _config(steps=1)
    config.quantizer.restart_every = 0
    trainers.train(config, str(tmp_path))
    config.model.num_codes = 64
    config.train.steps = 2
    with pytest.raises(CheckpointMismatch, match=r"'params/vq/quantize/embedding' has shape \(256, 16\) in the "
                                                 r"checkpoint but \(64, 16\)"):
        trainers.train(config, str(tmp_path))


def test_psnr_of_known_errors():
    x = jax.numpy.zeros((2, 4, 4, 3))
    y = x.at[1].set(0.2)  # error 0.1 on the [0, 1] scale
    np.testing.assert_allclose(train.psnr(x, y), [100.0, 20.0], rtol=1e-5)



def test_ema_codebook_is_the_ema_of_the_batch_latents_and_is_checkpointed(tmp_path, capsys):
    """One step with quantizer.ema_decay on: the codebook is the EMA formula on the batch's latents
    and codes under the pre-step params (microbatches=2 the same as 1), the codebook gets no
    gradient, restarted codes start their averages afresh; then a run on the mesh checkpoints 'ema'."""
    import jax.numpy as jnp
    from cm3jax.train import optim
    from cm3jax.vq import model as vq

    config = _config()
    config.model.update(resolution=8, ch_mult=(1,), num_res_blocks=0)  # fewer layers: quicker to compile
    config.data.source = {'kind': 'digits', 'size': 8}  # images of the model's size
    cfg = train.vq_config(config)
    model, k, decay, eps = vq.VQGAN(cfg), cfg.num_codes, 0.9, 1e-5
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config(config.optim, 10))
    batch = {'images': jnp.asarray(np.stack([d.images[0] for d in itertools.islice(digits_source(size=cfg.resolution), 8)]))}
    x = batch['images'].astype(jnp.float32) / 127.5 - 1.0
    rng = np.random.default_rng(0)  # random params: compiling model.init takes longer than this test's steps
    params = {'vq': jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype),
                                 jax.eval_shape(model.init, jax.random.key(0), x[:1])['params'])}

    def compiled(fn, *args):  # LLVM's optimisations would double these compile times
        return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})

    encode = compiled(lambda p: model.apply({'params': p}, x, method=vq.VQGAN.encode_latents), params['vq'])
    latents = lambda p: encode(p).reshape(-1, cfg.embed_dim)
    ema = {'count': jnp.asarray(rng.uniform(0.5, 3.0, k), jnp.float32),
           'sum': jnp.asarray(rng.normal(size=(k, cfg.embed_dim)), jnp.float32)}
    dead = np.arange(k) < 5  # unused since the last restart; the other codes count as used a lot
    state = {'step': jnp.int32(0), 'params': params, 'opt': optimizer.init(params),
             'usage': jnp.asarray(np.where(dead, 0.0, 1e6), jnp.float32), 'ema': ema}

    # independently: the pre-step params' latents and codes, and the EMA formula in float64
    z = latents(params['vq'])
    codes = np.asarray(vq.nearest_codes(z, params['vq']['quantize']['embedding'])[0])
    z, onehot = np.asarray(z, np.float64), np.eye(k)[codes]
    count = decay * np.asarray(ema['count'], np.float64) + (1 - decay) * onehot.sum(0)
    total = decay * np.asarray(ema['sum'], np.float64) + (1 - decay) * onehot.T @ z
    n = count.sum()
    want = total / ((count + eps) / (n + k * eps) * n)[:, None]

    books = []
    for microbatches, restart_every in ((1, 1), (2, 0)):  # the first also restarts the dead codes
        step = train.make_step(model, None, config.loss, optimizer, microbatches, restart_every=restart_every,
                               restart_min_count=1e3, ema_decay=decay, ema_eps=eps)
        new, metrics = compiled(step, state, batch, jax.random.key(1))(state, batch, jax.random.key(1))
        book, new_ema = np.asarray(new['params']['vq']['quantize']['embedding']), jax.device_get(new['ema'])
        live = ~dead if restart_every else np.ones(k, bool)
        np.testing.assert_allclose(book[live], want[live], atol=1e-5)
        np.testing.assert_allclose(new_ema['count'][live], count[live], atol=1e-5)
        np.testing.assert_allclose(new_ema['sum'][live], total[live], atol=1e-5)
        assert 'code_sums' not in metrics
        if restart_every:  # the dead codes moved onto latents of the batch (new params), their EMA entries afresh
            assert int(metrics['codes/restarted']) == dead.sum()
            moved = np.asarray(latents(new['params']['vq']))
            assert np.abs(book[dead][:, None] - moved[None]).max(-1).min(-1).max() < 1e-5
            np.testing.assert_array_equal(new_ema['count'][dead], 1.0)
            np.testing.assert_array_equal(new_ema['sum'][dead], book[dead])
        # no gradient reached the codebook (Adam's moments for it are zero), while the encoder learned
        moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(new['opt'])
                   if 'embedding' in jax.tree_util.keystr(path)]
        assert moments and not any(np.asarray(m).any() for m in moments)
        assert (np.asarray(new['params']['vq']['encoder']['conv_in']['kernel']) !=
                np.asarray(params['vq']['encoder']['conv_in']['kernel'])).any()
        books.append(book)
    np.testing.assert_allclose(books[1][~dead], books[0][~dead], atol=1e-5)

    # the trainer on the mesh (restarting every step): finite losses, and resuming restores a
    # checkpoint that holds 'ema' (a target with 'ema' fails on one without it)
    config.quantizer.update(ema_decay=0.99, restart_every=1, restart_min_count=1.0)
    trainers.train(config, str(tmp_path))
    rows = [r for r in _rows(tmp_path) if 'loss' in r]
    assert [r['step'] for r in rows] == [1, 2] and np.isfinite([r['loss'] for r in rows]).all()
    capsys.readouterr()
    trainers.train(config, str(tmp_path))
    assert 'resumed from step 2' in capsys.readouterr().out
    config.quantizer.ema_decay = 1.0
    with pytest.raises(ValueError, match=r'quantizer.ema_decay=1.0 must be in \[0, 1\)'):
        trainers.train(config, str(tmp_path))
