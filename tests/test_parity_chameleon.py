"""Numerical parity with transformers' Chameleon, through `cm3jax.convert.chameleon`.

A tiny random HF ``ChameleonForConditionalGeneration`` (docs/stack_notes.md, "Parity references") is converted and both models'
float32 logits are compared. HF's ``forward`` overwrites image-code logits with the dtype
minimum, so the reference is its pre-mask ``lm_head`` output. Skipped without the [parity] extra.
"""

import dataclasses

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cm3jax import parallel  # noqa: E402
from cm3jax.lm import config as lm_config  # noqa: E402
from cm3jax.convert.chameleon import from_hf, model_fields_from_hf_config  # noqa: E402
from cm3jax.model.transformer import Transformer  # noqa: E402
from tests import chameleon_refs  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

N_TEXT, N_CODES = 64, 32
VOCAB = N_TEXT + 1 + N_CODES  # text ids, <image>, image codes
ATOL = 1e-4


def hf_chameleon(swin_norm=False, **overrides):
    """`chameleon_refs.hf_chameleon` over text ids 0..N_TEXT-1, an ``<image>`` id and N_CODES codes."""
    vocab_map = ({f't{i}': i for i in range(N_TEXT)} | {'<image>': N_TEXT}
                 | {chameleon_refs.code_name(i): N_TEXT + 1 + i for i in range(N_CODES)})
    return chameleon_refs.hf_chameleon(vocab_map, swin_norm=swin_norm, **overrides)


def state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def cm3jax_config(hf_config, **model_overrides):
    config = tiny_config('chameleon')
    config.model.update(model_fields_from_hf_config(hf_config))
    config.model.update(model_overrides)
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    return lm_config.transformer_config(config, mesh, parallel.rules_from_config(config))


def cm3jax_logits(cfg, params, tokens):
    return np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t))(params, tokens))


def hf_logits(model, tokens):
    with torch.no_grad():
        hidden = model.model(input_ids=torch.from_numpy(tokens)).last_hidden_state
        return model.lm_head(hidden).numpy()


@pytest.fixture(scope='module', params=['pre', 'swin'])
def reference(request):
    """(HF model, tokens [2, 48] over the whole vocab, HF logits [2, 48, VOCAB])."""
    model = hf_chameleon(swin_norm=request.param == 'swin')
    assert model.config.swin_norm == (request.param == 'swin')
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 48)).astype(np.int32)
    return model, tokens, hf_logits(model, tokens)


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scan', 'loop'])
def test_logits_match_transformers(reference, scan_layers):
    model, tokens, want = reference
    cfg = cm3jax_config(model.config, scan_layers=scan_layers)
    assert cfg.padded_vocab_size > VOCAB  # the zero-padding path is exercised
    params = from_hf(state_dict(model), cfg)
    got = cm3jax_logits(cfg, params, tokens)

    diff = np.abs(got[..., :VOCAB] - want).max()
    print(f'norm_placement={cfg.norm_placement} scan_layers={scan_layers}: max |logit diff| {diff:.2e}')
    assert np.abs(want).max() > 1.0  # a real signal, not a near-zero output
    assert diff < ATOL
    assert not params['embed'][VOCAB:].any() and not params['lm_head'][:, VOCAB:].any()
    assert (got[..., VOCAB:] == jnp.finfo(jnp.float32).min).all()


def test_parity_is_not_vacuous(reference):
    """A RoPE change far smaller than a layout bug already breaks the tolerance."""
    model, tokens, want = reference
    cfg = cm3jax_config(model.config)
    params = from_hf(state_dict(model), cfg)
    got = cm3jax_logits(dataclasses.replace(cfg, rope_theta=cfg.rope_theta / 2), params, tokens)
    assert np.abs(got[..., :VOCAB] - want).max() > 100 * ATOL


def test_both_key_layouts_convert_alike():
    model = hf_chameleon()
    cfg = cm3jax_config(model.config, scan_layers=False)
    prefixed = from_hf(state_dict(model), cfg)
    bare = {k: v.numpy() for k, v in model.model.state_dict().items()}  # ChameleonModel: no prefix
    assert not any(k.startswith('model.') for k in bare)
    with pytest.raises(ValueError, match='lacks lm_head.weight'):
        from_hf(bare, cfg)
    bare['lm_head.weight'] = model.lm_head.weight.detach().numpy()
    jax.tree.map(np.testing.assert_array_equal, from_hf(bare, cfg), prefixed)


@pytest.mark.parametrize('change, message', [
    (dict(d_model=128), r"model\.embed_tokens\.weight: the checkpoint has shape \(97, 64\) but this model "
                        r"expects \(97, 128\); change model\.d_model"),
    (dict(num_heads=8, num_kv_heads=4), r"q_norm\.weight: the checkpoint has shape \(4, 16\) but this model "
                                        r"expects \(8, 8\); change model\.num_heads to match"),
    (dict(mlp_dim=256), r"gate_proj\.weight: .*\(128, 64\).*\(256, 64\); change model\.mlp_dim"),
    (dict(num_layers=3), r"2 layers but model\.num_layers=3; set model\.num_layers=2"),
    (dict(vocab_size=90), r"97 ids but model\.vocab_size=90; set model\.vocab_size=97"),
    (dict(qk_norm=False), r"not a Chameleon architecture: model\.qk_norm=False"),
])
def test_mismatched_checkpoint_names_key_and_field(change, message):
    model = hf_chameleon()
    with pytest.raises(ValueError, match=message):
        from_hf(state_dict(model), cm3jax_config(model.config, **change))


def test_missing_and_unexpected_keys_are_named():
    model = hf_chameleon()
    cfg = cm3jax_config(model.config)
    weights = state_dict(model)
    del weights['model.layers.1.mlp.up_proj.weight']
    with pytest.raises(ValueError, match=r'lacks model\.layers\.1\.mlp\.up_proj\.weight'):
        from_hf(weights, cfg)
    weights = state_dict(model) | {'model.layers.0.self_attn.q_proj.bias': np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match=r"no place.*'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        from_hf(weights, cfg)


def test_qk_norm_eps_stays_at_hf_value_when_rms_eps_differs():
    """HF's QK LayerNorm uses eps 1e-5 whatever rms_norm_eps is; cm3jax follows via qk_norm_eps."""
    model = hf_chameleon(rms_norm_eps=1e-6)
    tokens = np.random.RandomState(1).randint(0, VOCAB, (2, 32)).astype(np.int32)
    cfg = cm3jax_config(model.config)
    assert (cfg.norm_eps, cfg.qk_norm_eps) == (1e-6, 1e-5)
    got = cm3jax_logits(cfg, from_hf(state_dict(model), cfg), tokens)
    assert np.abs(got[..., :VOCAB] - hf_logits(model, tokens)).max() < ATOL
