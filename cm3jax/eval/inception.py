"""The Inception-v3 of FID (the TensorFlow graph ``inception-2015-12-05`` that pytorch-fid and
torch-fidelity port), in Flax, with its pool3 features (2048-d) as FID's.

The weights are the user's ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release;
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` holds the same tensors under the
same names). Nothing is downloaded: `load_inception` refuses a missing file and says where to
get it (docs/eval.md).

The network differs from torchvision's Inception-v3 as the TF graph does: average pools that do
not count padding, and max instead of average pooling in the last block's pool branch. Pixels
are scaled as the graph does, ``(x - 128) / 128``. Images reach 299 x 299 by one of two resize
protocols (`RESIZES`): 'clean' (clean-fid: PIL bicubic on each channel in float, no
re-quantisation; the default) or 'tf1' (the original TF graph's bilinear resize without
half-pixel centres and without antialiasing, which torch-fidelity reproduces).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax import params as params_lib
from cm3jax.eval.fid import FeatureExtractor

FILE = 'pt_inception-2015-12-05-6726825d.pth'
WHERE = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth '
         '(pytorch-fid\'s release of the TF FID Inception; torch-fidelity\'s weights-inception-2015-12-05-6726825d.pth '
         'works too)')
SIZE = 299
RESIZES = ('clean', 'tf1')
_HIGHEST = jax.lax.Precision.HIGHEST  # features feed a covariance: no TF32/bf16 passes on accelerators


class BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm(eps 1e-3, running statistics) + ReLU; NHWC."""
    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw), s = self.padding, self.strides
        x = nn.Conv(self.features, self.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)), use_bias=False,
                    precision=_HIGHEST, name='conv')(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
        return nn.relu(x)


def _avg_pool(x):  # TF's 3x3 average pool does not count the zero padding
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
        b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
        b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
        bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
        bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
        b7 = BasicConv(c, (1, 1), name='branch7x7_1')(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
        bd = BasicConv(c, (1, 1), name='branch7x7dbl_1')(x)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
        bd = BasicConv(c, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
        bp = BasicConv(192, (1, 1), name='branch_pool')(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
        b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
        b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(nn.Module):
    """pool: 'avg' (Mixed_7b) or 'max' (Mixed_7c, as the TF graph has it)."""
    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
        b3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], -1)
        bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], -1)
        pooled = _avg_pool(x) if self.pool == 'avg' else _max_pool(x, stride=1, pad=1)
        bp = BasicConv(192, (1, 1), name='branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
    """Float[N, H, W, 3] pixels in [0, 255] (already at 299 x 299 for FID) -> pool3 Float[N, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = (x - 128.0) / 128.0
        x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
        x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool(x)
        x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
        x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
        x = _max_pool(x)
        for name, pool in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
            x = InceptionA(pool, name=name)(x)
        x = InceptionB(name='Mixed_6a')(x)
        for name, c in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
            x = InceptionC(c, name=name)(x)
        x = InceptionD(name='Mixed_7a')(x)
        x = InceptionE('avg', name='Mixed_7b')(x)
        x = InceptionE('max', name='Mixed_7c')(x)
        return x.mean(axis=(1, 2))


# ---- weights ------------------------------------------------------------------------------------

_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'), 'running_mean': ('batch_stats', 'mean'),
       'running_var': ('batch_stats', 'var')}


def _leaf(name: str) -> tuple[str, tuple[str, ...], Any] | None:
    """A torch state-dict name -> (collection, path, torch-to-flax transform); None for tensors
    FID does not use (the 1008-way classifier, BN step counters)."""
    parts = name.split('.')
    if parts[0] == 'fc' or parts[-1] == 'num_batches_tracked':
        return None
    if parts[-2] == 'conv' and parts[-1] == 'weight':
        return 'params', tuple(parts[:-1]) + ('kernel',), lambda w: np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
    if parts[-2] == 'bn' and parts[-1] in _BN:
        collection, leaf = _BN[parts[-1]]
        return collection, tuple(parts[:-1]) + (leaf,), lambda w: w
    return ('?', (), None)


def abstract_variables():
    """The variables' shapes: {'params': ..., 'batch_stats': ...} of ShapeDtypeStructs."""
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))


