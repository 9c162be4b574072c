"""The main job, `cm3jax quickstart`, at toy size through the command: every stage runs, every
output file and report field is there, the LM learned, the judge finds more right than chance,
a rerun reuses every stage, and a run killed during LM training and run again ends with the
same report as the uninterrupted one."""

import json
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from cm3jax import quickstart
from cm3jax.errors import ConfigError
from cm3jax.eval.stats import rate
from cm3jax.sample import load
from cm3jax.vq import model as vq
from configs import quickstart as qs_configs
from tests.helpers import one_device_env

ONE_DEVICE = one_device_env()
AFTER_LM = ('lm', 'text_to_image', 'captions', 'judge')
TIMING = ('stages', 'wall_seconds', 'this_run_seconds')


def _command(out):
    return [sys.executable, '-m', 'cm3jax', 'quickstart', '--config=configs/quickstart.py:tiny', f'--config.out={out}']


def _run(repo, out):
    done = subprocess.run(_command(out), cwd=repo, env=ONE_DEVICE, capture_output=True, text=True,
                          timeout=1800)  # a hang guard: the tiny run needs a few minutes
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _report(out):
    report = json.loads((out / 'report.json').read_text())
    return {k: v for k, v in report.items() if k not in TIMING}


def _losses(workdir):
    return [r['loss'] for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines()) if 'loss' in r]


