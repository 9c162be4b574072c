"""`cm3jax convert chameleon` end to end against transformers' Chameleon: logits through the
converted directory (HF and Meta layouts, GQA, swin norm off and on), greedy decoding token for
token (text, and a whole image span closed by ``<eoss>``), the way back to HF, and bad input.
Skipped without the [parity] extra."""

import copy
import json
import shutil

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cm3jax.errors import ConfigError  # noqa: E402
from cm3jax.convert import chameleon_files, converted  # noqa: E402
from cm3jax.sample import decode as dec, generate  # noqa: E402
from cm3jax.sample.load import load_generator  # noqa: E402
from tests import chameleon_refs  # noqa: E402

SIZE, CODES = 98, 32  # even: 2 model-parallel shards split the output rows
ATOL = 1e-4
TOKENIZER = chameleon_refs.tokenizer(SIZE, CODES, num_text=50)
VOCAB_MAP = TOKENIZER.get_vocab()


def hf_dir(path, model):
    model.save_pretrained(path)
    TOKENIZER.save(str(path / 'tokenizer.json'))
    return path


def hf_logits(model, tokens):
    """The pre-mask lm_head output (HF's forward sets image-code logits to the dtype minimum)."""
    with torch.no_grad():
        return model.lm_head(model.model(input_ids=torch.from_numpy(tokens)).last_hidden_state).numpy()


def ours(gen, tokens):
    return np.asarray(jax.jit(lambda p, t: gen.model.apply({'params': p}, t))(gen.params, tokens))


_BUILT = {}


def _built(norm, tmp_path_factory):
    """(HF model, its converted generator, tokens [2, 40], the folder holding hf/ and cm3jax/),
    converted from the HF layout once per norm placement."""
    if norm not in _BUILT:
        model = chameleon_refs.hf_chameleon(VOCAB_MAP, swin_norm=norm == 'swin')
        chameleon_refs.share_qk_norms(model, shards=2)  # writable in Meta's layout too (test_meta_layout)
        root = tmp_path_factory.mktemp(norm)
        converted.convert(hf_dir(root / 'hf', model), root / 'cm3jax')
        gen, *_ = load_generator(root / 'cm3jax')
        tokens = np.random.RandomState(0).randint(0, SIZE, (2, 40)).astype(np.int32)
        _BUILT[norm] = model, gen, tokens, root
    return _BUILT[norm]


@pytest.fixture(scope='module', params=['pre', 'swin'])
def reference(request, tmp_path_factory):
    """Both norm placements (logit parity)."""
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope='module')
def pre(tmp_path_factory):
    """Pre-norm only (decoding, export, bad input: the norm placement changes nothing there)."""
    return _built('pre', tmp_path_factory)


def test_logits_match_transformers(reference):
    model, gen, tokens, _ = reference
    assert gen.model.cfg.num_kv_heads < gen.model.cfg.num_heads  # GQA
    assert gen.model.cfg.norm_placement == ('swin' if model.config.swin_norm else 'pre')
    want = hf_logits(model, tokens)
    got = ours(gen, tokens)
    diff = np.abs(got[..., :SIZE] - want).max()
    print(f'swin_norm={model.config.swin_norm}: max |logit diff| {diff:.2e} (max |logit| {np.abs(want).max():.1f})')
    assert np.abs(want).max() > 1.0 and diff < ATOL
    with torch.no_grad():  # HF's own forward, on the text columns it does not mask
        masked = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    text = ~np.asarray(gen.vocab.is_image(np.arange(SIZE)))
    assert np.abs(got[..., :SIZE][..., text] - masked[..., text]).max() < ATOL
    assert gen.vocab.text_is_bpe and gen.vocab.end_image == VOCAB_MAP['<eoss>']


