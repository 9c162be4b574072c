"""Chameleon checkpoints on disk, in both released layouts, read one tensor at a time.

    source = read_source(src, layout='hf' | 'meta')
    source.config        # ChameleonConfig-like fields (`chameleon.model_fields_from_hf_config` reads it)
    source.state_dict    # HF names -> lazy tensors: each is read (and, for Meta, permuted) when
                         # `np.asarray` asks, so `chameleon.from_hf` streams through it
    source.tokenizer, source.vqgan_ckpt, source.vqgan_yaml   # paths (the VQ-GAN's may be None)

- HF (``save_pretrained``): ``config.json``, ``model.safetensors`` or ``model-0000N-of-M.safetensors``
  (or ``pytorch_model*.bin``), ``tokenizer.json``. transformers ships only the VQ encoder, so
  the VQ-GAN comes from Meta's ``vqgan.ckpt`` + ``vqgan.yaml``, if they are copied beside it (or
  into ``tokenizer/``).
- Meta: ``models/<size>/consolidated.pth`` or ``consolidated.NN.pth`` (model-parallel shards)
  + ``params.json``, and ``tokenizer/text_tokenizer.json``, ``tokenizer/vqgan.ckpt``,
  ``tokenizer/vqgan.yaml``. Its q/k projections rotate *interleaved* RoPE pairs; cm3jax (like HF)
  rotates halves, so each head's rows are permuted: q over ``n_heads``, k over ``n_kv_heads``
  (GQA). Its QK-norm is one LayerNorm over head_dim per model-parallel shard, repeated over the
  shard's heads (with the same permutation) into HF's per-head ``[H, head_dim]``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
from typing import Any, Callable

import numpy as np

from cm3jax.errors import ConfigError

LAYOUTS = ('hf', 'meta')
HF_DEFAULTS = dict(hidden_act='silu', attention_bias=False, mlp_bias=False, swin_norm=False, tie_word_embeddings=False,
                   rope_parameters=None, rope_scaling=None, rope_theta=10_000.0, num_key_value_heads=None)


class Lazy:
    """A tensor read when `np.asarray` asks for it (float32 numpy; bfloat16 files go through torch)."""

    def __init__(self, read: Callable[[], np.ndarray], shape: tuple[int, ...]):
        self._read, self.shape = read, tuple(shape)

    def __array__(self, dtype=None, copy=None):
        out = self._read()
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclasses.dataclass
class Source:
    config: Any  # types.SimpleNamespace of ChameleonConfig fields
    state_dict: dict[str, Lazy]
    tokenizer: pathlib.Path
    vqgan_ckpt: pathlib.Path | None
    vqgan_yaml: pathlib.Path | None
    layout: str


def _to_numpy(t) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def _torch_file(path: pathlib.Path) -> dict:
    import torch
    state = torch.load(str(path), map_location='cpu', weights_only=True, mmap=True)
    return state.get('state_dict', state)


def _hf_tensors(src: pathlib.Path) -> dict[str, Lazy]:
    files = sorted(src.glob('model*.safetensors'))
    out: dict[str, Lazy] = {}
    if files:
        from safetensors import safe_open
        for path in files:
            handle = safe_open(str(path), framework='pt')  # bfloat16 files: numpy has no such dtype
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                out[key] = Lazy(lambda h=handle, k=key: _to_numpy(h.get_tensor(k)), shape)
        return out
    files = sorted(src.glob('pytorch_model*.bin'))
    if not files:
        raise FileNotFoundError(f'{src} holds no model.safetensors* or pytorch_model*.bin: point --src at the folder '
                                f'`save_pretrained` wrote (or pass --layout=meta for Meta\'s consolidated.*.pth)')
    for path in files:
        for key, t in _torch_file(path).items():
            out[key] = Lazy(lambda t=t: _to_numpy(t), tuple(t.shape))
    return out


def _vqgan_files(*folders: pathlib.Path) -> tuple[pathlib.Path | None, pathlib.Path | None]:
    for folder in folders:
        ckpt = folder / 'vqgan.ckpt'
        if ckpt.is_file():
            yaml = folder / 'vqgan.yaml'
            if not yaml.is_file():
                raise FileNotFoundError(f'{ckpt} has no vqgan.yaml beside it: copy the vqgan.yaml of the release '
                                        f'to {yaml} (it holds the VQ-GAN\'s shape)')
            return ckpt, yaml
    return None, None


def read_hf(src: pathlib.Path) -> Source:
    path = src / 'config.json'
    if not path.is_file():
        raise FileNotFoundError(f'{path} is missing: point --src at an HF Chameleon folder (or pass --layout=meta)')
    fields = json.loads(path.read_text())
    fields = fields.get('text_config', fields) if 'hidden_size' not in fields else fields
    config = types.SimpleNamespace(**{**HF_DEFAULTS, **fields})
    tokenizer = src / 'tokenizer.json'
    if not tokenizer.is_file():
        raise FileNotFoundError(f'{tokenizer} is missing: the folder needs the tokenizer.json released with the '
                                f'weights')
    return Source(config, _hf_tensors(src), tokenizer, *_vqgan_files(src, src / 'tokenizer'), layout='hf')


# ---- Meta's layout --------------------------------------------------------------------------------

def interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows [heads * hd, ...] rotating pairs (2i, 2i+1) -> rows rotating (i, i + hd/2), per head."""
    hd = w.shape[0] // heads
    return w.reshape(heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `interleaved_to_half`."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Meta name in a layer -> (HF name, axis the model-parallel shards split, head count to permute by)
META_LAYER = {
    'attention.wq.weight': ('self_attn.q_proj.weight', 0, 'q'),
    'attention.wk.weight': ('self_attn.k_proj.weight', 0, 'k'),
    'attention.wv.weight': ('self_attn.v_proj.weight', 0, None),
    'attention.wo.weight': ('self_attn.o_proj.weight', 1, None),
    'feed_forward.w1.weight': ('mlp.gate_proj.weight', 0, None),
    'feed_forward.w3.weight': ('mlp.up_proj.weight', 0, None),
    'feed_forward.w2.weight': ('mlp.down_proj.weight', 1, None),
    'attention_norm.weight': ('input_layernorm.weight', None, None),
    'ffn_norm.weight': ('post_attention_layernorm.weight', None, None),
}
META_TOP = {'tok_embeddings.weight': ('model.embed_tokens.weight', 1), 'norm.weight': ('model.norm.weight', None),
            'output.weight': ('lm_head.weight', 0)}


def _meta_model_dir(src: pathlib.Path) -> pathlib.Path:
    if (src / 'params.json').is_file():
        return src
    found = sorted(p.parent for p in src.glob('models/*/params.json'))
    if len(found) != 1:
        raise FileNotFoundError(f'{src} has {"no" if not found else len(found)} models/*/params.json: point --src at '
                                f'the release folder holding one model (or at models/<size> itself)')
    return found[0]


def read_meta(src: pathlib.Path) -> Source:
    model_dir = _meta_model_dir(src)
    params = json.loads((model_dir / 'params.json').read_text())
    params = params.get('model', params)
    shards = sorted(model_dir.glob('consolidated*.pth'))
    if not shards:
        raise FileNotFoundError(f'{model_dir} holds no consolidated*.pth')
    loaded = [_torch_file(p) for p in shards]
    n = len(loaded)
    heads = params['n_heads']
    kv_heads = params.get('n_kv_heads') or heads
    if heads % n or kv_heads % n:
        raise ConfigError(f'{n} model-parallel shards do not split n_heads={heads} and n_kv_heads={kv_heads} evenly')
    count = {'q': heads, 'k': kv_heads}

    def whole(name: str, axis: int | None) -> tuple[Callable[[], np.ndarray], tuple[int, ...]]:
        missing = [str(p) for p, part in zip(shards, loaded) if name not in part]
        if missing:
            raise ValueError(f'{missing[0]} lacks {name}: the Meta checkpoint is incomplete or of another model')
        shapes = [tuple(part[name].shape) for part in loaded]
        if n == 1:
            return (lambda: _to_numpy(loaded[0][name])), shapes[0]
        if axis is None:  # replicated on every shard
            return (lambda: np.mean([_to_numpy(part[name]) for part in loaded], axis=0, dtype=np.float32)), shapes[0]
        shape = list(shapes[0])
        shape[axis] = sum(s[axis] for s in shapes)
        return (lambda: np.concatenate([_to_numpy(part[name]) for part in loaded], axis=axis)), tuple(shape)

    state: dict[str, Lazy] = {}
    for name, (hf, axis) in META_TOP.items():
        read, shape = whole(name, axis)
        state[hf] = Lazy(read, shape)
    layers = 1 + max(int(k.split('.')[1]) for k in loaded[0] if k.startswith('layers.'))
    for i in range(layers):
        for name, (hf, axis, which) in META_LAYER.items():
            read, shape = whole(f'layers.{i}.{name}', axis)
            if which:
                read = (lambda r=read, h=count[which]: interleaved_to_half(r(), h))
            state[f'model.layers.{i}.{hf}'] = Lazy(read, shape)
        for which in ('q', 'k'):
            for part in ('weight', 'bias'):
                name = f'layers.{i}.attention.{which}_normalization.{part}'
                if name not in loaded[0]:
                    continue
                hd = loaded[0][name].shape[-1]
                per_shard = count[which] // n

                def norm(name=name, per_shard=per_shard):  # [hd] per shard -> [heads, hd], rotate-half order
                    rows = [interleaved_to_half(_to_numpy(p[name]).reshape(-1, 1), 1)[:, 0] for p in loaded]
                    return np.repeat(np.stack(rows), per_shard, axis=0)
                state[f'model.layers.{i}.self_attn.{which}_norm.{part}'] = Lazy(norm, (count[which], hd))

    embed = state['model.embed_tokens.weight'].shape
    theta = float(params.get('rope_theta', 10_000.0))
    config = types.SimpleNamespace(**{
        **HF_DEFAULTS, 'vocab_size': embed[0], 'hidden_size': params['dim'], 'num_hidden_layers': params['n_layers'],
        'num_attention_heads': heads, 'num_key_value_heads': kv_heads,
        'intermediate_size': state['model.layers.0.mlp.gate_proj.weight'].shape[0],
        # Meta's code has no max length; HF's converter sets these
        'max_position_embeddings': params.get('max_seq_len') or (16_384 if theta > 10_000 else 4096),
        'rope_theta': theta, 'rms_norm_eps': float(params['norm_eps']),
        'swin_norm': bool(params.get('swin_norm', False))})
    if params.get('qk_normalization') is False:
        raise ConfigError(f'{model_dir}/params.json has qk_normalization=false: not a Chameleon cm3jax converts')
    root = model_dir.parent.parent if model_dir.parent.name == 'models' else model_dir
    tokenizer = root / 'tokenizer' / 'text_tokenizer.json'
    if not tokenizer.is_file():
        raise FileNotFoundError(f'{tokenizer} is missing: the release\'s tokenizer/ folder must sit beside models/')
    return Source(config, state, tokenizer, *_vqgan_files(root / 'tokenizer'), layout='meta')


def read_source(src: str | pathlib.Path, layout: str = 'hf') -> Source:
    src = pathlib.Path(src)
    if layout not in LAYOUTS:
        raise ConfigError(f'--layout={layout!r}; choose from {LAYOUTS}')
    if not src.is_dir():
        raise FileNotFoundError(f'--src={src} is not a directory')
    return read_hf(src) if layout == 'hf' else read_meta(src)
