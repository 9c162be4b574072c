"""VQ-GAN losses: the PatchGAN against taming-transformers, GAN losses, weights, entropy, LPIPS-style loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax.vq import losses


def _param_count(tree):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- reconstruction

def test_reconstruction_loss_l1_l2():
    x = jnp.array([0.5, -1.0, 1.0, 0.0]).reshape(1, 2, 2, 1)
    x_rec = jnp.array([0.0, -1.0, 0.0, 0.5]).reshape(1, 2, 2, 1)
    l1 = jax.jit(losses.reconstruction_loss, static_argnames='kind')
    assert float(l1(x, x_rec)) == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)
    assert float(l1(x, x_rec, kind='l2')) == pytest.approx((0.25 + 0 + 1 + 0.25) / 4)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        losses.reconstruction_loss(x, x_rec, kind='l3')


# ----------------------------------------------------------------------------- discriminator

@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('n_layers', [2, 3])
@pytest.mark.parametrize('norm', ['group', 'none'])
def test_discriminator_output_shape(size, n_layers, norm):
    disc = losses.NLayerDiscriminator(ndf=8, n_layers=n_layers, norm=norm)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    params = jax.eval_shape(disc.init, jax.random.key(0), x)
    out = jax.eval_shape(disc.apply, params, x)
    side = size
    for _ in range(n_layers):  # torch: floor((H + 2 - 4) / 2) + 1
        side = (side + 2 - 4) // 2 + 1
    side = (side + 2 - 4) + 1  # the two stride-1 convs: H + 2 - 4 + 1 each
    side = (side + 2 - 4) + 1
    assert out.shape == (2, side, side, 1) == (2, size // 2**n_layers - 2, size // 2**n_layers - 2, 1)


def test_discriminator_params_and_forward():
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    # ndf=64, 3 layers: convs 3->64->128->256->512->1 (4x4 kernels, with bias), as taming minus BatchNorm.
    expected = sum(16 * i * o + o for i, o in [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1)])
    assert expected == 2_764_737
    none = jax.eval_shape(losses.NLayerDiscriminator(norm='none').init, jax.random.key(0), x)
    group = jax.eval_shape(losses.NLayerDiscriminator(norm='group').init, jax.random.key(0), x)
    assert _param_count(none) == expected
    assert _param_count(group) == expected + 2 * (128 + 256 + 512)  # GroupNorm scale and bias
    disc = losses.NLayerDiscriminator(ndf=16, norm='group')
    params = jax.jit(disc.init)(jax.random.key(0), x)
    logits = jax.jit(disc.apply)(params, x)
    assert logits.shape == (2, 2, 2, 1) and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="'group' or 'none'"):
        losses.NLayerDiscriminator(norm='batch').init(jax.random.key(0), x)


def test_discriminator_matches_taming():
    torch = pytest.importorskip('torch')
    taming = pytest.importorskip('taming.modules.discriminator.model')
    torch.manual_seed(0)
    # use_actnorm=True is taming's layer stack with biased convs; ActNorm -> Identity gives norm='none'.
    ref = taming.NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3, use_actnorm=True)
    convs = [m for m in ref.main if isinstance(m, torch.nn.Conv2d)]
    for i, m in enumerate(ref.main):
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.LeakyReLU)):
            ref.main[i] = torch.nn.Identity()
    for m in convs:  # taming's default init leaves biases near 0; make them matter
        torch.nn.init.normal_(m.bias, std=0.1)
    params = {'params': {f'Conv_{i}': {'kernel': jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),
                                       'bias': jnp.asarray(m.bias.detach().numpy())}
                         for i, m in enumerate(convs)}}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
    disc = losses.NLayerDiscriminator(ndf=8, n_layers=3, norm='none')
    init_shapes = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    assert jax.tree.map(jnp.shape, init_shapes) == jax.tree.map(jnp.shape, params)
    got = jax.jit(disc.apply)(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert got.shape == expected.shape == (2, 2, 2, 1)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


# ----------------------------------------------------------------------------- adversarial losses

def test_hinge_vanilla_and_generator_losses():
    real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
    fake = jnp.array([-2.0, 0.0])  # relu(1 + fake) = 0, 1
    hinge = jax.jit(losses.hinge_d_loss)(real, fake)
    assert float(hinge) == pytest.approx(0.5 * (2.5 / 3 + 1 / 2))
    softplus = lambda v: math.log1p(math.exp(v))
    vanilla = jax.jit(losses.vanilla_d_loss)(real, fake)
    expected = 0.5 * (sum(softplus(-r) for r in [2.0, 0.5, -1.0]) / 3 + sum(softplus(f) for f in [-2.0, 0.0]) / 2)
    assert float(vanilla) == pytest.approx(expected, rel=1e-6)
    assert float(jax.jit(losses.generator_adversarial_loss)(fake)) == pytest.approx(1.0)


def test_adopt_weight_under_jit():
    adopt = jax.jit(losses.adopt_weight)
    assert [float(adopt(0.8, step, 100)) for step in (0, 99, 100, 5000)] == pytest.approx([0, 0, 0.8, 0.8])
    steps = jnp.arange(4)
    np.testing.assert_allclose(jax.jit(jax.vmap(losses.adopt_weight, (None, 0, None)))(2.0, steps, 2), [0, 0, 2, 2])


def test_adaptive_weight_is_the_clipped_ratio_of_gradient_norms():
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    w = rng.normal(size=(3, 2))
    nll_fn = lambda k: jnp.mean((jnp.asarray(x) @ k - t) ** 2)
    g_fn = lambda k: -5.0 * jnp.mean(jnp.asarray(x) @ k)
    # By hand: d/dW mean((xW - t)^2) = 2/N x^T (xW - t); d/dW -5 mean(xW) = -5/N x^T 1, N = 8 outputs.
    nll_grad = 2 / 8 * x.T @ (x @ w - t)
    g_grad = -5 / 8 * x.T @ np.ones((4, 2))
    expected = np.linalg.norm(nll_grad) / (np.linalg.norm(g_grad) + 1e-4)
    got = jax.jit(lambda k: losses.adaptive_weight(nll_fn, g_fn, k))(jnp.asarray(w))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # A generator loss with no gradient at the last layer: the ratio explodes and is clipped.
    flat = jax.jit(lambda k: losses.adaptive_weight(lambda v: 1e3 * nll_fn(v), lambda v: 0.0 * v.sum(), k))(w)
    assert float(flat) == 1e4
    # stop_gradient: the weight is a constant to the outer gradient, as taming's .detach().
    outer = jax.jit(jax.grad(lambda s: losses.adaptive_weight(lambda k: s * nll_fn(k), g_fn, jnp.asarray(w))))
    assert float(outer(2.0)) == 0.0


# ----------------------------------------------------------------------------- entropy

def test_entropy_penalty_prefers_diverse_confident_codes():
    k = 8
    penalty = jax.jit(losses.entropy_penalty)
    diverse = 100.0 * (1 - jnp.eye(k))  # sample i is confidently at code i
    collapsed = 100.0 * jnp.ones((k, k)).at[:, 0].set(0.0)  # every sample at code 0
    unsure = jnp.zeros((k, k))  # every sample uniform over the codes
    loss_d, stats_d = penalty(diverse)
    loss_c, stats_c = penalty(collapsed)
    loss_u, _ = penalty(unsure)
    assert float(loss_d) < float(loss_c) and float(loss_d) < float(loss_u)
    assert float(loss_d) == pytest.approx(-math.log(k), abs=1e-3)
    assert float(loss_c) == pytest.approx(0.0, abs=1e-3) and float(loss_u) == pytest.approx(0.0, abs=1e-3)
    assert float(stats_d['perplexity']) == pytest.approx(k, rel=1e-3)
    assert float(stats_c['perplexity']) == pytest.approx(1.0, rel=1e-3)
    # [..., K] inputs are flattened; the gradient is finite even for a saturated assignment.
    loss_4d, _ = penalty(diverse.reshape(2, 2, 2, k))
    assert float(loss_4d) == pytest.approx(float(loss_d))
    grad = jax.jit(jax.grad(lambda d: losses.entropy_penalty(d, temperature=0.5)[0]))(collapsed)
    assert bool(jnp.all(jnp.isfinite(grad)))


# ----------------------------------------------------------------------------- perceptual

def _tiny_feature_net():
    """Two random 3x3 convs with ReLU; returns both activations (a stand-in for VGG)."""
    rng = np.random.default_rng(3)  # numpy: eager jax.random ops would each compile
    w1 = jnp.asarray(rng.normal(size=(3, 3, 3, 8)) * 0.3, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) * 0.2, jnp.float32)
    conv = lambda h, w, s: jax.lax.conv_general_dilated(h, w, (s, s), 'SAME',
                                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    def feature_fn(images):
        f1 = jax.nn.relu(conv(images, w1, 1))
        return [f1, jax.nn.relu(conv(f1, w2, 2))]
    return feature_fn


def _reference_perceptual(feats, feats_rec, weights):
    total = 0.0
    for f, g, w in zip(feats, feats_rec, weights):
        f, g = np.asarray(f, np.float64), np.asarray(g, np.float64)
        f = f / (np.sqrt((f**2).sum(-1, keepdims=True)) + 1e-10)
        g = g / (np.sqrt((g**2).sum(-1, keepdims=True)) + 1e-10)
        total = total + (((f - g) ** 2) * np.asarray(w)).sum(-1).mean((1, 2))
    return total.mean()


def test_perceptual_loss():
    feature_fn = _tiny_feature_net()
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    x_rec = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    loss = jax.jit(lambda a, b, w: losses.perceptual_loss(feature_fn, a, b, w))
    ones = [1.0, 1.0]
    # Not bit-exact 0: XLA may fuse the two feature passes differently and round differently.
    assert float(loss(x, x, ones)) == pytest.approx(0.0, abs=1e-12)
    value = float(loss(x, x_rec, ones))
    assert value > 0
    feats, feats_rec = jax.jit(feature_fn)(x), jax.jit(feature_fn)(x_rec)
    assert value == pytest.approx(_reference_perceptual(feats, feats_rec, ones), rel=1e-5)
    assert float(jax.jit(lambda a, b: losses.perceptual_loss(feature_fn, a, b))(x, x_rec)) == pytest.approx(value)
    # Per-channel weights (LPIPS's linear heads); weight 0 switches a layer off.
    channel_w = [jnp.linspace(0, 1, 8), 0.0]
    expected = _reference_perceptual(feats, feats_rec, channel_w)
    assert float(loss(x, x_rec, channel_w)) == pytest.approx(expected, rel=1e-5)
    # It is the passed feature network that is compared: a blind one sees no difference.
    blind = lambda images: [jnp.zeros(images.shape[:3] + (4,))]
    assert float(jax.jit(lambda a, b: losses.perceptual_loss(blind, a, b))(x, x_rec)) == 0.0
    # Finite gradients although ReLU features contain all-zero vectors (the norm is safe at 0).
    grad = jax.jit(jax.grad(lambda b: losses.perceptual_loss(feature_fn, x, b)))(x_rec)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0
    blind_grad = jax.jit(jax.grad(lambda b: losses.perceptual_loss(lambda im: [jax.nn.relu(im - 2)], x, b)))(x_rec)
    assert bool(jnp.all(jnp.isfinite(blind_grad)))
    with pytest.raises(ValueError, match='1 layer weights for 2 feature maps'):
        losses.perceptual_loss(feature_fn, x, x_rec, [1.0])
