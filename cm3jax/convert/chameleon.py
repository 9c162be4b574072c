"""Hugging Face transformers' Chameleon language model -> cm3jax params.

    config.model.update(model_fields_from_hf_config(hf_model.config))
    cfg = configuration.transformer_config(config, mesh, rules)
    params = from_hf({k: v.float().numpy() for k, v in hf_model.state_dict().items()}, cfg)
    logits = Transformer(cfg).apply({'params': params}, tokens)

HF's Chameleon weights already rotate q/k in the rotate-half RoPE layout that
`cm3jax.model.layers.rope` uses, so no head permutation is needed (Meta's original files, with
interleaved pairs, would need one). The VQ image tokenizer (``vqmodel.*``) is not part of the
language model and is skipped.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.model.transformer import Transformer, TransformerConfig


# The architecture switches a Chameleon checkpoint needs; anything else would drop or misuse weights.
SWITCHES = dict(norm='rmsnorm', norm_params=True, mlp='swiglu', position='rope', qk_norm=True)

# HF's ChameleonLayerNorm (QK-norm) hard-codes this eps, independent of rms_norm_eps.
HF_QK_NORM_EPS = 1e-5


def model_fields_from_hf_config(hf_config) -> dict[str, Any]:
    """The ``config.model`` fields that make cm3jax's Transformer match a ``ChameleonConfig``."""
    for flag in ('attention_bias', 'mlp_bias'):
        if getattr(hf_config, flag, False):
            raise ValueError(f'hf_config.{flag}=True: cm3jax projections have no biases')
    if getattr(hf_config, 'hidden_act', 'silu') != 'silu':
        raise ValueError(f'hf_config.hidden_act={hf_config.hidden_act!r}: cm3jax SwiGLU uses silu')
    rope = getattr(hf_config, 'rope_parameters', None) or {}  # transformers >= 5
    scaling = getattr(hf_config, 'rope_scaling', None) or {}  # transformers 4
    rope_type = rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type') or 'default'
    if rope_type != 'default':
        raise ValueError(f'RoPE type {rope_type!r}: cm3jax implements only plain RoPE')
    return dict(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        mlp_dim=hf_config.intermediate_size,
        max_len=hf_config.max_position_embeddings,
        rope_theta=float(rope.get('rope_theta', getattr(hf_config, 'rope_theta', 10_000.0))),
        norm_eps=float(hf_config.rms_norm_eps),
        qk_norm_eps=HF_QK_NORM_EPS,
        norm_placement='swin' if getattr(hf_config, 'swin_norm', False) else 'pre',
        # Chameleon never ties; mirroring the flag keeps a tied variant loadable from a file
        # where save_pretrained dropped the duplicate lm_head.
        tie_embeddings=bool(getattr(hf_config, 'tie_word_embeddings', False)),
        zero_init_out=False,
        **SWITCHES,
    )


def _layer_table(cfg: TransformerConfig) -> dict[str, tuple]:
    """HF name in a layer -> (cm3jax path, expected HF shape, config field behind each axis, map)."""
    d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    D, H, KV, F = 'model.d_model', 'model.num_heads', 'model.num_kv_heads', 'model.mlp_dim'
    HD = H  # head dim = d_model / num_heads, and a d_model mismatch already failed on embed_tokens
    same = lambda w: w
    # torch Linear stores [out, in]; cm3jax kernels are [in, ...out] with heads split out.
    heads_in = lambda n: lambda w: w.T.reshape(d, n, hd)
    table = {
        'self_attn.q_proj.weight': (('attn', 'wq'), (h * hd, d), (D, D), heads_in(h)),
        'self_attn.k_proj.weight': (('attn', 'wk'), (kv * hd, d), (KV, D), heads_in(kv)),
        'self_attn.v_proj.weight': (('attn', 'wv'), (kv * hd, d), (KV, D), heads_in(kv)),
        'self_attn.o_proj.weight': (('attn', 'wo'), (d, h * hd), (D, D), lambda w: w.T.reshape(h, hd, d)),
        'mlp.gate_proj.weight': (('mlp', 'wg'), (f, d), (F, D), np.transpose),
        'mlp.up_proj.weight': (('mlp', 'wi'), (f, d), (F, D), np.transpose),
        'mlp.down_proj.weight': (('mlp', 'wo'), (d, f), (D, F), np.transpose),
        'input_layernorm.weight': (('attn_norm', 'scale'), (d,), (D,), same),
        'post_attention_layernorm.weight': (('mlp_norm', 'scale'), (d,), (D,), same),
    }
    for which, n, field in (('q', h, H), ('k', kv, KV)):
        for hf_name, ours in (('weight', 'scale'), ('bias', 'bias')):
            table[f'self_attn.{which}_norm.{hf_name}'] = (('attn', f'{which}_norm', ours), (n, hd), (field, HD), same)
    return table


