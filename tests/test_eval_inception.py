"""The FID Inception-v3 port against torch-fidelity's `FeatureExtractorInceptionV3` (pool3,
2048-d, atol 1e-4 in float32) with random weights saved to a file here (nothing downloads):
the whole extractor with the TF1 resize, each block, the resize itself, and the weight-name
mapping. torch-fidelity's feature extractor needs only torch; its package __init__ imports
torchvision (which does not import beside torch 2.13 here), so the module is loaded without it
(`tests.helpers.torch_fidelity_inception`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import params as params_lib
from cm3jax.eval import inception
from tests.helpers import torch_fidelity_inception

torch = pytest.importorskip('torch')


def _random_variables(module, shape, seed):
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == 'kernel':  # He init keeps ReLU activations O(1) through the stack
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:3]))).astype(np.float32)
        if name == 'scale':
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name == 'bias':
            # Positive BatchNorm shifts keep most ReLUs open. Around 0, this random net amplifies float32
            # rounding so much that torch-fidelity's own float32 features are 1e-4 from its float64 ones.
            return rng.uniform(0.5, 1.0, leaf.shape).astype(np.float32)
        if name == 'mean':
            return rng.normal(scale=0.1, size=leaf.shape).astype(np.float32)
        return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)  # var
    return jax.tree_util.tree_map_with_path(fill, variables)


def _torch_state(variables, rng):
    state = {k: torch.tensor(v) for k, v in inception.to_state_dict(variables).items()}
    for k in [k for k in state if k.endswith('running_var')]:
        state[k.replace('running_var', 'num_batches_tracked')] = torch.tensor(0)
    state['fc.weight'] = torch.tensor(rng.normal(size=(1008, 2048)).astype(np.float32) * 0.01)
    state['fc.bias'] = torch.zeros(1008)
    return state


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A random pytorch-fid-layout weight file, with BatchNorm statistics calibrated on a batch
    (so that activations stay O(1) through all 94 layers and atol 1e-4 is a real test)."""
    m = torch_fidelity_inception()
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp('inception')
    raw = folder / 'raw.pth'
    torch.save(_torch_state(_random_variables(inception.InceptionV3(), (1, 299, 299, 3), 0), rng), raw)
    net = m.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path=str(raw))
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = 1.0  # the running statistics become this batch's
    net.train()
    with torch.no_grad():
        net(torch.tensor(rng.integers(0, 256, (6, 3, 40, 40), np.uint8)))
    net.eval()
    path = folder / inception.FILE
    torch.save(net.state_dict(), path)
    return m, net, path


def test_the_extractor_matches_torch_fidelity(weights):
    _, net, path = weights
    ext = inception.load_inception(path, resize='tf1', batch=2)
    images = np.random.default_rng(1).integers(0, 256, (3, 37, 45, 3), np.uint8)
    with torch.no_grad():
        want = net(torch.tensor(images.transpose(0, 3, 1, 2)))[0].numpy()
    got = ext(images)
    assert got.shape == (3, 2048) and want.std() > 0.05  # features of size, not vanished
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert ext.protocol['resize'] == 'tf1' and ext.protocol['weights'] == inception.FILE


def test_the_tf1_resize_matches_torch_fidelitys(weights):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = np.random.default_rng(2).uniform(0, 255, (2, 3, 17, 30)).astype(np.float32)
    want = interpolate_bilinear_2d_like_tensorflow1x(torch.tensor(x), size=(299, 299), align_corners=False).numpy()
    got = np.asarray(inception.resize_tf1(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=1e-4)


BLOCKS = [('InceptionA', (192, 32), inception.InceptionA(32), 192, 9),
          ('InceptionB', (288,), inception.InceptionB(), 288, 9),
          ('InceptionC', (768, 128), inception.InceptionC(128), 768, 5),
          ('InceptionD', (768,), inception.InceptionD(), 768, 9),
          ('InceptionE_1', (1280,), inception.InceptionE('avg'), 1280, 4),
          ('InceptionE_2', (2048,), inception.InceptionE('max'), 2048, 4)]


@pytest.mark.parametrize('name,args,block,channels,side', BLOCKS, ids=[b[0] for b in BLOCKS])
def test_each_block_matches_torch_fidelitys(weights, name, args, block, channels, side):
    ref = getattr(weights[0], name)(*args).eval()
    variables = _random_variables(block, (1, side, side, channels), len(name))
    state = {k: torch.tensor(v) for k, v in inception.to_state_dict(variables).items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing)
    x = np.random.default_rng(3).normal(size=(2, side, side, channels)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(block.apply)(variables, x))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_weight_names_and_shapes_map_both_ways():
    variables = _random_variables(inception.InceptionV3(), (1, 299, 299, 3), 5)
    state = inception.to_state_dict(variables)
    assert len(state) == 94 * 5  # 94 BasicConv2d: a conv weight and 4 BatchNorm tensors each
    assert state['Mixed_7c.branch3x3dbl_3b.conv.weight'].shape == (384, 384, 3, 1)  # OIHW, torch's (3, 1) kernel
    back = inception.from_state_dict({**state, 'fc.weight': np.zeros((1008, 2048)), 'fc.bias': np.zeros(1008),
                                      'Conv2d_1a_3x3.bn.num_batches_tracked': np.zeros(())})
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))
    bad = dict(state)
    bad['Mixed_5b.branch1x1.conv.weight'] = np.zeros((64, 192, 3, 3), np.float32)
    with pytest.raises(params_lib.WeightMismatch, match=r'Mixed_5b.branch1x1.conv.weight: shape'):
        inception.from_state_dict(bad)
    with pytest.raises(params_lib.WeightMismatch, match='tensors of the FID Inception-v3 are missing'):
        inception.from_state_dict({k: v for k, v in state.items() if not k.startswith('Mixed_7c')})
    with pytest.raises(params_lib.WeightMismatch, match='AuxLogits.conv0.conv.weight: not a tensor'):
        inception.from_state_dict({**state, 'AuxLogits.conv0.conv.weight': np.zeros((128, 768, 1, 1))})


def test_the_clean_resize_is_pil_bicubic_in_float():
    from PIL import Image
    images = np.random.default_rng(4).integers(0, 256, (2, 20, 20, 3), np.uint8)
    got = inception.resize_clean(images)
    channel = Image.fromarray(images[1, ..., 2].astype(np.float32), mode='F').resize((299, 299), Image.BICUBIC)
    np.testing.assert_array_equal(got[1, ..., 2], np.clip(np.asarray(channel), 0, 255))
    assert got.dtype == np.float32 and not np.allclose(got, np.round(got))  # not re-quantised


def test_a_missing_weight_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'pt_inception-2015-12-05-6726825d.pth; download it yourself from '
                                                r'https://github.com/mseitzer/pytorch-fid/releases'):
        inception.load_inception(tmp_path / 'nope.pth')
