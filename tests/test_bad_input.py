"""Bad input at the ``cm3jax`` command, as a user runs it: one line saying what to change (the
traceback only with --verbose), damaged shards trained past and reported by reason and shard,
and refused commands that leave their directories byte-identical."""

import json
import re
import shutil

import pytest
from absl import flags

from cm3jax import cli
from cm3jax.data import documents, shards
from cm3jax.errors import ConfigError, DamagedCheckpoint, DataError
from cm3jax.params import CheckpointMismatch, WeightMismatch
from cm3jax.parallel import MeshError
from cm3jax.train.step import NonFiniteError
from tests import damage
from tests.helpers import random_tokenizer_workdir

pytestmark = pytest.mark.xdist_group('bad_input')
SHARDS = [f'shard-{i:05d}.array_record' for i in range(4)]
PREPARE = ['prepare', '--config=configs/data.py:shapes', '--config.source.count=128', '--config.prepare.shard_size=32',
           '--config.text_tokenizer.vocab_size=300', '--config.text_tokenizer.train_documents=128',
           '--config.prepare.progress=False']
TRAIN = ['train', '--config=configs/lm.py:tiny', '--config.train.eval_every=0', '--config.train.progress=False',
         '--config.train.batch=16', '--config.train.seq_len=16']


def _damage(data):
    """Shard 0: one record with ids outside the vocab; 1: cut to half; 2: 4 KiB of garbage among
    its records; 3: random bytes."""
    from array_record.python.array_record_module import ArrayRecordWriter
    manifest = json.loads((data / 'manifest.json').read_text())
    records = shards.ShardRecords(data, manifest['shards'][:1])
    kept = [records[i] for i in range(len(records))]
    segments, is_image, header = documents.decode_record(kept[7])
    segments[0] = segments[0] + 10_000
    kept[7] = documents.encode_record(segments, is_image, header['id'])
    w = ArrayRecordWriter(str(data / SHARDS[0]), 'group_size:1')
    for r in kept:
        w.write(r)
    w.close()
    damage.truncate(data / SHARDS[1])
    damage.garbage_inside(data / SHARDS[2])
    damage.random_bytes(data / SHARDS[3])


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """A tokenizer workdir, 128 Shapes documents prepared in 4 shards through the CLI, a damaged
    copy of them, and the LM trained on that copy for 9 steps (batch 16, one document per row at
    seq_len 16: past one epoch)."""
    root = tmp_path_factory.mktemp('world')
    random_tokenizer_workdir(root / 'vq')
    done = damage.cli(*PREPARE, f'--config.vq_workdir={root / "vq"}', f'--config.out={root / "data"}')
    assert done.returncode == 0, done.stderr[-3000:]
    vocab_size = int(re.search(r'model.vocab_size=(\d+)', done.stdout + done.stderr).group(1))
    shutil.copytree(root / 'data', root / 'damaged')
    _damage(root / 'damaged')
    trained = damage.cli(*TRAIN, f'--config.model.vocab_size={vocab_size}', f'--config.data.dir={root / "damaged"}',
                         '--config.train.steps=9', '--config.train.checkpoint_every=9', f'--workdir={root / "lm"}')
    assert trained.returncode == 0, trained.stderr[-3000:]
    return root, trained


def test_a_refused_prepare_leaves_the_data_byte_identical(world):
    root, _ = world
    before = damage.tree_hash(root / 'data')
    done = damage.cli(*PREPARE, f'--config.vq_workdir={root / "vq"}', f'--config.out={root / "data"}',
                      '--config.vocab.num_sentinels=4')
    damage.refused(done, f'{root / "data"} holds shards prepared with another vocab_fingerprint')
    assert damage.tree_hash(root / 'data') == before


