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

REPO = pathlib.Path(__file__).resolve().parent.parent
ONE_DEVICE = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # a user's laptop, not conftest's 8
ONE_DEVICE['PYTHONPATH'] = os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])


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


def vq_params(cfg, size: int, seed: int = 0):
    """Random params of a VQGAN ``cfg`` for ``size`` px images, filled from numpy on the shapes
    ``eval_shape`` gives (XLA:CPU takes over half a minute to compile the VQGAN's init):
    norm scales 1, biases 0, kernels N(0, 1/fan_in), the codebook U(-1/K, 1/K) as in taming."""
    import jax
    import jax.numpy as jnp
    from cm3jax.vq import model as vq
    shapes = jax.eval_shape(lambda k: vq.VQGAN(cfg).init(k, jnp.zeros((1, size, size, cfg.in_channels))),
                            jax.random.key(0))['params']
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], 'key', path[-1]))
        if name == 'scale':
            return np.ones(leaf.shape, leaf.dtype)
        if name == 'bias':
            return np.zeros(leaf.shape, leaf.dtype)
        if name == 'embedding':
            return rng.uniform(-1 / cfg.num_codes, 1 / cfg.num_codes, leaf.shape).astype(leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def tokenizer_workdir(path):
    """What `cm3jax train-tokenizer` leaves behind, with random weights (`test_data_end_to_end`'s
    tokenizer config, with `vq_params`)."""
    import json
    import jax
    import jax.numpy as jnp
    from cm3jax.train import checkpoint
    from cm3jax.vq import model as vq
    from tests.test_data_end_to_end import VQ
    path = pathlib.Path(path)
    path.mkdir()
    (path / 'config.json').write_text(json.dumps({'model': VQ}))
    cfg = vq.VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in VQ.items()})
    params = vq_params(cfg, 32)
    ckpt = checkpoint.Checkpointer(path / 'checkpoints', use_async=False)
    ckpt.save(1, {'step': jnp.int32(1), 'params': {'vq': jax.tree.map(jnp.asarray, params)}}, data_state={'index': 0})
    ckpt.close()
    return params, cfg

