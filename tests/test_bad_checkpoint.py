"""Damaged checkpoints: resume walks back to the newest step that restores, bit-identical to a run
that stopped there, naming the damaged step; sampling names the missing file and the other steps;
a refused `train` leaves the workdir byte-identical; `--init_from` takes `--step`."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from cm3jax import trainers
from cm3jax.errors import DamagedCheckpoint
from tests import damage
from tests.helpers import tiny_config

pytestmark = pytest.mark.xdist_group('bad_checkpoint')
STEPS = 6
ARGS = ['--config=configs/lm.py:tiny', f'--config.train.steps={STEPS}', '--config.train.batch=8',
        '--config.train.checkpoint_every=2', '--config.train.eval_every=0', '--config.train.progress=False']


def _config():
    config = tiny_config()
    config.train.update(steps=STEPS, batch=8, checkpoint_every=2, eval_every=0, log_every=1, progress=False)
    return config


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted run: checkpoints at steps 2, 4 and 6."""
    workdir = tmp_path_factory.mktemp('ckpt') / 'reference'
    trainers.train(_config(), str(workdir))
    assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 4, 6]
    return workdir


def _params(workdir, step=None):
    return damage.lm_params(workdir, _config(), step)


def _empty(step_dir: pathlib.Path):
    shutil.rmtree(step_dir)
    step_dir.mkdir()
    return 'is empty'


def _no_metadata(step_dir: pathlib.Path):
    (step_dir / 'state' / '_METADATA').unlink()
    return '_METADATA is missing'


def _truncated_array(step_dir: pathlib.Path):
    for path in (step_dir / 'state').rglob('*'):  # every array data file (OCDBT's d/ directories)
        if path.is_file() and path.parent.name == 'd':
            damage.truncate(path)
    return 'reading it failed'


@pytest.mark.parametrize('damage_fn', [_empty, _no_metadata, _truncated_array])
def test_resume_walks_back_from_a_damaged_latest_step(reference, tmp_path, capsys, damage_fn):
    workdir = tmp_path / 'run'
    shutil.copytree(reference, workdir)
    diagnosis = damage_fn(workdir / 'checkpoints' / str(STEPS))

    # sampling and init_from read the params only: damaged, not "another model", with the way out
    with pytest.raises(DamagedCheckpoint, match=f'step {STEPS} is damaged: .*{diagnosis}.*--step=N .*\\(2, 4\\)'):
        _params(workdir)
    np.testing.assert_array_equal(jax.tree.leaves(_params(workdir, 4)[0])[0],
                                  jax.tree.leaves(_params(reference, 4)[0])[0])

    capsys.readouterr()
    summary = trainers.train(_config(), str(workdir))
    out = capsys.readouterr().out
    assert f'skipped checkpoint step {STEPS}: checkpoint step {STEPS} is damaged' in out and diagnosis in out, out
    assert 'resumed from step 4' in out and summary['step'] == STEPS
    jax.tree.map(np.testing.assert_array_equal, _params(workdir)[0], _params(reference)[0])  # bit-identical
    assert (workdir / 'checkpoints' / f'damaged-{STEPS}').is_dir()  # set aside, not deleted


def test_no_step_restoring_is_an_error_listing_each(reference, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(reference, workdir)
    for step in (2, 4, 6):
        _no_metadata(workdir / 'checkpoints' / str(step))
    before = damage.tree_hash(workdir)
    with pytest.raises(DamagedCheckpoint, match=r'restores completely: checkpoint step 6 .*step 4 .*step 2 .*'
                                                r'Move .* away to start the run over'):
        trainers.train(_config(), str(workdir))
    assert damage.tree_hash(workdir) == before


def test_deleted_array_files_and_a_missing_data_item_are_damage(reference, tmp_path):
    from cm3jax import params as params_lib
    workdir = tmp_path / 'run'
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / 'checkpoints' / '6' / 'data')
    with pytest.raises(DamagedCheckpoint, match=r'step 6 is damaged: .*/6/data/metadata is missing'):
        params_lib.check_complete(workdir / 'checkpoints', 6, items=('state', 'data'))
    for path in (workdir / 'checkpoints' / '4' / 'state').rglob('*'):
        if path.is_file() and path.parent.name == 'd':
            path.unlink()
    with pytest.raises(DamagedCheckpoint, match=r'step 4 is damaged: reading it failed .*NOT_FOUND.*--step=N .*\(2, 6\)'):
        _params(workdir, 4)


def test_a_refused_train_leaves_the_workdir_byte_identical(reference, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(reference, workdir)
    before = damage.tree_hash(workdir)
    done = damage.cli('train', *ARGS, f'--workdir={workdir}', '--config.model.d_model=128')
    damage.refused(done, 'has shape', 'load it with the config it was trained with')
    assert damage.tree_hash(workdir) == before  # config.json too: sampling still reads the run


def test_init_from_takes_a_step(reference, tmp_path):
    # steps=0: the params are read (and the run set up), nothing is compiled or trained
    done = damage.cli('train', *ARGS, f'--workdir={tmp_path / "new"}', f'--init_from={reference}', '--step=2',
                      '--config.train.steps=0')
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'initialised params from {reference} (step 2)' in done.stdout + done.stderr
    done = damage.cli('train', *ARGS, f'--workdir={tmp_path / "other"}', f'--init_from={reference}', '--step=5')
    damage.refused(done, 'no checkpoint step 5', 'it holds steps [2, 4, 6]')
    assert not (tmp_path / 'other' / 'config.json').exists()
