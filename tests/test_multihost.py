"""Two local processes form one 8-device mesh (gloo collectives over 127.0.0.1)."""

import json
import os
import subprocess
import sys

import numpy as np
import portpicker

from cm3jax.train.loss import cross_entropy
from tests.helpers import build, tiny_config


def test_two_processes_compute_the_single_process_loss(repo):
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2', JAX_PLATFORMS='cpu')
    procs = [subprocess.Popen([sys.executable, '-m', 'tests.multihost_worker'], cwd=repo,
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results = [line[len('RESULT '):] for line in out.splitlines() if line.startswith('RESULT ')]
        assert len(results) == 1, f'stdout: {out[-2000:]}\nstderr: {err[-2000:]}'
        outputs.append(json.loads(results[0]))

    assert [o['process'] for o in outputs] == [0, 1]
    assert all(o['devices'] == 8 and o['local_devices'] == 4 for o in outputs)
    assert outputs[0]['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}

    model, params, _, _ = build(tiny_config('chameleon'))
    tokens = np.random.default_rng(0).integers(0, 500, (8, 17)).astype(np.int32)
    expected = cross_entropy(model.apply({'params': params}, tokens[:, :-1]), tokens[:, 1:])[0]
    for o in outputs:
        np.testing.assert_allclose(o['loss'], float(expected), rtol=1e-5)
