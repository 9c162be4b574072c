"""Every trainer goes through one harness and reads any image source: the image tokenizer and
the retriever train on a user's folder (corrupt files skipped and reported, odd sizes refused or
resized as configured), one ``--config`` dispatches on ``config.task``, and the presets install
with the package."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cm3jax import trainers
from cm3jax.errors import ConfigError
from configs import clip as clip_configs, lm as lm_configs
from tests.helpers import one_device_env

ONE_DEVICE = one_device_env()  # a user's laptop, not conftest's 8


def _cli(repo, *args, cwd=None, cm3jax=(sys.executable, '-m', 'cm3jax')):
    return subprocess.run([*cm3jax, *args], cwd=cwd or repo, env=ONE_DEVICE, capture_output=True, text=True,
                          timeout=900)  # a hang guard: each run needs well under a minute


def _rows(workdir):
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _photos(root, n, size=32, odd=None, truncated=None, captions=None):
    """``n`` PNG and JPEG images in ``root`` with captions.jsonl; ``odd``: index of one 8 px larger;
    ``truncated``: index of one cut to a third of its bytes."""
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        side = size + 8 if i == odd else size
        pixels = np.zeros((side, side, 3), np.uint8)
        pixels[rng.integers(0, side // 2):, :rng.integers(side // 2, side)] = rng.integers(0, 256, 3)
        name = f'img{i}.{"png" if i % 2 else "jpg"}'
        Image.fromarray(pixels).save(root / name)
        if i == truncated:
            (root / name).write_bytes((root / name).read_bytes()[:len((root / name).read_bytes()) // 3])
        caption = captions[i % len(captions)] if captions else f'a picture {i}'
        lines.append(json.dumps({'image': name, 'caption': caption}))
    (root / 'captions.jsonl').write_text('\n'.join(lines) + '\n')


def test_the_tokenizer_trains_on_a_folder_of_user_images(tmp_path, repo):
    _photos(tmp_path / 'photos', 12, size=16, odd=1, truncated=3)
    folder = f"--config.data.source={{'kind': 'folder', 'root': '{tmp_path / 'photos'}'}}"
    common = ['train-tokenizer', '--config=configs/vq.py:tiny', folder, '--config.data.eval={}',
              '--config.train.batch=4', '--config.train.steps=3', '--config.train.eval_every=3',
              '--config.train.image_every=3', '--config.train.eval_batches=1', '--config.train.progress=False']

    refused = _cli(repo, *common, f'--workdir={tmp_path / "refused"}')
    assert refused.returncode != 0
    assert ("document 'img1.png' has a uint8 image of shape (24, 24, 3) but the model takes uint8 16x16; set "
            "model.resolution or the source's size (data.source.resize" in refused.stderr), refused.stderr[-2000:]
    assert 'Traceback' not in refused.stderr  # bad input: one line, not a stack

    # the same config through plain `cm3jax train`, which dispatches on config.task
    resize = f"--config.data.source={{'kind': 'folder', 'root': '{tmp_path / 'photos'}', 'resize': 16}}"
    done = _cli(repo, 'train', *common[1:2], resize, *common[3:], f'--workdir={tmp_path / "vq"}')
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert 'tokenizer: 16px -> 8x8 codes from 256' in out
    assert 'skipped 1: 1 undecodable image (img3.png)' in out, out[-3000:]  # skipped, counted, reported
    rows = _rows(tmp_path / 'vq')
    assert [r['step'] for r in rows if 'loss' in r][-1] == 3 and any('eval/psnr' in r for r in rows)
    assert list((tmp_path / 'vq' / 'images').glob('step_*.png'))


def test_the_retriever_trains_on_a_folder_of_images_and_captions(tmp_path, repo):
    words = ['a red circle', 'a blue square', 'a green triangle', 'a yellow circle']
    _photos(tmp_path / 'photos', 16, captions=words)
    done = _cli(repo, 'train', '--config=configs/clip.py:tiny', f'--workdir={tmp_path / "clip"}',
                f"--config.data.source={{'kind': 'folder', 'root': '{tmp_path / 'photos'}'}}",
                "--config.data.eval={'photos': {}}", '--config.data.eval_size=8', '--config.train.batch=8',
                '--config.train.steps=4', '--config.train.eval_every=4', '--config.train.log_every=1',
                '--config.tokenizer.vocab_size=300', '--config.train.progress=False')
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(tmp_path / 'clip')
    assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4]
    assert [r['step'] for r in rows if 'eval/photos/t2i_r1' in r] == [0, 4]  # the random encoder, then trained
    assert (tmp_path / 'clip' / 'tokenizer.json').exists()
    from cm3jax.retrieval import load
    retriever = load.load_retriever(tmp_path / 'clip')
    assert retriever.embed_texts(words).shape == (4, retriever.cfg.projection_dim)


def test_a_config_names_its_trainer():
    assert trainers.task_of(lm_configs.get_config('tiny')).name == 'lm'
    assert trainers.task_of(clip_configs.get_config('tiny')).name == 'retriever'
    from configs import sft as sft_configs
    assert trainers.task_of(sft_configs.get_config('tiny')).name == 'sft'
    config = lm_configs.get_config('tiny')
    config.task = 'diffusion'
    with pytest.raises(ConfigError, match=r"config.task='diffusion' is unknown; choose one of \['lm', 'retriever', "
                                          r"'sft', 'vq'\]"):
        trainers.task_of(config)
    from configs import data as data_configs
    with pytest.raises(ConfigError, match="config.task='prepare' is not a trainer; run it with `cm3jax prepare`"):
        trainers.task_of(data_configs.get_config('shapes'))


def test_the_cli_refuses_an_unknown_task_and_a_config_for_another_command(tmp_path, repo):
    bad = _cli(repo, 'train', '--config=configs/lm.py:tiny', '--config.task=diffusion', f'--workdir={tmp_path / "x"}')
    assert bad.returncode != 0 and "config.task='diffusion' is unknown; choose one of ['lm', 'retriever', 'sft', " \
        "'vq']" in bad.stderr
    wrong = _cli(repo, 'train-retriever', '--config=configs/vq.py:tiny', f'--workdir={tmp_path / "y"}')
    assert wrong.returncode != 0 and "this config's task is 'vq'" in wrong.stderr


def test_a_non_editable_install_carries_the_presets(tmp_path, repo):
    """``pip install .`` into a fresh venv, then the documented command from another directory.
    The venv sees this one's packages through a .pth file (dependencies, and the pip and
    setuptools that build the wheel), so nothing is downloaded."""
    import pathlib
    import shutil
    import site
    import sysconfig
    import venv
    # a copy of the sources: building in place would leave build/ and *.egg-info in the checkout
    source = tmp_path / 'src'
    shutil.copytree(repo, source, ignore=shutil.ignore_patterns('.venv', '.git', 'build', '*.egg-info', 'runs', 'out',
                                                                '__pycache__', '.pytest_cache', '.hypothesis'))
    fresh = tmp_path / 'venv'
    venv.create(fresh, with_pip=False)
    purelib = pathlib.Path(sysconfig.get_paths(vars={'base': str(fresh), 'platbase': str(fresh)})['purelib'])
    (purelib / 'deps.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    python = fresh / 'bin' / 'python'
    install = subprocess.run([str(python), '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                              '--no-index', str(source)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    shown = _cli(repo, 'config', '--config=configs/lm.py:tiny', cwd=elsewhere, cm3jax=(str(fresh / 'bin' / 'cm3jax'),))
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert 'task: lm' in shown.stdout and 'num_layers: 2' in shown.stdout
    where = subprocess.run([str(python), '-c', 'import cm3jax, configs; print(cm3jax.__file__, configs.__file__)'],
                           cwd=elsewhere, capture_output=True, text=True)
    assert where.stdout.count(str(purelib)) == 2, where  # the installed copies, not the checkout