def from_state_dict(state_dict: dict) -> dict:
    """pytorch-fid / torch-fidelity tensors (numpy or torch) -> {'params', 'batch_stats'} for
    `InceptionV3`. Raises `WeightMismatch` naming a missing, unexpected or misshapen tensor."""
    target = jax.tree_util.tree_flatten_with_path(abstract_variables())[0]
    want = {tuple(k.key for k in path): leaf.shape for path, leaf in target}
    out, seen = {}, set()
    for name, value in state_dict.items():
        where = _leaf(name)
        if where is None:
            continue
        collection, path, transform = where
        key = (collection,) + path
        if key not in want:
            raise params_lib.WeightMismatch(f'{name}: not a tensor of the FID Inception-v3; is this the '
                                            f'{FILE} file?')
        value = transform(np.asarray(value.numpy() if hasattr(value, 'numpy') else value, np.float32))
        if value.shape != want[key]:
            raise params_lib.WeightMismatch(f'{name}: shape {value.shape} after conversion, expected {want[key]}')
        node = out
        for p in key[:-1]:
            node = node.setdefault(p, {})
        node[key[-1]] = value
        seen.add(key)
    missing = sorted(set(want) - seen)
    if missing:
        raise params_lib.WeightMismatch(f'{len(missing)} tensors of the FID Inception-v3 are missing, e.g. '
                                        f'{".".join(missing[0][1:])}; is this the {FILE} file?')
    return out


def to_state_dict(variables) -> dict[str, np.ndarray]:
    """The inverse of `from_state_dict` (without the classifier): torch names and layouts."""
    out = {}
    back = {v: k for k, v in _BN.items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [k.key for k in path]
        collection, module, last = keys[0], keys[1:-1], keys[-1]
        value = np.asarray(leaf)
        if last == 'kernel':
            out['.'.join(module + ['weight'])] = np.transpose(value, (3, 2, 0, 1))
        else:
            out['.'.join(module + [back[(collection, last)]])] = value
    return out


# ---- resizing -----------------------------------------------------------------------------------

def _tf1_grid(n_in: int, n_out: int):
    """TF1's bilinear sample positions: ``i * n_in / n_out`` (no half-pixel offset), float32."""
    pos = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = pos.astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo.astype(np.float32))


def resize_tf1(x: jax.Array, size: int = SIZE) -> jax.Array:
    """Float[N, H, W, C] -> Float[N, size, size, C] as TF1's ``resize_bilinear(align_corners=False)``."""
    ylo, yhi, dy = _tf1_grid(x.shape[1], size)
    xlo, xhi, dx = _tf1_grid(x.shape[2], size)
    dx, dy = jnp.asarray(dx)[None, None, :, None], jnp.asarray(dy)[None, :, None, None]
    top, bottom = x[:, ylo], x[:, yhi]
    row0 = top[:, :, xlo] + (top[:, :, xhi] - top[:, :, xlo]) * dx
    row1 = bottom[:, :, xlo] + (bottom[:, :, xhi] - bottom[:, :, xlo]) * dx
    return row0 + (row1 - row0) * dy


def resize_clean(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """UInt8[N, H, W, 3] -> Float32[N, size, size, 3] as clean-fid: PIL bicubic on each channel
    in float ('F' mode, so nothing is re-quantised), clipped to [0, 255]."""
    from PIL import Image
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, img in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(img[..., c].astype(np.float32), mode='F')
            out[i, ..., c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC))
    return np.clip(out, 0.0, 255.0)


@functools.partial(jax.jit, static_argnames='tf1')
def _features(variables, x, tf1: bool):
    x = x.astype(jnp.float32)
    if tf1:
        x = resize_tf1(x)
    return InceptionV3().apply(variables, x)


def extractor(variables, resize: str = 'clean', batch: int = 32, weights: str = 'random') -> FeatureExtractor:
    """A `FeatureExtractor` of pool3 features with ``variables`` and a resize protocol."""
    if resize not in RESIZES:
        raise ValueError(f'resize={resize!r}; choose one of {RESIZES} (docs/eval.md, "Resizing")')
    variables = jax.device_put(variables)

    def fn(images: np.ndarray) -> np.ndarray:
        x = resize_clean(images) if resize == 'clean' and images.shape[1:3] != (SIZE, SIZE) else images
        n = len(x)
        if n < batch:  # one compiled program for every chunk, the last one padded
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        return np.asarray(_features(variables, x, resize == 'tf1'))[:n]
    return FeatureExtractor('inception-v3-pool3', fn, {
        'extractor': 'Inception-v3 pool3, TF FID graph 2015-12-05', 'weights': weights, 'resize': resize,
        'input': SIZE, 'features': 2048}, batch)


def load_inception(path: str | pathlib.Path, resize: str = 'clean', batch: int = 32) -> FeatureExtractor:
    """The FID extractor from the user's weight file (``.pth``, ``.safetensors`` or ``.npz`` of the
    pytorch-fid tensor names). A missing file is refused with where to get it."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f'the Inception weights {path} are missing: FID needs {FILE}; download it '
                                f'yourself from {WHERE} and pass --inception=/path/to/{FILE} (cm3jax never '
                                f'downloads weights; docs/eval.md)')
    if resize not in RESIZES:
        raise ValueError(f'resize={resize!r}; choose one of {RESIZES} (docs/eval.md, "Resizing")')
    if path.suffix == '.npz':
        with np.load(path) as f:
            state = {k: f[k] for k in f.files}
    else:
        state = params_lib.load_state_dict(path)
    return extractor(from_state_dict(state), resize, batch, weights=path.name)
