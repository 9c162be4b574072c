"""kill -9 at random moments while saving checkpoints, preparing shards and building the index; the
same command run again finishes with nothing lost and the result of an uninterrupted run.

Each trial starts the command, waits until it is doing the work (its first output file exists),
kills it with SIGKILL after a random part of the work's duration, reruns it to the end and
compares the result with a reference run's, byte for byte (checkpoints: parameter for parameter).
The test runs one trial of saving and one of preparing, the two that resume (about a minute and
a half of subprocesses on two cores); ``python -m tests.test_kill_trials N`` runs N, the three
kinds in turn (index building starts over when rerun: its trial checks that nothing half-written
survives).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np
import pytest

from tests import damage

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


def _command(kind: str, root: pathlib.Path, where: pathlib.Path) -> tuple[list[str], Callable[[], bool]]:
    """(argv, a test that the work has begun: before it the process is importing and compiling)
    for one kind of trial in ``where``."""
    if kind == 'saving':  # the first save has started
        ckpts = where / 'checkpoints'
        return [sys.executable, '-m', 'cm3jax', *LM, f'--workdir={where}'], lambda: ckpts.is_dir() and any(ckpts.iterdir())
    if kind == 'preparing':  # the BPE is trained; the shards come next
        return ([sys.executable, '-m', 'cm3jax', *PREPARE, f'--config.vq_workdir={root / "vq"}',
                 f'--config.out={where}'], (where / 'tokenizer.json').exists)
    return [sys.executable, '-c', INDEX, str(where)], lambda: True  # embedding is most of it: any moment


def _run(argv, begun: Callable[[], bool] | None = None, kill_after: float | None = None) -> tuple[float, float, int]:
    """Run ``argv``; with ``kill_after``, SIGKILL it that many seconds after ``begun()`` holds.
    Returns (seconds until it held, seconds in all, return code)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=damage.REPO, env=damage.ONE_DEVICE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = None
    while proc.poll() is None:
        if seen is None and begun is not None and begun():
            seen = time.monotonic() - start
        if seen is not None and kill_after is not None and time.monotonic() - start >= seen + kill_after:
            proc.kill()
            break
        if time.monotonic() - start > 900:  # a hang guard: each run needs well under a minute
            proc.kill()
            raise TimeoutError(argv)
        time.sleep(0.02)
    _, err = proc.communicate()
    if kill_after is None:
        assert proc.returncode == 0, err[-3000:]
    return (seen if seen is not None else time.monotonic() - start), time.monotonic() - start, proc.returncode


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
        damage.tokenizer_workdir(root / 'vq')
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
        argv, begun = _command(kind, self.root, where)
        seen, total, _ = _run(argv, begun)
        self.timing[kind] = (seen, total)
        self.reference[kind] = _result(kind, where)

    def trial(self, kind: str, n: int) -> dict:
        self.ensure(kind)
        where = self._fresh(kind, f'trial-{kind}-{n}')
        argv, begun = _command(kind, self.root, where)
        seen, total = self.timing[kind]
        kill_after = float(self.rng.uniform(0.0, 0.9 * (total - seen)))
        _, _, code = _run(argv, begun, kill_after)
        _run(argv)  # the same command again: resumes, or starts over where nothing is kept
        same = _result(kind, where) == self.reference[kind]
        return {'kind': kind, 'killed_after_s': round(kill_after, 2), 'killed': code != 0, 'same': same}


@pytest.fixture(scope='module')
def trials(tmp_path_factory):
    return Trials(tmp_path_factory.mktemp('kill'))


@pytest.mark.parametrize('kind', KINDS[:2])
def test_kill_9_then_rerun_gives_the_uninterrupted_result(trials, kind):
    result = trials.trial(kind, 0)
    assert result['same'], result


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
