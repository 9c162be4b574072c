"""text_to_image / image_to_text / continue_document on a tiny random model and tokenizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import text_tokenizer
from cm3jax.sample import decode as dec, generate
from cm3jax.vocab import Vocab
from cm3jax.vq import model as vq
from tests.helpers import build, random_vq_params, tiny_config

VQ = vq.VQConfig(resolution=8, ch=32, ch_mult=(1, 2), z_channels=8, embed_dim=4, num_codes=16)  # 4x4 codes


@pytest.fixture(scope='module')
def gen():
    tok = text_tokenizer.train_bpe(['a red circle left of a blue square'] * 10, vocab_size=270)
    vocab = Vocab.build(tok.num_text, VQ.num_codes, num_sentinels=4)
    model, params, *_ = build(tiny_config(vocab_size=vocab.size))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), params)
    vq_params = random_vq_params(VQ, 8)
    return generate.Generator(model, params, vocab, tok, vq_params, VQ)


def test_text_to_image_with_guidance_mixed_strategies_and_reranking(gen):
    calls = []

    def score(images, prompt):  # a stand-in for CLIP: brighter is better
        calls.append(prompt)
        return images.reshape(len(images), -1).mean(-1)

    sample = dec.SampleConfig(cfg_scale=3.0, top_p=0.9, mode='mixed', cdk_fraction=0.5)
    out = generate.text_to_image(gen, ['a red circle', 'a blue square left of a red circle'], num=3, sample=sample,
                                 rng=jax.random.key(5), score_fn=score)
    assert out['images'].shape == (2, 3, 8, 8, 3) and out['images'].dtype == np.uint8
    assert out['codes'].shape == (2, 3, 4, 4) and (out['codes'] >= 0).all() and (out['codes'] < 16).all()
    assert calls == ['a red circle', 'a blue square left of a red circle']
    assert (np.diff(out['scores'], axis=1) <= 0).all()  # best first
    # the images are the VQ decoding of the codes
    again = np.asarray(vq.decode(gen.vq_params, jnp.asarray(out['codes'][0]), VQ))
    np.testing.assert_array_equal(again, out['images'][0])
    # retrieved documents go before both streams' prompts
    doc = np.concatenate([gen.text('a red circle'), [gen.vocab.break_], gen.vocab.image_ids(np.arange(16)),
                          [gen.vocab.eos]]).astype(np.int32)
    with_doc = generate.text_to_image(gen, ['a red circle'], num=2, sample=sample, retrieved=[[doc]])
    assert with_doc['images'].shape == (1, 2, 8, 8, 3)


def test_image_to_text_and_interleaved_continuation(gen):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
    for form in ('infill', 'continue'):
        captions = generate.image_to_text(gen, images, form=form, max_new=8)
        assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    parts = generate.continue_document(gen, ['a red circle', images[0]], max_new=20,
                                       sample=dec.SampleConfig(temperature=1.0))
    assert all(isinstance(p, str) or (p.shape == (8, 8, 3) and p.dtype == np.uint8) for p in parts)


def test_bad_requests_are_refused(gen):
    with pytest.raises(ValueError, match='num=0: ask for at least one sample'):
        generate.text_to_image(gen, ['a red circle'], num=0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate.text_to_image(gen, ['a red circle ' * 40], num=1)
    with pytest.raises(ValueError, match='images of shape'):
        generate.image_to_text(gen, np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="form='caption'"):
        generate.image_to_text(gen, np.zeros((1, 8, 8, 3), np.uint8), form='caption')


def test_image_nll_scores_each_image_after_either_stream(gen):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    captions = ['a red circle', 'a blue square', 'a red circle left of a blue square']
    both = generate.image_nll(gen, captions + [None] * 3, np.concatenate([images, images]), batch=4)
    cond, uncond = both[:3], both[3:]
    assert both.shape == (6,) and np.isfinite(both).all() and (both > 0).all()
    assert not np.allclose(cond, uncond)  # the caption reaches the image tokens
    # the same image after the same prompt scores the same, whatever shares its batch or padding
    alone = generate.image_nll(gen, captions[1:2], images[1:2])
    np.testing.assert_allclose(alone, cond[1:2], rtol=1e-5)
    np.testing.assert_allclose(generate.image_nll(gen, [None], images[2:3]), uncond[2:3], rtol=1e-5)
    with pytest.raises(ValueError, match='one caption'):
        generate.image_nll(gen, captions[:2], images)


def test_caption_nll_is_the_teacher_forced_loss_of_caption_and_eos_after_the_image(gen):
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    captions = ['a red circle', 'a blue square left of a red circle', 'a blue square']
    got = generate.caption_nll(gen, images, captions, batch=2)  # two chunks, padded rows of other lengths
    v = gen.vocab
    for image, caption, nll in zip(images, captions, got):
        codes = np.asarray(vq.encode(gen.vq_params, image[None], VQ)).reshape(-1)
        target = np.concatenate([gen.text(caption), [v.eos]])
        row = np.concatenate([v.image_ids(codes), [v.break_], target]).astype(np.int32)
        logits = gen.model.apply({'params': gen.params}, jnp.asarray(row[None, :-1]), jnp.ones((1, len(row) - 1),
                                                                                               jnp.int32))
        logp = jax.nn.log_softmax(logits[0, :, :v.size].astype(jnp.float32))
        want = -sum(float(logp[len(row) - 1 - len(target) + j, t]) for j, t in enumerate(target))
        assert nll == pytest.approx(want, rel=1e-4)
    codes = np.asarray(vq.encode(gen.vq_params, images, VQ))  # the model's own samples are scored on their codes
    np.testing.assert_allclose(generate.caption_nll_codes(gen, codes, captions, batch=2), got, rtol=1e-6)
    # image_nll goes through the same teacher forcing: its mean over image tokens
    assert generate.image_nll(gen, captions, images).shape == (3,)
    with pytest.raises(ValueError, match='one caption per image'):
        generate.caption_nll(gen, images, captions[:2])


def test_read_image_says_what_to_pass(tmp_path):
    from PIL import Image
    with pytest.raises(FileNotFoundError, match=r'no such file; pass a PNG or JPEG of 8x8 RGB'):
        generate.read_image(tmp_path / 'missing.png', 8)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'grey.png')
    with pytest.raises(ValueError, match=r'is a L image; pass an RGB one'):
        generate.read_image(tmp_path / 'grey.png', 8)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / 'wide.png')
    with pytest.raises(ValueError, match=r'is 12x8, but this model\'s image tokenizer takes 8x8'):
        generate.read_image(tmp_path / 'wide.png', 8)
    (tmp_path / 'junk.png').write_bytes(b'not an image')
    with pytest.raises(ValueError, match='is not a readable image'):
        generate.read_image(tmp_path / 'junk.png', 8)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / 'ok.png')
    assert (generate.read_image(tmp_path / 'ok.png', 8) == 7).all()
