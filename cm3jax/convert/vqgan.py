"""VQ-GAN weights from PyTorch layouts -> `cm3jax.vq.model.VQGAN` params, and back (`to_torch`).

Layouts (``layout=``):
- ``'taming'``: taming-transformers' ``VQModel`` (``encoder.*``, ``decoder.*``, ``quant_conv``,
  ``quantize.embedding``, ``post_quant_conv``). Meta's Chameleon ``vqgan.ckpt`` and
  transformers' ``ChameleonVQVAE`` (encoder only; transformers ships no decoder) use it too.
- ``'janus'``: transformers' ``JanusVQVAE`` (LlamaGen's VQ-16): the same names, but the
  decoder lists its levels from the lowest resolution up.

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors: plain tensors, never
arbitrary pickled objects. Every tensor is checked against the config's shapes first, and a
mismatch names the tensor and both shapes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.params import WeightMismatch
from cm3jax.vq.model import VQConfig, VQGAN

# prefixes under which the tokenizer sits in larger checkpoints
PREFIXES = ('model.vqmodel.', 'vqmodel.', 'first_stage_model.', 'model.')
IGNORED = re.compile(r'^(loss\.|discriminator\.)')  # taming's training-only parts


def _target_name(name: str, levels: int, layout: str) -> tuple[str, ...] | None:
    """'encoder.down.0.block.1.conv1.weight' -> ('encoder', 'down_0_block_1', 'conv1', 'kernel')."""
    parts = name.split('.')
    leaf = {'weight': 'kernel', 'bias': 'bias'}[parts[-1]]
    path = parts[:-1]
    if path[0] in ('encoder', 'decoder') and path[1] in ('down', 'up'):
        level = int(path[2])
        if layout == 'janus' and path[0] == 'decoder':
            level = levels - 1 - level
        if path[3] in ('block', 'attn'):
            path = [path[0], f'{path[1]}_{level}_{path[3]}_{path[4]}', *path[5:]]
        else:  # downsample.conv / upsample.conv
            path = [path[0], f'{path[1]}_{level}_{path[3]}']
    elif path[0] in ('encoder', 'decoder') and path[1] == 'mid':
        path = [path[0], f'mid_{path[2]}', *path[3:]]
    elif path[0] == 'quantize':
        return ('quantize', 'embedding')
    if 'norm' in path[-1] and leaf == 'kernel':
        leaf = 'scale'
    return (*path, leaf)


def _convert(value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if value.ndim == 4 and len(target_shape) == 4:  # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 4 and len(target_shape) == 2:  # 1x1 conv as Dense: [O, I, 1, 1] -> [I, O]
        return value[:, :, 0, 0].T
    return value


def from_torch(state_dict: dict, cfg: VQConfig, layout: str = 'taming') -> dict:
    """Convert a state dict (numpy or torch tensors) to params for ``VQGAN(cfg)``.

    Parts the file lacks (e.g. the decoder of transformers' ChameleonVQVAE) are left out; the
    other methods (``encode``) work without them. Raises `WeightMismatch` when a tensor's shape
    does not fit ``cfg``, or when the file holds a tensor the model has no place for.
    """
    if layout not in ('taming', 'janus'):
        raise ValueError(f"layout={layout!r} is unknown; use 'taming' or 'janus'")
    shapes = jax.eval_shape(VQGAN(cfg).init, jax.random.key(0), jnp.zeros((1, cfg.resolution, cfg.resolution,
                                                                           cfg.in_channels)))['params']
    flat_shapes = {tuple(getattr(k, 'key', k) for k in path): leaf.shape
                   for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    params: dict = {}
    for name, value in state_dict.items():
        for prefix in PREFIXES:
            if name.startswith(prefix) and name[len(prefix):].split('.')[0] in (
                    'encoder', 'decoder', 'quant_conv', 'post_quant_conv', 'quantize'):
                name = name[len(prefix):]
                break
        if IGNORED.match(name):
            continue
        value = np.asarray(value.detach().cpu().numpy() if hasattr(value, 'detach') else value, np.float32)
        target = _target_name(name, len(cfg.ch_mult), layout)
        if target not in flat_shapes:
            raise WeightMismatch(f'{name!r} (shape {value.shape}) has no place in a tokenizer with this config '
                                 f'(looked for {"/".join(target)}); check ch_mult, num_res_blocks and '
                                 f'attn_resolutions against the checkpoint')
        value = _convert(value, flat_shapes[target])
        if value.shape != flat_shapes[target]:
            raise WeightMismatch(f'{name!r} has shape {value.shape} (after layout conversion) but the config '
                                 f'needs {flat_shapes[target]} for {"/".join(target)}; e.g. num_codes={cfg.num_codes}, '
                                 f'embed_dim={cfg.embed_dim}, z_channels={cfg.z_channels}, ch={cfg.ch}')
        node = params
        for key in target[:-1]:
            node = node.setdefault(key, {})
        node[target[-1]] = jnp.asarray(value)
    return params


def _source_name(path: tuple[str, ...]) -> str:
    """The inverse of `_target_name` for the taming layout:
    ('encoder', 'down_0_block_1', 'conv1', 'kernel') -> 'encoder.down.0.block.1.conv1.weight'."""
    if path == ('quantize', 'embedding'):
        return 'quantize.embedding.weight'
    *parts, leaf = path
    out = []
    for part in parts:
        pieces = part.split('_')
        if pieces[0] in ('down', 'up') and len(pieces) >= 3 and pieces[1].isdigit():
            if pieces[2] in ('block', 'attn'):
                out += [pieces[0], pieces[1], pieces[2], *pieces[3:]]
            else:  # down_0_downsample -> down.0.downsample.conv
                out += [pieces[0], pieces[1], '_'.join(pieces[2:]), 'conv']
        elif pieces[0] == 'mid':  # mid_block_1 -> mid.block_1
            out += ['mid', '_'.join(pieces[1:])]
        else:
            out.append(part)
    return '.'.join(out + ['bias' if leaf == 'bias' else 'weight'])


def to_torch(params: dict, parts: tuple[str, ...] = ('encoder', 'decoder', 'quant_conv', 'post_quant_conv',
                                                     'quantize')) -> dict[str, np.ndarray]:
    """`VQGAN` params -> a taming-layout state dict (numpy float32) of the top-level ``parts``
    (transformers' ``ChameleonVQVAE`` holds all but the decoder). `from_torch` inverts it."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(getattr(k, 'key', k) for k in path)
        if path[0] not in parts:
            continue
        value = np.asarray(leaf, np.float32)
        if value.ndim == 4:    # HWIO -> OIHW
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2 and path[0] != 'quantize':  # a 1x1 conv kept as Dense [I, O] -> [O, I, 1, 1]
            value = value.T[:, :, None, None]
        out[_source_name(path)] = np.ascontiguousarray(value)
    return out


def hf_vq_config(cfg: VQConfig) -> dict:
    """VQConfig -> transformers' ``ChameleonVQVAEConfig`` fields (`config_from_hf` inverts it)."""
    if cfg.local_encoder or cfg.l2_normalize:
        raise ValueError('this tokenizer (local_encoder / l2_normalize) has no transformers ChameleonVQVAE equivalent')
    return {'embed_dim': cfg.embed_dim, 'num_embeddings': cfg.num_codes, 'double_latent': False,
            'latent_channels': cfg.z_channels, 'resolution': cfg.resolution, 'in_channels': cfg.in_channels,
            'base_channels': cfg.ch, 'channel_multiplier': list(cfg.ch_mult), 'num_res_blocks': cfg.num_res_blocks,
            'attn_resolutions': list(cfg.attn_resolutions), 'dropout': 0.0, 'attn_type': 'vanilla'}


def config_from_taming(ddconfig: dict, n_embed: int, embed_dim: int) -> VQConfig:
    """taming's ``VQModel(ddconfig, n_embed, embed_dim)`` arguments -> VQConfig."""
    if ddconfig.get('double_z'):
        raise ValueError('ddconfig.double_z=True is a KL autoencoder, not a VQ-GAN')
    return VQConfig(resolution=ddconfig['resolution'], in_channels=ddconfig['in_channels'],
                    out_channels=ddconfig['out_ch'], ch=ddconfig['ch'], ch_mult=tuple(ddconfig['ch_mult']),
                    num_res_blocks=ddconfig['num_res_blocks'], attn_resolutions=tuple(ddconfig['attn_resolutions']),
                    z_channels=ddconfig['z_channels'], embed_dim=embed_dim, num_codes=n_embed)


def config_from_hf(hf_config) -> VQConfig:
    """transformers' ``ChameleonVQVAEConfig`` or ``JanusVQVAEConfig`` -> VQConfig."""
    levels = len(hf_config.channel_multiplier)
    if getattr(hf_config, 'double_latent', False):
        raise ValueError('double_latent=True is not a VQ-GAN encoder cm3jax supports')
    if hf_config.model_type.startswith('janus'):
        latent = hf_config.num_patches
        resolution = latent * 2 ** (levels - 1)
        attn, l2 = (latent,), True  # attention at the lowest level; codes l2-normalised at decode
    else:
        resolution = hf_config.resolution
        attn, l2 = tuple(hf_config.attn_resolutions or ()), False
    return VQConfig(resolution=resolution, in_channels=hf_config.in_channels,
                    out_channels=getattr(hf_config, 'out_channels', hf_config.in_channels),
                    ch=hf_config.base_channels, ch_mult=tuple(hf_config.channel_multiplier),
                    num_res_blocks=hf_config.num_res_blocks, attn_resolutions=attn,
                    z_channels=hf_config.latent_channels, embed_dim=hf_config.embed_dim,
                    num_codes=hf_config.num_embeddings, l2_normalize=l2)
