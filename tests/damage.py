"""Damaging files the way disks, copies and users do, and running the ``cm3jax`` command the way a
user does, for the bad-input tests (test_bad_data, test_bad_checkpoint, test_bad_input,
test_kill_trials)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from tests.helpers import one_device_env

REPO = pathlib.Path(__file__).resolve().parent.parent
ONE_DEVICE = one_device_env(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``python -m cm3jax ARGS`` on one CPU device."""
    return subprocess.run([sys.executable, '-m', 'cm3jax', *map(str, args)], cwd=cwd or REPO, env=env or ONE_DEVICE,
                          capture_output=True, text=True, timeout=900)  # a hang guard: runs need well under a minute


def refused(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert ``done`` failed with one error line holding every fragment and no traceback; returns
    the line."""
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert 'Traceback' not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if ': error: ' in line]
    assert len(lines) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree_hash(root) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (directories by their presence)."""
    root = pathlib.Path(root)
    out = {}
    for path in sorted(root.rglob('*')):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else 'dir'
    return out


def truncate(path, fraction: float = 0.5) -> None:
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:int(len(data) * fraction)])


def garbage_inside(path, n: int = 4096, seed: int = 0) -> None:
    """Overwrite ``n`` bytes in the middle of the file's records with random ones (size unchanged).

    An ArrayRecord shard holds its records' chunks first, then zero padding up to the 64 KiB
    block that holds its index; the damage goes in the middle of the records' bytes, as a bad
    sector or a botched copy would hit them (damage to the index is `truncate`'s case)."""
    data = bytearray(pathlib.Path(path).read_bytes())
    padding = re.search(rb'\x00{256,}', bytes(data))
    used = padding.start() if padding else len(data)
    start = max(0, used // 2 - n // 2)
    end = min(used, start + n)
    data[start:end] = np.random.default_rng(seed).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    pathlib.Path(path).write_bytes(bytes(data))


def random_bytes(path, seed: int = 1) -> None:
    """Replace the file by as many random bytes."""
    size = pathlib.Path(path).stat().st_size
    pathlib.Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())


def lm_params(workdir, config, step=None):
    """(the params of ``workdir``'s checkpoint ``step`` (default: latest) as host arrays, their
    abstract target) for an LM ``config``, read on one device."""
    import jax
    import jax.numpy as jnp
    from cm3jax import params as params_lib, parallel
    from cm3jax.lm import config as lm_config
    from cm3jax.model import transformer
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = parallel.rules_from_config(config)
    model = transformer.Transformer(lm_config.transformer_config(config, mesh, rules))
    init = lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))['params']  # noqa: E731
    target = params_lib.abstract(init, mesh, rules, jax.random.key(0))
    return jax.device_get(params_lib.restore(workdir, target, step)), target



