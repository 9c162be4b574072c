"""Checkpoints: restore onto other meshes, refuse misfits, save on a clock, load params to fine-tune."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import params as params_lib, parallel
from cm3jax.lm import config as lm_config
from cm3jax.model import transformer
from cm3jax.train import checkpoint, optim, state as state_lib
from tests.helpers import tiny_config

OPTIM = optim.OptimConfig(learning_rate=1e-3, warmup_steps=2, decay_steps=10)


def _abstract(mesh, **model_overrides):
    config = tiny_config('chameleon', **model_overrides)
    rules = parallel.rules_from_config(config)
    model = transformer.Transformer(lm_config.transformer_config(config, mesh, rules))
    opt = optim.make_optimizer(OPTIM)
    init_fn = lambda rng, x: model.init(rng, x)['params']
    args = (jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    return init_fn, opt, rules, args


def _state(mesh, **overrides):
    """A state with non-trivial optimizer moments: init, then perturb every leaf."""
    init_fn, opt, rules, args = _abstract(mesh, **overrides)
    state = state_lib.init_state(init_fn, opt, mesh, rules, *args)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.ones_like(x) * 0.5 if x.dtype == jnp.float32 else x + 3, s),
                   donate_argnums=0)
    return jax.block_until_ready(bump(state)), state_lib.abstract_state(init_fn, opt, mesh, rules, *args)


def test_save_on_2x2x2_restores_on_4_devices_and_on_1(tmp_path):
    mesh8 = parallel.create_mesh((2, 2, 2))
    state, _ = _state(mesh8)
    saved = jax.device_get(state)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(3, state, {'index': 3})
    ckpt.close()

    for devices, ici in ((jax.devices()[:4], (1, 4, 1)), (jax.devices()[:1], (1, 1, 1))):
        mesh = parallel.create_mesh(ici, devices=devices)
        init_fn, opt, rules, args = _abstract(mesh)
        target = state_lib.abstract_state(init_fn, opt, mesh, rules, *args)
        restored, data_state = checkpoint.Checkpointer(tmp_path).restore(target)
        assert data_state == {'index': 3}
        assert restored['params']['embed'].sharding.mesh.shape == dict(mesh.shape)
        assert jax.tree.structure(restored) == jax.tree.structure(saved)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)


def test_a_checkpoint_for_another_model_is_refused_naming_the_tensor(tmp_path):
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    state, _ = _state(mesh)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state)
    ckpt.close()
    _, wider = _state(mesh, d_model=128, mlp_dim=256)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"'params/embed' has shape \(512, 64\) in the checkpoint "
                                                            r"but \(512, 128\) in the model"):
        checkpoint.Checkpointer(tmp_path).restore(wider)
    with pytest.raises(checkpoint.CheckpointMismatch, match='params/embed'):
        params_lib.restore(tmp_path, wider['params'])


def test_extra_tensors_are_refused_and_byte_states_round_trip(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, {'params': {'a': jnp.ones(2), 'b': jnp.ones(3)}}, b'{"grain": 1}')  # grain DataLoader state
    ckpt.close()
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(checkpoint.CheckpointMismatch, match="has tensor 'params/b' that the model lacks"):
        ckpt.restore({'params': {'a': jax.ShapeDtypeStruct((2,), jnp.float32)}})
    both = {'params': {k: jax.ShapeDtypeStruct((n,), jnp.float32) for k, n in (('a', 2), ('b', 3))}}
    assert ckpt.restore(both)[1] == b'{"grain": 1}'
    # a whole top-level entry the model no longer has (e.g. an EMA codebook turned off) is named too
    ckpt.save(2, {'params': {'a': jnp.ones(2)}, 'ema': {'count': jnp.ones(4)}}, None)
    ckpt.wait()
    with pytest.raises(checkpoint.CheckpointMismatch, match="has tensor 'ema/count' that the model lacks"):
        ckpt.restore({'params': {'a': jax.ShapeDtypeStruct((2,), jnp.float32)}})


def test_time_interval_saves_follow_the_injected_clock(tmp_path):
    now = [0.0]
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=100, every_seconds=60, clock=lambda: now[0])
    assert not ckpt.should_save(1)
    now[0] = 59.0
    assert not ckpt.should_save(2)
    now[0] = 61.0
    assert ckpt.should_save(3)
    state = {'step': jnp.int32(3), 'w': jnp.ones(4)}
    ckpt.save(3, state)
    assert not ckpt.should_save(4)  # the clock restarts at each save
    assert ckpt.should_save(100)    # and step counts still apply
    now[0] = 122.0
    assert ckpt.should_save(5)
    ckpt.close()


def test_keep_n_and_the_data_state_travels_with_each_step(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, {'w': jnp.full(3, float(step))}, {'index': step * 10})
    ckpt.close()
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    assert ckpt.all_steps() == [2, 3]
    restored, data = ckpt.restore({'w': jax.ShapeDtypeStruct((3,), jnp.float32)}, step=2)
    np.testing.assert_array_equal(restored['w'], 2.0)
    assert data == {'index': 20}
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        checkpoint.Checkpointer(tmp_path / 'empty').restore({'w': jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_init_from_loads_params_only_with_a_fresh_optimizer(tmp_path):
    mesh8 = parallel.create_mesh((2, 2, 2))
    state, _ = _state(mesh8)
    ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints')
    ckpt.save(5, state)
    ckpt.close()

    mesh = parallel.create_mesh((1, 4, 1), devices=jax.devices()[:4])
    init_fn, opt, rules, args = _abstract(mesh)
    target = state_lib.abstract_state(init_fn, opt, mesh, rules, *args)
    params = params_lib.restore(tmp_path, target['params'])  # the workdir, not checkpoints/
    fresh = state_lib.fresh_optimizer(params, opt, target)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(fresh['params']), jax.device_get(state['params']))
    assert int(fresh['step']) == 0
    mu = fresh['opt'][1].inner_state[0].mu
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(mu))
    with pytest.raises(FileNotFoundError, match='holds no checkpoints'):
        params_lib.restore(tmp_path / 'nowhere', target['params'])


def test_loading_a_run_does_not_warn_that_a_read_only_manager_is_read_only(tmp_path, caplog):
    state, _ = _state(parallel.create_mesh((1, 8, 1)))
    ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints')
    ckpt.save(3, state)
    ckpt.close()
    with caplog.at_level(logging.WARNING):
        assert params_lib.latest_step(tmp_path) == 3
        logging.getLogger('absl').warning('a warning of its own still shows')
    assert 'read only' not in caplog.text and 'read_only' not in caplog.text, caplog.text
    assert 'a warning of its own still shows' in caplog.text


def test_small_replicated_tensors_are_saved_whole_not_sliced_per_replica(tmp_path, caplog):
    """Orbax would split each replicated tensor's write among its replicas, compiling a slice
    per device and shape (about 130 for the tiny VQ-GAN, 12 s of its first save); the tiny
    model's tensors are all under `MIN_REPLICA_SLICE_BYTES`, so none is sliced."""
    mesh = parallel.create_mesh((2, 2, 2))
    state, _ = _state(mesh)
    replicated = [x for x in jax.tree.leaves(state)
                  if len(x.sharding.device_set) > 1 and x.sharding.is_fully_replicated]
    assert replicated  # the case in question: tensors held whole by several devices
    assert max(x.nbytes for x in jax.tree.leaves(state)) < params_lib.MIN_REPLICA_SLICE_BYTES
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        ckpt = checkpoint.Checkpointer(tmp_path)
        ckpt.save(1, state)
        ckpt.close()
    assert 'jit(slice)' not in caplog.text, [line for line in caplog.text.splitlines() if 'slice' in line][:3]
    restored, _ = checkpoint.Checkpointer(tmp_path).restore(_state(mesh)[1])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
