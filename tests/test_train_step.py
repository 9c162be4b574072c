"""The train step: optimizer and schedules, mesh parity, gradient accumulation, the NaN guard."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

from cm3jax import parallel
from cm3jax.errors import ConfigError
from cm3jax.lm import task as lm_task
from cm3jax.model import transformer
from cm3jax.data import synthetic
from cm3jax.train import optim, state as state_lib, step as step_lib
from cm3jax.train.loss import means, token_stats
from tests.helpers import build, tiny_config

OPTIM = optim.OptimConfig(learning_rate=1e-2, warmup_steps=2, decay_steps=20, final_lr_fraction=0.1)


def test_schedules_warm_up_then_decay_to_the_final_fraction():
    for kind in ('linear', 'cosine', 'exponential'):
        lr = optim.schedule(dataclasses.replace(OPTIM, schedule=kind))
        np.testing.assert_allclose([lr(0), lr(1), lr(2)], [0.0, 5e-3, 1e-2], rtol=1e-6)
        np.testing.assert_allclose(lr(22), 1e-3, rtol=1e-5)  # 2 warmup + 20 decay steps
        assert lr(12) < 1e-2
    constant = optim.schedule(dataclasses.replace(OPTIM, schedule='constant'))
    assert float(constant(1000)) == pytest.approx(1e-2)
    np.testing.assert_allclose(optim.schedule(OPTIM)(12), 1e-2 - 0.5 * 9e-3, rtol=1e-5)  # linear midpoint


def test_optim_config_from_config_fills_decay_and_rejects_bad_values():
    config = tiny_config()
    cfg = optim.OptimConfig.from_config(config.optim, total_steps=300)
    assert (cfg.b1, cfg.b2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.decay_steps == 300 - config.optim.warmup_steps
    config.optim.schedule = 'step'
    with pytest.raises(ConfigError, match='optim.schedule'):
        optim.OptimConfig.from_config(config.optim, 300)


def test_weight_decay_reaches_matrices_only():
    _, params, _, _ = build(tiny_config('chameleon'))
    mask = optim.decay_mask(params)
    assert mask['embed'] and mask['lm_head'] and mask['layers']['attn']['wq'] and mask['layers']['mlp']['wo']
    # stacked per-layer norm gains are 2-D and 3-D, yet vectors per layer: no decay
    assert not mask['layers']['attn_norm']['scale'] and not mask['layers']['attn']['q_norm']['scale']
    assert not mask['layers']['attn']['q_norm']['bias'] and not mask['final_norm']['scale']

    opt = optim.make_optimizer(dataclasses.replace(OPTIM, weight_decay=0.5, warmup_steps=0))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, opt_state = jax.jit(opt.update)(zero_grads, jax.jit(opt.init)(params), params)
    # with zero gradients only decayed leaves move
    assert float(jnp.abs(updates['embed']).max()) > 0
    assert float(jnp.abs(updates['final_norm']['scale']).max()) == 0
    # update n uses the rate of step n (1-based): no zero-rate first step under warmup
    assert float(optim.current_learning_rate(opt_state)) == pytest.approx(1e-2 - 9e-3 / 20)
    opt = optim.make_optimizer(OPTIM)
    opt_state = jax.jit(opt.init)(params)
    for step in (1, 2, 3):
        _, opt_state = jax.jit(opt.update)(zero_grads, opt_state, params)
        assert float(optim.current_learning_rate(opt_state)) == pytest.approx(float(optim.schedule(OPTIM)(step)))


def test_muon_orthogonalises_the_hidden_matrices_and_leaves_the_rest_to_adamw():
    _, params, _, _ = build(tiny_config('chameleon'))
    dims = transformer.muon_dims(params)
    assert dims['layers']['attn']['wq'] == MuonDimensionNumbers(1, (2, 3))   # [L, embed, heads, head_dim]
    assert dims['layers']['attn']['wo'] == MuonDimensionNumbers((1, 2), 3)
    assert dims['layers']['mlp']['wg'] == MuonDimensionNumbers(1, 2)
    assert dims['embed'] is None and dims['lm_head'] is None and dims['layers']['attn']['q_norm']['scale'] is None

    cfg = dataclasses.replace(OPTIM, name='muon', warmup_steps=0, weight_decay=0.0)
    opt = optim.make_optimizer(cfg, muon_dims=transformer.muon_dims)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
    updates, opt_state = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    assert float(optim.current_learning_rate(opt_state)) == pytest.approx(1e-2 - 9e-3 / 20)
    # each layer's [embed, heads * head_dim] update is near-orthogonal: its singular values agree
    # (five Newton-Schulz steps leave the smallest few of a square matrix behind)
    def spread(m):
        sv = np.linalg.svd(m.reshape(m.shape[0], -1), compute_uv=False)
        return np.quantile(sv, 0.1) / sv.max()
    for layer in np.asarray(updates['layers']['attn']['wq']):
        assert spread(layer) > 0.5
    assert spread(np.asarray(grads['layers']['attn']['wq'][0])) < 0.3  # a random gradient's spread far wider
    # AdamW's first (Nesterov) step moves every entry of the embedding by the same amount, of the order of the rate
    step = np.abs(np.asarray(updates['embed']))
    assert 0.5 < step.mean() / (1e-2 - 9e-3 / 20) < 2 and step.std() < 0.01 * step.mean()

    with pytest.raises(ConfigError, match='optim.name=muon'):
        optim.make_optimizer(cfg)
    with pytest.raises(ConfigError, match="optim.name='sgd'"):
        dataclasses.replace(OPTIM, name='sgd').validate()


def test_token_stats_split_groups_and_add_up():
    logits = jax.random.normal(jax.random.key(0), (2, 6, 11))
    targets = jax.random.randint(jax.random.key(1), (2, 6), 0, 11)
    weights = jnp.array([[1, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1]], jnp.float32)
    text = targets < 5
    loss_sum, stats = token_stats(logits, targets, weights, z_loss=1e-3, groups={'text': text, 'image': ~text})
    m = means(stats)
    nll = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(6)[None], targets]
    for name, mask in (('text', text), ('image', ~text)):
        w = weights * mask
        np.testing.assert_allclose(m[f'{name}/nll'], (w * nll).sum() / w.sum(), rtol=1e-6)
    # the groups partition the tokens, so their weighted sums give the whole
    total = stats['text/nll'][0] + stats['image/nll'][0]
    np.testing.assert_allclose(total, stats['nll'][0], rtol=1e-6)
    assert float(stats['loss'][1]) == 10 and float(loss_sum) == pytest.approx(float(stats['loss'][0]))


def _lm_setup(mesh=None, variant='cm3leon', batch=8, seq_len=32):
    """A tiny LM state and a synthetic batch. The optimizer is SGD: Adam's first step maps
    gradients to about +-lr whatever their size, so near-zero gradients (zero-initialised
    output layers) that differ by rounding would give updates that differ by up to 2 lr."""
    config = tiny_config(variant)
    model, _, mesh, rules = build(config, mesh)
    opt = optax.sgd(0.5)
    init_fn = lambda rng, x: model.init(rng, x)['params']
    args = (jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    state = state_lib.init_state(init_fn, opt, mesh, rules, *args)
    target = state_lib.abstract_state(init_fn, opt, mesh, rules, *args)
    task = synthetic.SyntheticTask(max_len=6)
    local = next(synthetic.SyntheticBatches(task, batch, seq_len, seed=3))
    loss_fn = lm_task.lm_loss_fn(model, z_loss=1e-4, group_fn=lambda b: {'answer': b['answer']})
    return mesh, rules, state, target, local, loss_fn, opt


def _run_step(mesh, rules, state, target, local, loss_fn, opt, microbatches=1):
    step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, opt, microbatches),
                                   state_lib.shardings_of(target),
                                   parallel.logical_sharding(mesh, rules, ('act_batch', 'act_len')))
    with jax.set_mesh(mesh):
        batch = parallel.global_batch(local, mesh, rules)
        new, metrics = step(state, batch, jax.random.key(0))
        return jax.device_get(new), jax.device_get(metrics)


@pytest.mark.parametrize('variant', ['cm3leon', 'chameleon'])
def test_one_step_on_the_2x2x2_mesh_equals_one_device(variant):
    one = _run_step(*_lm_setup(variant=variant))
    mesh = parallel.create_mesh((2, 2, 2))
    setup = _lm_setup(mesh, variant)
    assert setup[2]['params']['embed'].sharding.mesh.shape == {'data': 2, 'fsdp': 2, 'tensor': 2}
    before = jax.device_get(setup[2]['params'])
    eight = _run_step(*setup)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(eight[0]['params']), jax.tree.leaves(before)))
    assert moved > 1e-3
    np.testing.assert_allclose(eight[1]['loss'], one[1]['loss'], atol=1e-5)
    np.testing.assert_allclose(eight[1]['grad_norm'], one[1]['grad_norm'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), eight[0]['params'], one[0]['params'])
    assert int(eight[0]['step']) == 1


def test_four_microbatches_equal_the_full_batch():
    setup = _lm_setup(parallel.create_mesh((2, 2, 2)), batch=16)
    full_state, full = _run_step(*setup)
    setup = _lm_setup(parallel.create_mesh((2, 2, 2)), batch=16)
    acc_state, acc = _run_step(*setup, microbatches=4)
    for key in ('loss', 'accuracy', 'answer/nll', 'grad_norm', 'tokens'):
        np.testing.assert_allclose(acc[key], full[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), acc_state['params'], full_state['params'])


def test_a_nan_batch_leaves_the_state_untouched_and_names_the_step():
    params = {'w': jnp.ones((3, 2))}
    opt = optim.make_optimizer(OPTIM)
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': opt.init(params)}

    def loss_fn(params, batch, rng):
        err = ((batch['x'] @ params['w'] - batch['y']) ** 2).sum()
        return err, {'loss': (err, jnp.float32(batch['x'].shape[0]))}

    step = jax.jit(step_lib.make_train_step(loss_fn, opt))
    good = {'x': jnp.ones((4, 3)), 'y': jnp.zeros((4, 2))}
    new, metrics = step(state, good, jax.random.key(0))
    assert bool(metrics['finite/loss']) and int(new['step']) == 1
    step_lib.check_finite(jax.device_get(metrics), 1)

    bad = {'x': good['x'].at[0, 0].set(jnp.nan), 'y': good['y']}
    after, metrics = step(new, bad, jax.random.key(0))
    assert not bool(metrics['finite/loss']) and not bool(metrics['finite/grads'])
    jax.tree.map(np.testing.assert_array_equal, after, new)
    with pytest.raises(step_lib.NonFiniteError, match=r'step 7: the loss and the grads became NaN/inf'):
        step_lib.check_finite(jax.device_get(metrics), 7)


def test_split_microbatches_interleaves_rows():
    x = jnp.arange(8)[:, None]
    np.testing.assert_array_equal(step_lib.split_microbatches(x, 4)[1, :, 0], [1, 5])
    with pytest.raises(ValueError, match='does not split into 3'):
        step_lib.split_microbatches(x, 3)
