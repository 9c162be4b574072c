"""kill -9 at random moments while saving checkpoints, preparing shards and building the index; the
same command run again finishes with nothing lost and the result of an uninterrupted run.

Each trial starts the command, kills it with SIGKILL at a random point of the work (after a random
number of steps logged or shards written, plus a random part of one; for index building, which
writes only at the end, at a random time), reruns it to the end and compares the result with an
uninterrupted run's, byte for byte (checkpoints: parameter for parameter).
The suite runs ten kills: a chain per kind on one directory (four while saving, three while
preparing, three while building the index), each rerun killed again at a new random moment of
the work it has left, then one rerun to the end, compared with the uninterrupted result.
``python -m tests.test_kill_trials N`` runs N separate trials, the three kinds in turn (index
building starts over when rerun: its trials check that nothing half-written survives).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import jax
import numpy as np
import pytest

from tests import damage
from tests.helpers import random_tokenizer_workdir

pytestmark = pytest.mark.xdist_group('kill_trials')
KINDS = ('saving', 'preparing', 'index')
LM = ['train', '--config=configs/lm.py:tiny', '--config.train.steps=10', '--config.train.batch=8',
      '--config.train.checkpoint_every=1', '--config.train.keep=2', '--config.train.eval_every=0',
      '--config.train.log_every=1', '--config.train.progress=False']
PREPARE = ['prepare', '--config=configs/data.py:shapes', '--config.source.count=96', '--config.prepare.shard_size=8',
           '--config.prepare.batch=8', '--config.text_tokenizer.vocab_size=300',
           '--config.text_tokenizer.train_documents=96', '--config.prepare.progress=False']
INDEX = '''
import sys, jax
from cm3jax import parallel
from cm3jax.data import prepare
from cm3jax.retrieval import build, clip, load, select
from configs import clip as clip_configs
from tests.helpers import random_tokenizer_workdir
_, _, tok, _, _ = prepare.load_tokenizers(sys.argv[1])
model = clip_configs.get_config('tiny').model
model.max_len = 24
layout = load.text_layout(tok, model.max_len)
cfg = load.clip_config(model, layout)
retriever = load.Retriever(cfg, clip.init(cfg, jax.random.key(0)), layout, parallel.create_mesh((-1, 1, 1)),
                           parallel.rules_from_config({}), batch_size=16)
rules = select.SelectConfig(candidates=24, max_query_score=0.9995, max_pair_similarity=0.9995)
build.build_index(sys.argv[1], retriever, build.BuildConfig(top_m=3, batch=8, select=rules))
'''


def _lines(path: pathlib.Path) -> int:
    try:
        return path.read_text().count('\n')
    except FileNotFoundError:
        return 0


def _command(kind: str, root: pathlib.Path, where: pathlib.Path) -> tuple[list[str], Callable[[], int], int]:
    """(argv, how far the work has got, in units, and how many units it has) for one kind of
    trial in ``where``: steps logged (each one saved) or shards written; None for index
    building, which writes its files only at the end."""
    if kind == 'saving':
        return ([sys.executable, '-m', 'cm3jax', *LM, f'--workdir={where}'],
                lambda: _lines(where / 'metrics.jsonl'), 10)
    if kind == 'preparing':
        return ([sys.executable, '-m', 'cm3jax', *PREPARE, f'--config.vq_workdir={root / "vq"}',
                 f'--config.out={where}'], lambda: len(list(where.glob('shard-*'))), 12)
    return [sys.executable, '-c', INDEX, str(where)], None, 0


def _run(argv, progress: Callable[[], int] | None = None, at: float | None = None,
         delay: float = 0.0) -> tuple[float, int]:
    """Run ``argv`` to the end, or SIGKILL it ``delay`` seconds after ``progress()`` reaches ``at``,
    or as soon as it reaches ``at + 1`` if that comes first: on a fast machine the delay alone can
    outlast the rest of the work, and the kill would miss (without ``progress``: ``at`` seconds
    after the start). Returns (seconds, return code)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=damage.REPO, env=damage.ONE_DEVICE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err, reached = [], None
    threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True).start()  # never blocks the child
    while proc.poll() is None:
        now = time.monotonic() - start
        got = progress() if progress is not None and at is not None else now  # read once per poll
        if at is not None and reached is None and got >= at:
            reached = now
        if reached is not None and (now >= reached + delay or (progress is not None and got >= at + 1)):
            proc.kill()
            break
        if now > 900:  # a hang guard: each run needs well under a minute
            proc.kill()
            raise TimeoutError(argv)
        time.sleep(0.01)
    proc.wait()
    if at is None:
        assert proc.returncode == 0, ''.join(err)[-3000:]
    return time.monotonic() - start, proc.returncode