@pytest.mark.parametrize('shards', [1, 2])
def test_meta_layout_gives_the_same_logits(reference, tmp_path, shards):
    """The same weights in Meta's layout (interleaved RoPE rows, one QK-norm per model-parallel
    shard; 2 shards split the heads, the kv heads and the embedding columns)."""
    model, gen, tokens, _ = reference
    if shards == 1:  # one shard holds one QK-norm for all heads
        model = copy.deepcopy(model)
        chameleon_refs.share_qk_norms(model, shards=1)
    chameleon_refs.write_meta(model, TOKENIZER.to_str(), tmp_path / 'meta', shards=shards)
    converted.convert(tmp_path / 'meta', tmp_path / 'out', layout='meta')
    meta, *_ = load_generator(tmp_path / 'out')
    got = ours(meta, tokens)
    diff = np.abs(got[..., :SIZE] - hf_logits(model, tokens)).max()
    print(f'meta layout, {shards} shard(s): max |logit diff| {diff:.2e}')
    assert diff < ATOL
    if shards == 2:  # the very weights the HF layout gave
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), meta.params, gen.params)


def test_rope_permutation_round_trips_and_is_not_the_identity():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    half = chameleon_files.interleaved_to_half(w, heads=2)
    assert not np.array_equal(half, w)
    np.testing.assert_array_equal(chameleon_files.half_to_interleaved(half, heads=2), w)
    np.testing.assert_array_equal(half[:4, 0], w[[0, 2, 4, 6], 0])  # head 0's even rows first


def test_greedy_decoding_matches_transformers(pre):
    """Row 0: 20 text tokens, against transformers' ``generate``; row 1 opens an image: H*W
    codes, the forced ``<eoss>``, then text, against transformers' forward with the same rules
    written out. One decode call, one compile."""
    model, gen, _, _ = pre
    v, hw, max_new = gen.vocab, 4, 20
    words = TOKENIZER.encode('a red cat').ids
    rows = [np.array([v.bos, *words, 90], np.int32), np.array([v.bos, *words, v.break_], np.int32)]
    tokens, segs = generate.left_pad(rows, v.pad)
    remaining, pending = dec.initial_image_state(tokens, segs, v, hw)
    fn = dec.make_decoder(gen.model, vocab=v, image_tokens=hw, max_new=max_new,
                          sample=dec.SampleConfig(temperature=0.0))
    out = jax.device_get(fn(gen.params, jnp.asarray(tokens), jnp.asarray(segs), jax.random.key(0),
                            jnp.asarray(remaining), jnp.asarray(pending)))

    text_ok = v.allowed('text', 'special')
    text_ok[[v.pad, v.bos]] = False
    never = [i for i in range(SIZE) if not text_ok[i] and not v.is_image(i)]  # <pad>, <s>, <unk>, reserved ids
    assert VOCAB_MAP['<unk>'] in never and VOCAB_MAP['<image>'] in never
    with torch.no_grad():
        hf = model.generate(torch.from_numpy(rows[0][None]).long(), max_new_tokens=max_new, do_sample=False,
                            suppress_tokens=never, pad_token_id=v.pad)[0, len(rows[0]):].numpy()
    n = out['lengths'][0]
    print('text:', out['tokens'][0, :n].tolist(), 'transformers:', hf.tolist())
    assert n == len(hf) and n >= 10
    np.testing.assert_array_equal(out['tokens'][0, :n], hf)

    image_ok = v.allowed('image')
    seq, want, owed = list(rows[1]), [], hw
    while len(want) < max_new:
        logits = hf_logits(model, np.array([seq], np.int32))[0, -1]
        allowed = image_ok[:SIZE] if owed > 0 else text_ok[:SIZE]
        if owed == 0 and len(want) == hw:
            allowed = np.arange(SIZE) == v.end_image
        tok = int(np.where(allowed, logits, -np.inf).argmax())
        want.append(tok)
        seq.append(tok)
        owed -= owed > 0
        if tok == v.break_ and len(want) > hw:
            owed = hw
        if tok == v.eos:
            break
    got = out['tokens'][1, :out['lengths'][1]]
    print('image row:', got.tolist(), 'reference:', want)
    np.testing.assert_array_equal(got, want)
    assert v.is_image(got[:hw]).all() and got[hw] == VOCAB_MAP['<eoss>']

    # Meta's repetition penalty (1.2 in Chameleon's text preset) is transformers' too
    fn = dec.make_decoder(gen.model, vocab=v, image_tokens=hw, max_new=max_new,
                          sample=dec.SampleConfig(temperature=0.0, repetition_penalty=1.2))
    t0, s0 = generate.left_pad(rows[:1], v.pad)
    r0, p0 = dec.initial_image_state(t0, s0, v, hw)
    out = jax.device_get(fn(gen.params, jnp.asarray(t0), jnp.asarray(s0), jax.random.key(0), jnp.asarray(r0),
                            jnp.asarray(p0)))
    with torch.no_grad():
        hf = model.generate(torch.from_numpy(rows[0][None]).long(), max_new_tokens=max_new, do_sample=False,
                            suppress_tokens=never, pad_token_id=v.pad, repetition_penalty=1.2)[0, len(rows[0]):].numpy()
    n = out['lengths'][0]
    print('penalised:', out['tokens'][0, :n].tolist(), 'transformers:', hf.tolist())
    np.testing.assert_array_equal(out['tokens'][0, :n], hf)


