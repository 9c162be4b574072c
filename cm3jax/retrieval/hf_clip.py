"""Hugging Face transformers' ``CLIPModel`` -> `cm3jax.retrieval.clip` params.

The retriever reads these files directly (`cm3jax.retrieval.load.load_retriever` and the
trainer's ``init_from`` take a ``save_pretrained`` directory), so the converter lives with it.

Nothing is ever downloaded: users point cm3jax at files they already have, e.g. a copy of
openai/clip-vit-base-patch32 (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)::

    cfg, params = load_pretrained('/data/clip-vit-base-patch32')
    # or, piece by piece
    cfg = config_from_hf(transformers.CLIPConfig.from_pretrained(path))   # or the config.json dict
    params = load('/data/clip-vit-base-patch32/model.safetensors', cfg)
    params = from_hf({k: v.numpy() for k, v in hf_model.state_dict().items()}, cfg)

torch ``Linear`` weights are [out, in]; cm3jax kernels are [in, ...out] with heads split out,
and the patch conv (OIHW) becomes an [h, w, in, out] einsum kernel. Every tensor is checked
against the config before it is placed; a mismatch raises `WeightMismatch` naming the key,
both shapes and the config fields behind them.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np
import flax.linen as nn

from cm3jax.params import WeightMismatch, load_state_dict
from cm3jax.retrieval.clip import ClipConfig, init_variables

# transformers' buffers, saved by older versions; recomputed, never learned
SKIPPED = re.compile(r'.*\.position_ids$')


def _field(obj, name: str, default):
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def config_from_hf(hf_config, **overrides) -> ClipConfig:
    """A transformers ``CLIPConfig``, or its ``config.json`` as a dict, -> ClipConfig.

    A dict's missing fields take transformers' defaults (ViT-B/32's, as ClipConfig's are).
    ``image_mean`` / ``image_std`` live in the processor's config, not the model's: the OpenAI
    values are used unless ``overrides`` says otherwise. ``overrides`` may set any field.
    """
    default = ClipConfig()
    text = _field(hf_config, 'text_config', None) or {}
    vision = _field(hf_config, 'vision_config', None) or {}
    acts = {_field(c, 'hidden_act', 'quick_gelu') for c in (text, vision)}
    if len(acts) != 1:
        raise ValueError(f'the towers use different activations {sorted(acts)}; cm3jax CLIP has one')
    eps = {float(_field(c, 'layer_norm_eps', 1e-5)) for c in (text, vision)}
    if len(eps) != 1:
        raise ValueError(f'the towers use different layer_norm_eps {sorted(eps)}; cm3jax CLIP has one')
    fields = dict(
        vocab_size=_field(text, 'vocab_size', default.vocab_size),
        max_len=_field(text, 'max_position_embeddings', default.max_len),
        text_width=_field(text, 'hidden_size', default.text_width),
        text_layers=_field(text, 'num_hidden_layers', default.text_layers),
        text_heads=_field(text, 'num_attention_heads', default.text_heads),
        text_mlp_dim=_field(text, 'intermediate_size', default.text_mlp_dim),
        eos_token_id=_field(text, 'eos_token_id', default.eos_token_id),
        image_size=_field(vision, 'image_size', default.image_size),
        patch_size=_field(vision, 'patch_size', default.patch_size),
        vision_width=_field(vision, 'hidden_size', default.vision_width),
        vision_layers=_field(vision, 'num_hidden_layers', default.vision_layers),
        vision_heads=_field(vision, 'num_attention_heads', default.vision_heads),
        vision_mlp_dim=_field(vision, 'intermediate_size', default.vision_mlp_dim),
        image_channels=_field(vision, 'num_channels', default.image_channels),
        projection_dim=_field(hf_config, 'projection_dim', default.projection_dim),
        logit_scale_init=float(_field(hf_config, 'logit_scale_init_value', default.logit_scale_init)),
        activation=acts.pop(),
        norm_eps=eps.pop(),
    )
    return ClipConfig(**(fields | overrides))


def _encoder_table(width: int, heads: int, mlp_dim: int, tower: str) -> dict[str, tuple]:
    """HF name inside ``encoder.layers.{i}`` -> (cm3jax path, HF shape, fields behind each axis, map)."""
    d = width // heads
    W, F = f'{tower}_width', f'{tower}_mlp_dim'
    same = lambda w: w
    table = {
        'self_attn.out_proj.weight': (('attn', 'wo'), (width, width), (W, W), lambda w: w.T.reshape(heads, d, width)),
        'self_attn.out_proj.bias': (('attn', 'bo'), (width,), (W,), same),
        'mlp.fc1.weight': (('mlp', 'wi'), (mlp_dim, width), (F, W), np.transpose),
        'mlp.fc1.bias': (('mlp', 'bi'), (mlp_dim,), (F,), same),
        'mlp.fc2.weight': (('mlp', 'wo'), (width, mlp_dim), (W, F), np.transpose),
        'mlp.fc2.bias': (('mlp', 'bo'), (width,), (W,), same),
    }
    for x in 'qkv':
        table[f'self_attn.{x}_proj.weight'] = (('attn', f'w{x}'), (width, width), (W, W),
                                               lambda w: w.T.reshape(width, heads, d))
        table[f'self_attn.{x}_proj.bias'] = (('attn', f'b{x}'), (width,), (W,), lambda b: b.reshape(heads, d))
    for hf, ours in (('layer_norm1', 'attn_norm'), ('layer_norm2', 'mlp_norm')):
        table[f'{hf}.weight'] = ((ours, 'scale'), (width,), (W,), same)
        table[f'{hf}.bias'] = ((ours, 'bias'), (width,), (W,), same)
    return table


def _norm(hf: str, ours: tuple, width: int, field: str) -> dict[str, tuple]:
    same = lambda w: w
    return {f'{hf}.weight': ((*ours, 'scale'), (width,), (field,), same),
            f'{hf}.bias': ((*ours, 'bias'), (width,), (field,), same)}


def _table(cfg: ClipConfig) -> dict[str, tuple]:
    """Every HF key outside the encoder layers -> (cm3jax path, HF shape, fields, map)."""
    tw, vw, p = cfg.text_width, cfg.vision_width, cfg.projection_dim
    same = lambda w: w
    n = cfg.image_size // cfg.patch_size
    return {
        'logit_scale': (('logit_scale',), (), (), same),
        'text_model.embeddings.token_embedding.weight': (('text', 'token_embed'), (cfg.vocab_size, tw),
                                                         ('vocab_size', 'text_width'), same),
        'text_model.embeddings.position_embedding.weight': (('text', 'pos_embed'), (cfg.max_len, tw),
                                                            ('max_len', 'text_width'), same),
        **_norm('text_model.final_layer_norm', ('text', 'final_norm'), tw, 'text_width'),
        'text_projection.weight': (('text', 'projection'), (p, tw), ('projection_dim', 'text_width'), np.transpose),
        'vision_model.embeddings.class_embedding': (('vision', 'cls_token'), (vw,), ('vision_width',), same),
        'vision_model.embeddings.patch_embedding.weight': (
            ('vision', 'patch_embed'), (vw, cfg.image_channels, cfg.patch_size, cfg.patch_size),
            ('vision_width', 'image_channels', 'patch_size', 'patch_size'), lambda w: w.transpose(2, 3, 1, 0)),
        'vision_model.embeddings.position_embedding.weight': (
            ('vision', 'pos_embed'), (n * n + 1, vw), ('image_size / patch_size', 'vision_width'), same),
        **_norm('vision_model.pre_layrnorm', ('vision', 'pre_norm'), vw, 'vision_width'),
        **_norm('vision_model.post_layernorm', ('vision', 'post_norm'), vw, 'vision_width'),
        'visual_projection.weight': (('vision', 'projection'), (p, vw), ('projection_dim', 'vision_width'),
                                     np.transpose),
    }


def _check_shape(key: str, w: np.ndarray, expected: tuple, fields: tuple) -> None:
    if tuple(w.shape) != tuple(expected):
        bad = sorted({f for f, a, b in zip(fields, w.shape, expected) if a != b} or set(fields) or {'?'})
        raise WeightMismatch(f'{key}: the checkpoint has shape {tuple(w.shape)} but this ClipConfig expects '
                             f'{tuple(expected)}; change ClipConfig.{" / ".join(bad)} to match the checkpoint '
                             f'(config_from_hf(hf_config) gives every field)')


def _put(tree: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def from_hf(state_dict: Mapping[str, Any], cfg: ClipConfig) -> dict:
    """Map a transformers ``CLIPModel`` state dict onto `cm3jax.retrieval.clip` params (float32 numpy).

    state_dict: ``{name: array}`` (numpy, or torch tensors). Raises `WeightMismatch` (a
    ValueError) for a missing tensor, a tensor with no place in the model, or a shape that does
    not fit ``cfg``, naming the key, both shapes and the ClipConfig field to change.
    The head counts leave no trace in the tensors' shapes, so take them from the checkpoint's
    own config (`config_from_hf`): a wrong ``*_heads`` loads silently and computes garbage.
    """
    todo = {k: v for k, v in state_dict.items() if not SKIPPED.match(k)}

    def take(key: str) -> np.ndarray:
        if key not in todo:
            raise WeightMismatch(f'the checkpoint lacks {key} (is it a full CLIPModel state dict, '
                                 f'with both towers and both projections?)')
        value = todo.pop(key)
        value = value.detach().cpu().float().numpy() if hasattr(value, 'detach') else value
        return np.asarray(value, np.float32)

    for tower, layers in (('text', cfg.text_layers), ('vision', cfg.vision_layers)):
        found = {int(m.group(1)) for k in todo if (m := re.match(rf'{tower}_model\.encoder\.layers\.(\d+)\.', k))}
        if found and max(found) + 1 != layers:
            raise WeightMismatch(f'the checkpoint\'s {tower} tower has {max(found) + 1} layers but '
                                 f'ClipConfig.{tower}_layers={layers}')

    params: dict = {}
    for key, (path, expected, fields, fn) in _table(cfg).items():
        w = take(key)
        _check_shape(key, w, expected, fields)
        _put(params, path, fn(w))
    for tower, width, heads, mlp_dim, layers in (
            ('text', cfg.text_width, cfg.text_heads, cfg.text_mlp_dim, cfg.text_layers),
            ('vision', cfg.vision_width, cfg.vision_heads, cfg.vision_mlp_dim, cfg.vision_layers)):
        stacked = []
        for i in range(layers):
            layer: dict = {}
            for name, (path, expected, fields, fn) in _encoder_table(width, heads, mlp_dim, tower).items():
                key = f'{tower}_model.encoder.layers.{i}.{name}'
                w = take(key)
                _check_shape(key, w, expected, fields)
                _put(layer, path, fn(w))
            stacked.append(layer)
        params[tower]['encoder'] = {'layers': jax.tree.map(lambda *ws: np.stack(ws), *stacked)}
    if todo:
        raise WeightMismatch(f'checkpoint tensors with no place in cm3jax CLIP (another architecture, or '
                             f'a model with heads on top?): {sorted(todo)}')
    # not ascontiguousarray, which turns the 0-d logit_scale into shape (1,)
    params = jax.tree.map(lambda w: np.array(w, np.float32, order='C'), params)

    # The model's own init is the ground truth for names and shapes.
    abstract = jax.eval_shape(functools.partial(init_variables, cfg), jax.random.key(0))
    want = jax.tree.map(lambda s: s.shape, nn.unbox(abstract)['params'])
    got = jax.tree.map(lambda w: w.shape, params)
    if got != want:
        raise AssertionError(f'converter out of date with cm3jax.retrieval.clip: built {got}, the model has {want}')
    return params


def load(path: str | pathlib.Path, cfg: ClipConfig) -> dict:
    """A ``.safetensors`` file or a torch ``.bin`` (read with ``weights_only=True``) -> params."""
    return from_hf(load_state_dict(path), cfg)


def load_pretrained(directory: str | pathlib.Path, **overrides) -> tuple[ClipConfig, dict]:
    """A ``save_pretrained`` directory (``config.json`` plus ``model.safetensors`` or
    ``pytorch_model.bin``) -> (cfg, params), without importing transformers."""
    directory = pathlib.Path(directory)
    config_file = directory / 'config.json'
    if not config_file.exists():
        raise FileNotFoundError(f'{config_file} is missing; pass the directory save_pretrained wrote')
    cfg = config_from_hf(json.loads(config_file.read_text()), **overrides)
    for name in ('model.safetensors', 'pytorch_model.bin'):
        if (directory / name).exists():
            return cfg, load(directory / name, cfg)
    raise FileNotFoundError(f'{directory} holds neither model.safetensors nor pytorch_model.bin '
                            f'(sharded checkpoints: merge them first)')