def _result(kind: str, where: pathlib.Path) -> dict:
    """What must come out the same: final parameters, shard and manifest bytes, or bank and lists."""
    if kind == 'saving':
        from tests.helpers import tiny_config
        params, _ = damage.lm_params(where, tiny_config())
        return {'step': int(json.loads((where / 'metrics.jsonl').read_text().splitlines()[-1])['step']),
                'params': [np.asarray(x).tobytes() for x in jax.tree.leaves(params)]}
    files = damage.tree_hash(where)
    if kind == 'preparing':
        manifest = json.loads((where / 'manifest.json').read_text())
        manifest.pop('text_tokenizer_path')  # names the output directory itself
        files['manifest.json'] = manifest
    return {k: v for k, v in files.items() if not k.startswith('shard-') or kind == 'preparing'}


class Trials:
    """References made once per kind in ``root``; `trial` runs one kill-and-rerun."""

    def __init__(self, root: pathlib.Path, seed: int = 0):
        self.root, self.rng = root, np.random.default_rng(seed)
        random_tokenizer_workdir(root / 'vq')
        self.reference, self.timing = {}, {}

    def _fresh(self, kind: str, name: str) -> pathlib.Path:
        where = self.root / name
        if kind == 'index':  # the index is built on prepared data: a copy of the reference's, without an index
            self.ensure('preparing')
            shutil.copytree(self.root / 'ref-preparing', where)
        return where

    def ensure(self, kind: str) -> None:
        if kind in self.reference:
            return
        where = self._fresh(kind, f'ref-{kind}')
        argv, _, _ = _command(kind, self.root, where)
        self.timing[kind], _ = _run(argv)
        self.reference[kind] = _result(kind, where)

    def _moment(self, kind: str, progress: Callable[[], int] | None, units: int) -> tuple[float, float]:
        """A random point of the work left: (units done, or seconds without ``progress``; delay)."""
        if progress is None:  # a warm compilation cache makes the rerun faster than the reference
            return float(self.rng.uniform(0.1, 0.6)) * self.timing[kind], 0.0
        # a step or a shard takes 0.05 to a few tenths of a second, by machine; the kill lands
        # by the time unit at + 1 shows (`_run`), so at most units - 2 leaves work to interrupt
        done = progress()
        return int(self.rng.integers(done + 1, max(done + 2, units - 1))), float(self.rng.uniform(0, 0.3))

    def trial(self, kind: str, n: int, kills: int = 1) -> dict:
        """Kill ``kills`` times in a row, each rerun at a random point of the work it has left:
        after a random number of its units, plus a random part of a unit (a save or a shard
        write in flight); then run to the end and compare."""
        self.ensure(kind)
        where = self._fresh(kind, f'trial-{kind}-{n}')
        argv, progress, units = _command(kind, self.root, where)
        moments = []
        for _ in range(kills):
            at, delay = self._moment(kind, progress, units)
            _, code = _run(argv, progress, at, delay)
            moments.append({'killed_at': round(at, 2), 'then_s': round(delay, 2), 'killed': code != 0})
        _run(argv)  # the same command again: resumes, or starts over where nothing is kept
        same = _result(kind, where) == self.reference[kind]
        return {'kind': kind, 'kills': moments, 'killed': sum(m['killed'] for m in moments), 'same': same}


@pytest.fixture(scope='module')
def trials(tmp_path_factory):
    return Trials(tmp_path_factory.mktemp('kill'))


@pytest.mark.parametrize('kind, kills', [('saving', 4), ('preparing', 3), ('index', 3)])
def test_kill_9_then_rerun_gives_the_uninterrupted_result(trials, kind, kills):
    result = trials.trial(kind, 0, kills)
    assert result['same'], result
    assert result['killed'] >= 1, result  # at least one kill landed before the work was done


def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        trials = Trials(pathlib.Path(root))
        results = [trials.trial(KINDS[n % len(KINDS)], n) for n in range(count)]
    for r in results:
        print(json.dumps(r))
    print(f'{sum(r["same"] for r in results)} of {count} trials gave the uninterrupted result '
          f'({sum(r["killed"] for r in results)} killed before they finished)')


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