def test_a_refused_sample_leaves_the_run_byte_identical(world):
    root, _ = world
    before = damage.tree_hash(root / 'lm')
    done = damage.cli('sample', f'--workdir={root / "lm"}', '--prompt=' + 'a red circle left of ' * 40, '--num=1')
    line = damage.refused(done, 'exceeds the model\'s context', 'shorten the prompt')
    assert re.search(r'a prompt of \d+ tokens plus \d+ new ones exceeds the model\'s context of \d+', line), line
    done = damage.cli('sample', f'--workdir={root / "lm"}', '--prompt=a red circle', '--step=1')
    damage.refused(done, 'no checkpoint step 1', 'it holds steps [9]')
    assert damage.tree_hash(root / 'lm') == before


def test_training_runs_past_damaged_shards_and_reports_them_by_reason_and_shard(world):
    root, trained = world
    out = trained.stdout + trained.stderr
    report = next(line for line in out.splitlines() if line.startswith('data: ') and 'examples read' in line)
    counts = {f'{why} ({shard})': int(n)
              for n, why, shard in re.findall(r'(\d+) ([a-z ]+) \((shard-\d+\.array_record)\)', report)}
    assert counts[f'unreadable shard ({SHARDS[1]})'] >= 32 and counts[f'unreadable shard ({SHARDS[3]})'] >= 32
    lost = counts[f'unreadable shard ({SHARDS[1]})']  # a whole shard's worth over the epochs read
    assert 0 < counts[f'unreadable record ({SHARDS[2]})'] < 0.7 * lost, report  # the rest of that shard reads
    assert counts[f'id outside the vocab ({SHARDS[0]})'] >= 1 and len(counts) == 4, report
    damaged = root / 'damaged'
    assert str(damaged / SHARDS[1]) in report and str(damaged / SHARDS[3]) in report and 'lm step 9 of 9' in out


def test_a_run_that_diverges_stops_with_one_line_naming_the_step(tmp_path):
    done = damage.cli('train', '--config=configs/lm.py:tiny', '--config.train.eval_every=0', '--config.train.steps=5',
                      '--config.train.progress=False', '--config.optim.learning_rate=1e30', f'--workdir={tmp_path}')
    damage.refused(done, 'step 2: the grads became NaN/inf', 'the update was not applied', 'Lower optim.learning_rate')


def test_unknown_config_fields_name_the_closest_ones():
    done = damage.cli('config', '--config=configs/lm.py:tiny', '--config.model.num_layer=4')
    line = damage.refused(done, "--config.model.num_layer: the config has no field 'model.num_layer'",
                          'did you mean model.num_layers')
    assert len(line) < 400
    done = damage.cli('config', '--config.modle.d_model=4')
    damage.refused(done, "no field 'modle.d_model'", 'model.d_model')
    done = damage.cli('config', '--config=configs/lm.py:nosuch')
    damage.refused(done, "--config=", "unknown preset 'nosuch'", 'choose from')
    done = damage.cli('config', '--config.model.num_layer=4', '--verbose')
    assert done.returncode != 0 and 'Traceback' in done.stderr and 'KeyError' in done.stderr


ERRORS = [ConfigError('model.num_heads=3 must divide model.d_model=64'),
          CheckpointMismatch('checkpoint X lacks tensor params/a'), WeightMismatch('weights lack w'),
          NonFiniteError('loss is nan at step 3'), DataError('every record is unusable'),
          DamagedCheckpoint('checkpoint step 6 is damaged'), MeshError('mesh.ici=(3,) needs 3 devices'),
          ValueError('a prompt of 900 tokens exceeds the model\'s context'), FileNotFoundError('config.json is missing')]


@pytest.mark.parametrize('error', ERRORS, ids=lambda e: type(e).__name__)
def test_every_cm3jax_error_is_one_line_and_verbose_shows_where(error, monkeypatch, capsys):
    def fail(config):
        raise error
    monkeypatch.setitem(cli.COMMANDS, 'config', fail)
    monkeypatch.delenv('CM3JAX_TRACEBACK', raising=False)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['cm3jax'])
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main(['cm3jax', 'config'])
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert err == f'cm3jax config: error: {error}\n(run with --verbose to see where it was raised)\n'
        flags.FLAGS.verbose = True
        with pytest.raises(type(error)):
            cli.main(['cm3jax', 'config'])
    finally:
        flags.FLAGS.unparse_flags()