def test_export_to_hf_round_trips_exactly(pre, tmp_path):
    model, gen, tokens, root = pre
    converted.export_hf(root / 'cm3jax', tmp_path / 'hf')
    back = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / 'hf').eval()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    converted.convert(tmp_path / 'hf', tmp_path / 'again')
    again, *_ = load_generator(tmp_path / 'again')
    jax.tree.map(np.testing.assert_array_equal, again.params, gen.params)
    assert np.abs(hf_logits(back, tokens) - hf_logits(model, tokens)).max() == 0


def test_bad_checkpoints_are_named(pre, tmp_path):
    _, _, _, root = pre
    src = tmp_path / 'hf'
    shutil.copytree(root / 'hf', src)
    config = json.loads((src / 'config.json').read_text())
    (src / 'config.json').write_text(json.dumps({**config, 'intermediate_size': 256}))
    with pytest.raises(ValueError, match=r'model\.layers\.0\.mlp\.gate_proj\.weight: the checkpoint has shape '
                                         r'\(128, 64\) but this model expects \(256, 64\)'):
        converted.convert(src, tmp_path / 'a')
    (src / 'config.json').write_text(json.dumps(config))
    chameleon_refs.tokenizer(SIZE + 3, CODES, num_text=50).save(str(src / 'tokenizer.json'))
    with pytest.raises(ValueError, match=r'tokenizer\.json has 101 ids but the model has 98'):
        converted.convert(src, tmp_path / 'b')
    TOKENIZER.save(str(src / 'tokenizer.json'))
    (src / 'vqgan.ckpt').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match=r'vqgan\.ckpt has no vqgan\.yaml beside it'):
        converted.convert(src, tmp_path / 'c')


def test_the_target_mesh_is_checked_and_recorded(pre, tmp_path):
    _, _, _, root = pre
    # 2 kv heads cannot split over a 4-way tensor axis: refused before anything is written
    with pytest.raises(ConfigError, match=r'model\.num_kv_heads=2 is not divisible by the tensor-parallel size 4'):
        converted.convert(root / 'hf', tmp_path / 'refused', mesh=(1, -1, 4))
    assert not (tmp_path / 'refused').exists()
    with pytest.raises(ConfigError, match=r'mesh\.ici=\(1, 2, 2\) has 4 devices but there are 8'):
        converted.convert(root / 'hf', tmp_path / 'refused', mesh=(1, 2, 2), devices=8)
    converted.convert(root / 'hf', tmp_path / 'ok', mesh=(1, -1, 2))
    assert json.loads((tmp_path / 'ok' / 'config.json').read_text())['mesh']['ici'] == [1, -1, 2]



def test_export_refuses_image_place_embeddings():
    """HF Chameleon has no weight for them, so dropping them would export a different model."""
    from cm3jax.convert import chameleon
    from tests.helpers import build, tiny_config
    model, params, _, _ = build(tiny_config('chameleon', image_positions=4, image_ids=(100, 200)))
    with pytest.raises(ValueError, match='only models trained with model.image_positions=0 export'):
        chameleon.to_hf(params, model.cfg, 512)
