"""Chameleon-style generation from a directory `cm3jax convert chameleon` wrote (with a VQ-GAN):
the prompt formats, the three guidance streams as Meta's inference builds them, guided image
decoding against the guidance computed by hand, and captioning. Skipped without the [parity]
extra (the weights come from a tiny random transformers Chameleon and taming VQ-GAN)."""

import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('taming.modules.diffusionmodules.model')

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cm3jax.convert import converted, vqgan  # noqa: E402
from cm3jax.sample import chameleon, decode as dec, generate, logits as lp  # noqa: E402
from cm3jax.sample.load import load_generator  # noqa: E402
from cm3jax.vocab import Vocab  # noqa: E402
from tests import chameleon_refs  # noqa: E402

SIZE, CODES = 98, 32
TOKENIZER = chameleon_refs.tokenizer(SIZE, CODES, num_text=50)


@pytest.fixture(scope='module')
def converted_dir(tmp_path_factory, repo):
    """HF weights + Meta's vqgan.ckpt/yaml beside them, converted by the command line."""
    root = tmp_path_factory.mktemp('chameleon')
    model = chameleon_refs.hf_chameleon(TOKENIZER.get_vocab())
    model.save_pretrained(root / 'hf')
    TOKENIZER.save(str(root / 'hf' / 'tokenizer.json'))
    vq_state = chameleon_refs.write_vqgan(root / 'hf', CODES)
    out = subprocess.run([sys.executable, '-m', 'cm3jax', 'convert', 'chameleon', f'--src={root / "hf"}',
                          f'--dst={root / "out"}'], cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return root, vq_state


@pytest.fixture(scope='module')
def gen(converted_dir):
    return load_generator(converted_dir[0] / 'out')[0]


def test_the_command_line_converts_the_vqgan_too(converted_dir, gen):
    root, vq_state = converted_dir
    assert gen.vq_cfg.num_codes == gen.vocab.num_image_codes == CODES and gen.image_tokens == 64
    want = vqgan.from_torch(vq_state, gen.vq_cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(gen.vq_params), jax.device_get(want))
    with pytest.raises(FileExistsError, match='is not empty; give a new directory'):
        converted.convert(root / 'hf', root / 'out')


def _image(seed):
    return np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_prompt_formats_and_guidance_streams(gen):
    v = gen.vocab
    image = _image(0)
    wrapped = chameleon.image_ids(gen, image)
    assert wrapped[0] == v.break_ and wrapped[-1] == v.end_image == TOKENIZER.token_to_id('<eoss>')
    words = TOKENIZER.encode('a red cat').ids
    doc = chameleon.document(gen, ['a red cat', image, 'a red cat'])
    np.testing.assert_array_equal(doc, [v.bos, *words, *wrapped, *words])
    np.testing.assert_array_equal(chameleon.caption_prompt(gen, image, 'a red cat', end_of_turn=False),
                                  [v.bos, *wrapped, *words])
    with pytest.raises(ValueError, match='no <reserved08706>'):
        chameleon.caption_prompt(gen, image)
    prompt = np.concatenate([doc, [v.break_]])
    full, none, image_only = chameleon.guidance_streams(prompt, v)
    np.testing.assert_array_equal(full, prompt)
    np.testing.assert_array_equal(none, [v.bos, v.break_])  # Meta's unconditional stream
    np.testing.assert_array_equal(image_only, [v.bos, *wrapped, v.break_])  # the text removed
    assert chameleon.IMAGE == dec.SampleConfig(temperature=0.7, top_p=0.9, cfg_scale=3.0, image_cfg_scale=1.2)


def test_guided_image_equals_guidance_by_hand(gen):
    """Greedy 3-stream decoding (3.0 / 1.2) of an image-conditioned prompt: each code is the
    argmax over image codes of cfg3(full, image-only, none), recomputed by full forward passes;
    the codes decode to an image; the preset's sampled run makes a valid image too."""
    v = gen.vocab
    segments = [_image(1), 'a red cat']
    greedy = dataclasses.replace(chameleon.IMAGE, temperature=0.0)
    out = chameleon.text_to_image(gen, [segments], sample=greedy)
    codes = out['codes'][0, 0].reshape(-1)
    assert out['images'].shape == (1, 1, 16, 16, 3) and out['images'].dtype == np.uint8
    prompt = np.concatenate([chameleon.document(gen, segments), [v.break_]])
    streams = chameleon.guidance_streams(prompt, v)
    forward = jax.jit(lambda p, t, seg: gen.model.apply({'params': p}, t, seg)[:, -1])
    image_ok = v.allowed('image')
    for k in range(3):  # the first codes, by hand: the three streams left-padded into one batch (one compile)
        tokens, segs = generate.left_pad([np.concatenate([s, v.image_ids(codes[:k])]) for s in streams], v.pad,
                                         width=len(prompt) + 3)
        full, none, image_only = np.asarray(forward(gen.params, jnp.asarray(tokens), jnp.asarray(segs)))
        mixed = np.asarray(lp.cfg3(full[None], image_only[None], none[None], 3.0, 1.2))[0]
        assert v.image_codes(int(np.where(image_ok[:len(mixed)], mixed, -np.inf).argmax())) == codes[k]


def test_captioning_writes_text(gen):
    captions = chameleon.image_to_text(gen, np.stack([_image(2), _image(3)]), question='a red cat',
                                       end_of_turn=False, max_new=8)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    cm3leon = dataclasses.replace(gen, vocab=Vocab.build(10, 8))
    with pytest.raises(ValueError, match='needs a Chameleon vocab'):
        chameleon.image_to_text(cm3leon, np.stack([_image(2)]))