def test_the_quickstart_runs_every_stage_resumes_and_survives_a_kill(tmp_path, repo):
    out = tmp_path / 'qs'
    first = _run(repo, out)

    # ---- every output, every report field ----
    for name in ('samples.png', 'captions.md', 'report.md', 'report.json', 'stages.json', 'config.json'):
        assert (out / name).exists(), name
    for stage in ('vq', 'retriever', 'lm'):  # TensorBoard logs of every trained stage, and of the report
        assert list((out / stage / 'tensorboard').glob('events.out.tfevents.*')), stage
    assert list((out / 'tensorboard').glob('events.out.tfevents.*'))
    report = json.loads((out / 'report.json').read_text())
    t = report['text_to_image']
    for key in ('exact', 'exact_reranked', 'exact_reranked_lm', 'held_out_pairs', 'attr'):
        assert set(t[key]) == {'value', 'se', 'n'} and 0 <= t[key]['value'] <= 1, key
    assert set(t['by_objects']) == {'1'} and t['exact']['n'] == 16 and t['num'] == 8  # the tiny world: 1 object
    assert 'two_objects_wrong' not in t  # no scene of two objects to diagnose
    assert 0 <= report['image_to_text']['exact']['value'] <= 1
    assert 0 <= report['tokenizer']['judge_roundtrip']['value'] <= 1
    assert set(report['stages']) == set(quickstart.STAGES) and report['wall_seconds'] > 0
    assert 'samples.png' in first.stdout and str(out) in first.stdout  # it says where its outputs are
    # the LM re-ranks the codes it drew (kept beside their pictures), not the pictures encoded again
    drawn = np.load(out / 'text_to_image.npz')
    gen, mesh, rules = load.load_generator(out / 'lm')
    codes = drawn['main/codes']
    decoded = vq.decode(gen.vq_params, codes.reshape(-1, *codes.shape[2:]), gen.vq_cfg)
    np.testing.assert_array_equal(np.asarray(decoded).reshape(drawn['main/images'].shape), drawn['main/images'])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        rescored = quickstart.lm_scores(gen, codes, drawn['main/captions'])
    np.testing.assert_allclose(drawn['main/lm_scores'], rescored, rtol=1e-5)

    # ---- it learned: the LM's loss fell, the judge finds attributes above chance ----
    losses = _losses(out / 'lm')
    assert losses[-1] < losses[0] - 1.0, losses
    # A random one-object picture gets colour and shape right with chance 1/18 (6 colours, 3 shapes);
    # the written captions name both, for an image the model was shown.
    assert report['image_to_text']['attr']['value'] > 3 / 18, report['image_to_text']
    assert t['attr']['value'] > 1 / 18, t

    # ---- caption dropout trains the unconditional stream that guidance subtracts ----
    lm_report = report['lm']
    assert abs(lm_report['image_nll_unconditional'] - lm_report['image_nll_conditional']) < 0.5, lm_report

    # ---- a rerun reuses every stage ----
    want = _report(out)
    again = _run(repo, out)
    for stage in quickstart.STAGES:
        assert f'{stage}: done already' in again.stdout + again.stderr, stage
    assert _report(out) == want

    # ---- killed during LM training, run again: the same report ----
    stages = json.loads((out / 'stages.json').read_text())
    (out / 'stages.json').write_text(json.dumps({k: v for k, v in stages.items() if k not in AFTER_LM}))
    shutil.rmtree(out / 'lm')
    for name in ('text_to_image.npz', 'captions.json', 'report.json'):
        (out / name).unlink()
    lm = qs_configs.get_config('tiny').lm.train
    proc = subprocess.Popen(_command(out), cwd=repo, env=ONE_DEVICE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first_save = out / 'lm' / 'checkpoints' / str(lm.checkpoint_every)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not first_save.is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert 'lm' not in json.loads((out / 'stages.json').read_text()), 'the kill came after LM training'
    steps = sorted(int(p.name) for p in (out / 'lm' / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps and steps[-1] < lm.steps, steps  # stopped midway, with a checkpoint to resume from
    _run(repo, out)
    got = _report(out)
    assert got == want, json.dumps({'want': want, 'got': got}, indent=1)[:4000]


def test_the_quickstart_refuses_other_configs(repo):
    done = subprocess.run([sys.executable, '-m', 'cm3jax', 'quickstart', '--config=configs/lm.py:tiny'], cwd=repo,
                          env=ONE_DEVICE, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and 'needs a quickstart config, e.g. --config=configs/quickstart.py' in done.stderr


@pytest.mark.parametrize('fields,message', [({'canvas': 4}, 'ShapesConfig.canvas'),
                                            ({'max_objects': 9, 'canvas': 16}, 'cannot hold max_objects=9')])
def test_a_bad_world_is_refused_before_any_stage(tmp_path, fields, message):
    config = qs_configs.get_config('tiny')
    config.out = str(tmp_path / 'qs')
    config.world.update(fields)
    with pytest.raises(ValueError, match=message):
        quickstart.run(config)
    assert not (tmp_path / 'qs' / 'stages.json').exists()


def test_a_changed_setting_of_a_finished_stage_is_refused(tmp_path):
    config = qs_configs.get_config('tiny')
    out = tmp_path / 'qs'
    config.out = str(out)
    out.mkdir()
    stages = quickstart.Stages(out, config)
    for name in quickstart.STAGES[:6]:  # through the LM
        stages.run(name, dict)
    (out / 'config.json').write_text('as it was')

    changed = config.copy_and_resolve_references()
    changed.lm.optim.learning_rate = 0.01
    with pytest.raises(ConfigError, match=r"stage 'lm' done with other settings \(lm\.optim\.learning_rate: "
                                          r"0\.003 there, 0\.01 now\); run into a new directory"):
        quickstart.run(changed)
    assert (out / 'config.json').read_text() == 'as it was'  # refused before anything was written
    world = config.copy_and_resolve_references()
    world.world.canvas = 24
    with pytest.raises(ConfigError, match=r"stage 'bpe' .*world\.canvas: 16 there, 24 now"):
        quickstart.Stages(out, world).check()
    later = config.copy_and_resolve_references()  # read only by stages not yet run
    later.sample.cfg_scale = 3.0
    quickstart.Stages(out, later).check()


def test_rates_carry_their_standard_error():
    r = rate([1, 1, 0, 0])
    assert r == {'value': 0.5, 'se': pytest.approx(0.25), 'n': 4}
    assert np.isclose(rate(np.ones(9))['se'], 0.0)


def test_the_report_names_what_goes_wrong_with_two_objects():
    from cm3jax import quickstart_report
    r = rate([1, 0, 0, 1])
    report = {'text_to_image': {'exact': r, 'exact_reranked': r, 'exact_any_of_num': r, 'attr': r, 'num': 8,
                                'by_objects': {'1': r, '2': r}, 'held_out_pairs': r,
                                'two_objects_wrong': {'count': rate([0, 1]), 'object': r, 'borrowed_shape': rate([1, 1]),
                                                      'relation': r}},
              'image_to_text': {'exact': r}, 'tokenizer': {'judge_roundtrip': r}, 'lm': {'eval/loss': 0.4},
              'sample': {'cfg_scale': 2.0, 'temperature': 0.5, 'top_p': 0.9, 'mode': 'sample', 'cdk_k': 2,
                         'cdk_alpha': 0.5, 'num': 8},
              'stages': {'lm': {'seconds': 3.0}}, 'wall_seconds': 3.0}
    md = quickstart_report.markdown(report)
    assert "| text-to-image, scenes of 2 objects: a stated object drawn with the other one's shape | 1.000 ± 0.000 (n=2) |" in md
    assert '| text-to-image, scenes of 2 objects: not two objects | 0.500 ± 0.354 (n=2) |' in md
    assert md.count('scenes of 2 objects:') == 4
