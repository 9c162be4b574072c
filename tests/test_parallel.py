"""Meshes, sharded init, parity between a (2, 2, 2) mesh and one device, global batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from jax.sharding import AxisType

from cm3jax import parallel
from cm3jax.train.loss import cross_entropy
from tests.helpers import build, random_tokens, tiny_config


def _loss_and_grads(model, params, mesh, rules, tokens, segments):
    def loss_fn(params):
        logits = model.apply({'params': params}, tokens[:, :-1], segments[:, :-1])
        return cross_entropy(logits, tokens[:, 1:], (segments[:, 1:] > 0).astype(jnp.float32),
                             z_loss=1e-4)[0], logits

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = parallel.global_batch({'tokens': tokens, 'segments': segments}, mesh, rules)
        (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return jax.device_get((loss, logits, grads)), batch


@pytest.mark.parametrize('variant', ['cm3leon', 'chameleon'])
def test_mesh_parity_logits_and_gradients(variant):
    config = tiny_config(variant)
    mesh8 = parallel.create_mesh((2, 2, 2))
    model1, params1, mesh1, rules = build(config)
    model8, params8, _, _ = build(config, mesh8)
    # same values, now spread over 8 devices
    assert model8.cfg == model1.cfg
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
        np.testing.assert_array_equal(a, b)
    sharded = [x for x in jax.tree.leaves(params8) if not x.sharding.is_fully_replicated]
    assert len(sharded) >= 6
    # leave the zero-initialised output projections so every weight gets a gradient
    noise = lambda p: jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), p)
    params1, params8 = noise(params1), noise(params8)

    tokens = np.asarray(random_tokens(7, (4, 17), 500))
    segments = np.ones_like(tokens)
    segments[1, 9:] = 2  # a packed row
    segments[2, 14:] = 0  # a padded row
    (loss1, logits1, grads1), _ = _loss_and_grads(model1, params1, mesh1, rules, tokens, segments)
    (loss8, logits8, grads8), batch = _loss_and_grads(model8, params8, mesh8, rules, tokens, segments)
    assert batch['tokens'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None)
    np.testing.assert_allclose(logits8, logits1, atol=1e-5)
    np.testing.assert_allclose(loss8, loss1, atol=1e-5)
    for (path, g8), g1 in zip(jax.tree_util.tree_leaves_with_path(grads8), jax.tree.leaves(grads1)):
        assert np.abs(g1).max() > 0, path
        np.testing.assert_allclose(g8, g1, atol=1e-5, err_msg=str(path))


def test_mesh_shapes_fill_and_errors():
    assert parallel.resolve_mesh_shape((1, -1, 2), (1, 1, 1), 8) == ((1, 4, 2), (1, 1, 1))
    assert parallel.resolve_mesh_shape((2, -1, 1), (-1, 1, 1), 8, num_slices=2) == ((2, 2, 1), (2, 1, 1))
    with pytest.raises(parallel.MeshError, match=r'mesh.ici=\(2, 2, 1\) has 4 devices but there are 8'):
        parallel.resolve_mesh_shape((2, 2, 1), (1, 1, 1), 8)
    with pytest.raises(parallel.MeshError, match='at most one -1'):
        parallel.resolve_mesh_shape((-1, -1, 1), (1, 1, 1), 8)
    with pytest.raises(parallel.MeshError, match='3 entries'):
        parallel.resolve_mesh_shape((8,), (1, 1, 1), 8)
    with pytest.raises(parallel.MeshError, match='do not split evenly'):
        parallel.resolve_mesh_shape((3, -1, 1), (1, 1, 1), 8)

    mesh = parallel.create_mesh((2, -1, 2))
    assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    with pytest.raises(parallel.MeshError, match=r'asks for 2 slices but the devices form 1'):
        parallel.create_mesh((1, 4, 1), (2, 1, 1))  # one process is one slice; see test_multihost


def test_padded_vocab_divides_the_mesh():
    mesh = parallel.create_mesh((1, 2, 4))
    rules = parallel.DEFAULT_RULES
    assert parallel.axis_size(mesh, rules, 'vocab') == 4
    assert parallel.padded_vocab_size(500, mesh, rules) == 512
    assert parallel.padded_vocab_size(65_536, mesh, rules) == 65_536
    assert parallel.padded_vocab_size(1000, mesh, rules, multiple=96) % 96 == 0
    rules3 = (('vocab', 'tensor'), ('embed', None))
    mesh3 = parallel.create_mesh((1, 1, 8))
    assert parallel.padded_vocab_size(1000, mesh3, rules3, multiple=12) == 1008  # lcm(12, 8) = 24


def test_replicated_params_are_caught():
    mesh = parallel.create_mesh((1, 4, 2))
    big = jax.device_put(jnp.zeros((1024, 1024)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    split = jax.device_put(jnp.zeros((1024, 1024)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp')))
    small = jax.device_put(jnp.zeros((8,)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert parallel.check_sharding({'a': split, 'b': small}) == 0.0
    with pytest.raises(ValueError, match=r'50% of large-parameter bytes are replicated.*\(1024, 1024\)'):
        parallel.check_sharding({'a': split, 'b': big})
    # rules that leave everything unsharded are caught on a real model too
    config = tiny_config(d_model=512, num_heads=4, mlp_dim=2048, vocab_size=4096)
    config.sharding.rules = tuple((name, None) for name, _ in parallel.DEFAULT_RULES)
    _, params, _, _ = build(config, mesh)
    with pytest.raises(ValueError, match='replicated'):
        parallel.check_sharding(params, min_size=2**18)


def test_global_batch_single_process():
    mesh = parallel.create_mesh((2, 2, 2))
    rows = np.arange(8 * 6).reshape(8, 6)
    batch = parallel.global_batch({'x': rows, 'w': rows.astype(np.float32)[:, :, None]}, mesh, parallel.DEFAULT_RULES)
    assert batch['x'].shape == (8, 6) and batch['w'].shape == (8, 6, 1)
    assert batch['x'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None)
    np.testing.assert_array_equal(batch['x'], rows)


def test_distributed_init_follows_the_environment():
    assert parallel.maybe_initialize_distributed({}) is False
    with pytest.raises(ValueError, match='JAX_NUM_PROCESSES'):
        parallel.maybe_initialize_distributed({'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234'})
