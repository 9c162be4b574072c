"""`cm3jax aot`: the paper-scale train step compiles for 8 simulated devices without allocating,
and the memory it reports is the shards of the state plus XLA's temporaries."""

import jax
import numpy as np

from cm3jax import aot
from configs import lm


def test_cm3leon_350m_train_and_decode_steps_compile_for_8_devices():
    config = lm.get_config('cm3leon_350m')  # the preset as it is: 24 layers, d_model 1024, seq 4096
    config.train.batch = 16  # 2 rows per device
    r = aot.compile_train_step(config, jax.devices()[:8])
    print(aot.format_report(r))
    assert r.devices == 8 and r.mesh == {'data': 1, 'fsdp': 8, 'tensor': 1} and r.remat == 'full'
    assert 0.3e9 < r.num_params < 0.45e9
    # FSDP over 8: each device holds an eighth of the float32 params, and Adam's two moments
    np.testing.assert_allclose(r.params, r.num_params * 4 / 8, rtol=0.01)
    np.testing.assert_allclose(r.optimizer, 2 * r.params, rtol=0.01)
    batch_bytes = 2 * 4096 * (4 + 4 + 4 + 4)  # inputs, targets, segment ids, weights
    np.testing.assert_allclose(r.arguments, r.params + r.optimizer + batch_bytes, rtol=0.01)
    # the logits of 2 x 4096 tokens over 64,512 ids alone are 2 GiB in float32
    assert r.temporaries > 2 * 4096 * 64_512 * 4 and r.peak > r.arguments + r.temporaries * 0.9

    # the decode step: the same params, unrolled, and a KV cache of k and v for 24 layers x 8 rows x
    # 16 heads x 64 x 4096 slots in float32, rows split over the 8 devices
    d = aot.compile_decode_step(config, jax.devices()[:8], batch=8)
    print(aot.format_decode_report(d))
    np.testing.assert_allclose(d.params, r.params, rtol=1e-3)
    np.testing.assert_allclose(d.cache, 2 * 24 * 16 * 64 * 4096 * 4 + 2 * 4096 * 4, rtol=0.01)
    assert d.temporaries > 0
