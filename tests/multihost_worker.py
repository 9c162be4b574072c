"""One process of the two-process test (tests/test_multihost.py); prints its loss as a JSON line after 'RESULT '.

Run as ``python -m tests.multihost_worker`` with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set, as a launcher would.
"""

import json
import os
import sys

import jax

jax.config.update('jax_num_cpu_devices', 4)

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402

from cm3jax import parallel  # noqa: E402
from cm3jax.train.loss import cross_entropy  # noqa: E402
from tests.helpers import build, tiny_config  # noqa: E402


def main():
    assert parallel.maybe_initialize_distributed()
    mesh = parallel.create_mesh((1, 2, 2), (2, 1, 1))  # data across the two "hosts"
    model, params, mesh, rules = build(tiny_config('chameleon'), mesh)
    tokens = np.random.default_rng(0).integers(0, 500, (8, 17)).astype(np.int32)
    me, n = jax.process_index(), jax.process_count()
    local = tokens[me * 8 // n:(me + 1) * 8 // n]  # this host's rows of the global batch
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = parallel.global_batch(local, mesh, rules)
        loss = jax.jit(lambda p, t: cross_entropy(model.apply({'params': p}, t[:, :-1]), t[:, 1:])[0])(params, batch)
    print('RESULT', json.dumps({'process': me, 'devices': jax.device_count(), 'local_devices': jax.local_device_count(),
                      'mesh': dict(mesh.shape), 'loss': float(loss)}))
    sys.stdout.flush()
    jax.distributed.shutdown()


if __name__ == '__main__':
    os.environ.pop('XLA_FLAGS', None)
    main()
