"""The train loop end to end: it learns, it survives SIGTERM exactly, and it stops on NaN intact."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import params as params_lib, trainers
from cm3jax.train import checkpoint, loop, metrics as metrics_lib, optim, step as step_lib
from tests.helpers import one_device_env, tiny_config


def _metrics(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_tiny_model_learns_the_synthetic_task(tmp_path):
    config = tiny_config()
    config.mesh.ici = (2, 2, 2)
    config.train.update(steps=300, eval_every=300, progress=False)
    summary = trainers.train(config, str(tmp_path))
    rows = _metrics(tmp_path)
    first = next(r for r in rows if 'loss' in r)
    final_eval = [r for r in rows if 'eval/loss' in r][-1]
    entropy = summary['unigram_entropy']
    assert first['loss'] > entropy + 2           # starts near log(vocab)
    assert final_eval['eval/loss'] < entropy - 0.5, (final_eval, entropy)  # held-out batches
    assert final_eval['eval/answer/nll'] < entropy - 0.5
    assert summary['step'] == 300
    mfu = [r['perf/mfu'] for r in rows if 'perf/mfu' in r]
    assert len(mfu) >= 20 and all(0 < m < 1 for m in mfu)
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['100', '200', '300']

    # --init_from: a new run starts from these params (step 0, fresh optimizer), not from scratch
    config.train.update(steps=2, eval_every=0, log_every=1)
    tuned = trainers.train(config, str(tmp_path / 'tuned'), init_from=str(tmp_path))
    first_tuned = next(r for r in _metrics(tmp_path / 'tuned') if 'loss' in r)
    assert tuned['step'] == 2 and first_tuned['step'] == 1
    assert first_tuned['loss'] < entropy - 0.5


def test_muon_learns_and_resumes_exactly_on_the_2x2x2_mesh(tmp_path):
    """optim.name=muon through the harness: its partitioned state is sharded like the params,
    checkpointed and restored; a run stopped at step 40 and resumed ends where one unbroken
    run does."""
    config = tiny_config()
    config.mesh.ici = (2, 2, 2)
    config.optim.name = 'muon'
    config.train.update(steps=80, eval_every=80, checkpoint_every=40, log_every=10, progress=False)
    summary = trainers.train(config, str(tmp_path / 'whole'))
    rows = _metrics(tmp_path / 'whole')
    entropy = summary['unigram_entropy']
    assert rows[0]['loss'] > entropy + 2 and summary['eval/loss'] < entropy, (rows[0]['loss'], summary, entropy)
    config.train.steps = 40
    trainers.train(config, str(tmp_path / 'parts'))
    config.train.steps = 80
    trainers.train(config, str(tmp_path / 'parts'))
    step, whole = _final_params(tmp_path / 'whole')
    assert step == 80 and _final_params(tmp_path / 'parts')[0] == 80
    jax.tree.map(np.testing.assert_array_equal, whole, _final_params(tmp_path / 'parts')[1])


def _train_command(workdir, steps):
    return [sys.executable, '-m', 'cm3jax', 'train', f'--workdir={workdir}', '--config.mesh.ici=(1,1,1)',
            f'--config.train.steps={steps}', '--config.train.log_every=1', '--config.train.eval_every=0',
            '--config.train.checkpoint_every=1000', '--config.train.progress=False']


def _final_params(workdir):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
    step = ckpt.latest_step()
    metadata = ckpt._manager.item_metadata(step)['state']
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), metadata['params'])
    params = params_lib.restore(workdir, target)
    ckpt.close()
    return step, jax.device_get(params)


def test_sigterm_saves_and_the_resumed_run_is_bit_identical(tmp_path, repo):
    steps = 80  # enough that SIGTERM, sent after the 5th logged step, lands well before the end
    env = one_device_env()  # one device, like a user's laptop
    reference = subprocess.run(_train_command(tmp_path / 'ref', steps), cwd=repo, env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    workdir = tmp_path / 'preempted'
    proc = subprocess.Popen(_train_command(workdir, steps), cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / 'metrics.jsonl').exists() and len(_metrics(workdir)) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = checkpoint.Checkpointer(workdir / 'checkpoints').latest_step()
    assert 5 <= stopped_at < steps, f'SIGTERM should stop the run early, stopped at {stopped_at}'
    assert 'SIGTERM: saved step' in err

    resumed = subprocess.run(_train_command(workdir, steps), cwd=repo, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed from step {stopped_at}' in resumed.stdout
    ref_step, ref_params = _final_params(tmp_path / 'ref')
    got_step, got_params = _final_params(workdir)
    assert ref_step == got_step == steps
    jax.tree.map(np.testing.assert_array_equal, got_params, ref_params)
    # the logged losses after the restart continue the uninterrupted run's exactly
    ref_loss = {r['step']: r['loss'] for r in _metrics(tmp_path / 'ref')}
    for r in _metrics(workdir):
        if r['step'] > stopped_at and 'loss' in r:
            assert r['loss'] == ref_loss[r['step']]


class _Batches:
    """Regression batches; the batch of step ``bad_step`` holds a NaN."""

    def __init__(self, bad_step):
        self.index, self.bad_step = 0, bad_step

    def __next__(self):
        self.index += 1
        x = np.random.default_rng(self.index).normal(size=(8, 3)).astype(np.float32)
        if self.index == self.bad_step:
            x[0, 0] = np.nan
        return {'x': x, 'y': x @ np.array([[1.0], [-2.0], [0.5]], np.float32)}

    def get_state(self):
        return {'index': self.index}

    def set_state(self, state):
        self.index = state['index']


def _regression():
    opt = optim.make_optimizer(optim.OptimConfig(learning_rate=0.05, decay_steps=100))
    params = {'w': jnp.zeros((3, 1))}
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': opt.init(params)}

    def loss_fn(params, batch, rng):
        err = ((batch['x'] @ params['w'] - batch['y']) ** 2).sum()
        return err, {'loss': (err, jnp.float32(batch['x'].shape[0]))}

    return opt, state, loss_fn


def test_hooks_write_metrics_evals_and_a_profile(tmp_path):
    opt, state, loss_fn = _regression()
    writer = metrics_lib.MetricWriter(tmp_path)
    eval_step = jax.jit(step_lib.make_eval_step(loss_fn))
    hooks = [loop.metrics_hook(writer, 5, tokens_per_step=8, flops_per_step=100.0, peak_flops=1e9),
             loop.eval_hook(eval_step, lambda: (next(_Batches(bad_step=0)) for _ in range(2)), writer, 10),
             loop.profile_hook(str(tmp_path / 'profile'), 3, 2)]
    state, last = loop.train(state=state, train_step=jax.jit(step_lib.make_train_step(loss_fn, opt)),
                             data=_Batches(bad_step=0), num_steps=23, rng=jax.random.key(0), hooks=hooks,
                             progress=False)
    writer.close()
    assert int(state['step']) == 23 and float(last['loss']) < 2.0
    rows = _metrics(tmp_path)
    train_rows = [r for r in rows if 'loss' in r]
    assert [r['step'] for r in train_rows] == [5, 10, 15, 20, 23]  # and after the last step
    assert all(r['perf/tokens_per_s'] == pytest.approx(8 * r['perf/steps_per_s']) for r in train_rows[1:])
    assert all(0 < r['perf/mfu'] for r in train_rows[1:]) and 'perf/mfu' not in train_rows[0]
    assert train_rows[-1]['loss'] < train_rows[0]['loss'] / 2
    assert [r['step'] for r in rows if 'eval/loss' in r] == [10, 20, 23]
    assert list((tmp_path / 'profile').rglob('*.xplane.pb'))
    assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))


def test_a_nan_batch_stops_the_run_and_the_last_checkpoint_stays_intact(tmp_path):
    opt, state, loss_fn = _regression()
    kept = {}
    hook = loop.Hook(lambda info: kept.update({info.step: jax.device_get(info.state['params'])}), every=1)
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=4)
    with pytest.raises(step_lib.NonFiniteError, match=r'step 10: the loss and the grads became NaN/inf'):
        loop.train(state=state, train_step=jax.jit(step_lib.make_train_step(loss_fn, opt), donate_argnums=0),
                   data=_Batches(bad_step=10), num_steps=20, rng=jax.random.key(0), hooks=[hook], checkpointer=ckpt,
                   progress=False)
    assert max(kept) == 9  # hooks never saw the bad step
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.latest_step() == 8
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, data_state = ckpt.restore(abstract)
    np.testing.assert_array_equal(restored['params']['w'], kept[8]['w'])
    assert np.isfinite(restored['params']['w']).all() and data_state == {'index': 8}


def test_two_processes_train_like_one(tmp_path, repo):
    """`cm3jax.launch`: 2 local processes x 4 CPU devices (gloo) match 1 process x 8 devices."""
    common = ['--config.train.steps=3', '--config.train.log_every=1', '--config.train.eval_every=0',
              '--config.train.progress=False']
    env = one_device_env()
    multi = subprocess.run([sys.executable, '-m', 'cm3jax.launch', '--processes=2', '--devices_per_process=4', '--',
                            sys.executable, '-m', 'cm3jax', 'train', f'--workdir={tmp_path / "multi"}',
                            '--config.mesh.dcn=(2,1,1)', '--config.mesh.ici=(1,2,2)', *common],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stdout[-4000:]
    assert '[1] ' in multi.stdout and '2 process(es)' in multi.stdout

    config = tiny_config()
    config.mesh.ici = (2, 2, 2)
    config.train.update(steps=3, log_every=1, eval_every=0, progress=False)
    trainers.train(config, str(tmp_path / 'single'))
    single = [r['loss'] for r in _metrics(tmp_path / 'single') if 'loss' in r]
    got = [r['loss'] for r in _metrics(tmp_path / 'multi') if 'loss' in r]
    assert len(single) == len(got) == 3 and single[0] > single[2]
    np.testing.assert_allclose(got, single, rtol=1e-5)


def test_train_rejects_a_batch_the_mesh_cannot_split(tmp_path):
    config = tiny_config()
    config.mesh.ici = (2, 2, 2)
    config.train.update(batch=12, microbatches=2)
    with pytest.raises(ValueError, match=r'train.batch=12 must be a multiple of the 4 batch shards x '
                                         r'train.microbatches=2 \(= 8\)'):
        trainers.train(config, str(tmp_path))
    config.train.microbatches = 0
    with pytest.raises(ValueError, match=r'train.microbatches=0 must be >= 1'):
        trainers.train(config, str(tmp_path))


def test_launcher_stops_the_others_when_one_process_fails():
    from cm3jax import launch
    script = ('import os, sys, time\n'
              'if os.environ["JAX_PROCESS_ID"] == "1": sys.exit(3)\n'
              'time.sleep(120)')
    begin = time.time()
    assert launch.launch([sys.executable, '-c', script], processes=2) == 3
    assert time.time() - begin < 60