def _check_shape(key: str, w: np.ndarray, expected: tuple, fields: tuple) -> None:
    if tuple(w.shape) != tuple(expected):
        bad = sorted({fld for fld, a, b in zip(fields, w.shape, expected) if a != b} or set(fields))
        raise ValueError(f'{key}: the checkpoint has shape {tuple(w.shape)} but this model expects '
                         f'{tuple(expected)}; change {" / ".join(bad)} to match the checkpoint '
                         f'(model_fields_from_hf_config(hf_config) gives every field)')


def from_hf(state_dict: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict[str, Any]:
    """Map an HF Chameleon state dict onto ``Transformer(cfg)``'s params (numpy, cfg.param_dtype).

    state_dict: ``ChameleonForConditionalGeneration`` keys (``model.layers.0...``, ``lm_head.weight``)
    or ``ChameleonModel`` keys (no ``model.`` prefix; these have no lm_head, so only a tied cfg
    can use them); values are arrays, e.g. ``{k: v.float().numpy() ...}``.
    Checkpoint vocab V <= cfg.vocab_size: ``embed`` [V_pad, d] and ``lm_head`` [d, V_pad] get zero
    rows/columns from V up. Layer params are [L, ...] under ``layers`` with ``cfg.scan_layers``,
    else ``layers_0``, ``layers_1``, ...
    Raises ValueError naming the key and config field when the checkpoint does not fit.
    Values may be lazy (anything ``np.asarray`` reads, e.g. `cm3jax.convert.chameleon_files`'
    views of safetensors or Meta's files): each is read, mapped and cast on its own, so the
    conversion holds the source one tensor at a time beside the result.
    """
    wrong = [f'model.{k}={getattr(cfg, k)!r} (needs {v!r})' for k, v in SWITCHES.items() if getattr(cfg, k) != v]
    if wrong:
        raise ValueError(f'cfg is not a Chameleon architecture: {", ".join(wrong)}')
    prefix = 'model.' if any(k.startswith('model.') for k in state_dict) else ''
    todo = {}  # name without prefix -> (key as given, array)
    for key, value in state_dict.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if not name.startswith('vqmodel.') and not name.endswith('rotary_emb.inv_freq'):
            todo[name] = (key, value)

    def take(name: str) -> tuple[str, np.ndarray]:
        if name not in todo:
            hint = '; a bare ChameleonModel has none: pass ChameleonForConditionalGeneration\'s state dict' \
                if name == 'lm_head.weight' else ''
            raise ValueError(f'the checkpoint lacks {name if name == "lm_head.weight" else prefix + name}{hint}')
        key, value = todo.pop(name)
        return key, np.asarray(value, np.float32)

    dtype = jnp.dtype(cfg.param_dtype)
    layer_ids = {int(m.group(1)) for n in todo if (m := re.match(r'layers\.(\d+)\.', n))}
    if layer_ids and max(layer_ids) + 1 != cfg.num_layers:
        raise ValueError(f'the checkpoint has {max(layer_ids) + 1} layers but model.num_layers={cfg.num_layers}; '
                         f'set model.num_layers={max(layer_ids) + 1}')

    key, embed = take('embed_tokens.weight')
    vocab = embed.shape[0]
    if vocab > cfg.vocab_size:
        raise ValueError(f'{key}: the checkpoint has {vocab} ids but model.vocab_size={cfg.vocab_size}; '
                         f'set model.vocab_size={vocab}')
    _check_shape(key, embed, (vocab, cfg.d_model), ('model.vocab_size', 'model.d_model'))
    pad = ((0, cfg.padded_vocab_size - vocab), (0, 0))  # ids the checkpoint lacks get zero rows
    params = {'embed': np.pad(embed, pad).astype(dtype)}
    del embed
    key, scale = take('norm.weight')
    _check_shape(key, scale, (cfg.d_model,), ('model.d_model',))
    params['final_norm'] = {'scale': scale.astype(dtype)}
    if not cfg.tie_embeddings:
        key, head = take('lm_head.weight')
        _check_shape(key, head, (vocab, cfg.d_model), ('model.vocab_size', 'model.d_model'))
        params['lm_head'] = np.ascontiguousarray(np.pad(head, pad).T, dtype)
        del head

    table = _layer_table(cfg)
    stacked: dict = {}  # scan: [L, ...] arrays filled layer by layer (no second copy of the layers)
    for i in range(cfg.num_layers):
        layer = {}
        for hf_name, (path, expected, fields, fn) in table.items():
            key, w = take(f'layers.{i}.{hf_name}')
            _check_shape(key, w, expected, fields)
            w = np.ascontiguousarray(fn(w), dtype)
            if cfg.scan_layers:
                node = stacked
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                if path[-1] not in node:
                    node[path[-1]] = np.empty((cfg.num_layers, *w.shape), dtype)
                node[path[-1]][i] = w
            else:
                node = layer
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = w
            del w
        if not cfg.scan_layers:
            params[f'layers_{i}'] = layer
    if todo:
        raise ValueError(f'checkpoint keys with no place in the cm3jax model (projection biases, '
                         f'another architecture?): {sorted(v[0] for v in todo.values())}')
    if cfg.scan_layers:
        params['layers'] = stacked

    # The model's own init is the ground truth for names and shapes.
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    want = jax.tree.map(lambda s: s.shape, nn.unbox(abstract)['params'])
    got = jax.tree.map(lambda w: w.shape, params)
    if got != want:
        raise AssertionError(f'converter out of date with cm3jax.model: built {got}, the model has {want}')
    return params


def to_hf(params: Mapping[str, Any], cfg: TransformerConfig, vocab_size: int) -> dict[str, np.ndarray]:
    """The inverse of `from_hf`: cm3jax params -> ``ChameleonForConditionalGeneration`` state
    dict (float32 numpy, ``model.`` prefix, ``vocab_size`` rows: the padding is dropped)."""
    if cfg.image_positions:
        raise ValueError('this model has image-place embeddings (model.image_positions), which HF Chameleon has no '
                         'weight for: only models trained with model.image_positions=0 export to HF')
    get = lambda x: np.asarray(jax.device_get(x), np.float32)  # noqa: E731
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {'model.embed_tokens.weight': get(params['embed'])[:vocab_size],
           'model.norm.weight': get(params['final_norm']['scale'])}
    out['lm_head.weight'] = (out['model.embed_tokens.weight'] if cfg.tie_embeddings
                             else get(params['lm_head'])[:, :vocab_size].T.copy())
    inverse = {  # cm3jax path -> (HF name, map back)
        ('attn', 'wq'): ('self_attn.q_proj.weight', lambda w: w.reshape(d, h * hd).T),
        ('attn', 'wk'): ('self_attn.k_proj.weight', lambda w: w.reshape(d, kv * hd).T),
        ('attn', 'wv'): ('self_attn.v_proj.weight', lambda w: w.reshape(d, kv * hd).T),
        ('attn', 'wo'): ('self_attn.o_proj.weight', lambda w: w.reshape(h * hd, d).T),
        ('mlp', 'wg'): ('mlp.gate_proj.weight', np.transpose),
        ('mlp', 'wi'): ('mlp.up_proj.weight', np.transpose),
        ('mlp', 'wo'): ('mlp.down_proj.weight', np.transpose),
        ('attn_norm', 'scale'): ('input_layernorm.weight', lambda w: w),
        ('mlp_norm', 'scale'): ('post_attention_layernorm.weight', lambda w: w),
    }
    for which in ('q', 'k'):
        for ours, theirs in (('scale', 'weight'), ('bias', 'bias')):
            inverse[('attn', f'{which}_norm', ours)] = (f'self_attn.{which}_norm.{theirs}', lambda w: w)
    for i in range(cfg.num_layers):
        layer = (jax.tree.map(lambda x: x[i], params['layers']) if cfg.scan_layers else params[f'layers_{i}'])
        for path, (name, fn) in inverse.items():
            node = layer
            for part in path:
                node = node[part]
            out[f'model.layers.{i}.{name}'] = np.ascontiguousarray(fn(get(node)))
    return out
