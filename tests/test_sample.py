"""Sampling: the cached decoder against full recomputation, guidance identities, CD-K's head,
modality control, sharded decoding and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cm3jax import parallel
from cm3jax.sample import decode as dec, logits as lp
from cm3jax.vocab import Vocab
from tests.helpers import build, tiny_config

VOCAB = Vocab.build(num_text=40, num_image_codes=24, num_sentinels=4)  # 78 ids
HW = 6  # image tokens per image in these tests


def model_and_params(variant='cm3leon', mesh=None):
    config = tiny_config(variant, vocab_size=VOCAB.size)
    model, params, mesh, rules = build(config, mesh)
    # perturb the zero-initialised output layers so that tokens depend on the context
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), params)
    return model, params, mesh, rules


def ragged_prompts(pad_left: bool):
    """Three prompts of 3, 7 and 5 tokens: text, then (row 1) text <break> (an image is due)."""
    rng = np.random.default_rng(0)
    text = lambda n: VOCAB.text_ranges[0][0] + rng.integers(0, 40, n)
    rows = [text(3), np.concatenate([text(6), [VOCAB.break_]]), text(5)]
    t = max(map(len, rows))
    tokens, segs = np.zeros((3, t), np.int32), np.zeros((3, t), np.int32)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if pad_left else slice(0, len(r))
        tokens[i, sl], segs[i, sl] = r, 1
    return tokens, segs


def reference_greedy(model, params, tokens, segs, max_new, stop_after_image=False):
    """Greedy decoding that recomputes the whole forward pass for every token, with the
    decoder's modality rules written out plainly."""
    image_ok, text_ok = VOCAB.allowed('image'), VOCAB.allowed('text', 'special')
    text_ok[[VOCAB.pad, VOCAB.bos]] = False
    remaining, pending = dec.initial_image_state(tokens, segs, VOCAB, HW)
    forward = jax.jit(lambda p, x: model.apply({'params': p}, x)[0, -1])  # one compile per length
    out = []
    for b in range(len(tokens)):
        seq = list(tokens[b][segs[b] > 0])
        rem, pend, new = int(remaining[b]), bool(pending[b]), []
        while len(new) < max_new:
            logits = np.asarray(forward(params, jnp.asarray([seq], jnp.int32)))
            ok = np.zeros(len(logits), bool)
            allowed = [VOCAB.break_] if pend else np.flatnonzero(image_ok if rem > 0 else text_ok)
            ok[allowed] = True
            tok = int(np.where(ok, logits, -np.inf).argmax())
            new.append(tok)
            seq.append(tok)
            if rem > 0:
                rem -= 1
                if rem == 0:
                    if stop_after_image:
                        break
                    pend = True
            else:
                rem = HW if (tok == VOCAB.break_ and not pend) else 0
                pend = False
            if tok == VOCAB.eos:
                break
        out.append(new + [VOCAB.pad] * (max_new - len(new)))
    return np.array(out)


@pytest.mark.parametrize('variant', ['cm3leon', 'chameleon'])
@pytest.mark.parametrize('pad_left', [True, False])
def test_cached_greedy_decode_equals_full_recomputation(variant, pad_left):
    model, params, *_ = model_and_params(variant)
    tokens, segs = ragged_prompts(pad_left)
    got = decode_rows(model, params, tokens, segs, dec.SampleConfig(temperature=0.0), samples=3, max_new=12)
    want = reference_greedy(model, params, tokens, segs, 12)
    np.testing.assert_array_equal(got['tokens'], want)
    # row 1 owed an image: its first HW tokens are image codes, then the forced <break>
    assert VOCAB.is_image(got['tokens'][1, :HW]).all() and got['tokens'][1, HW] == VOCAB.break_


def test_guidance_identities():
    k = jax.random.split(jax.random.key(0), 3)
    cond, uncond, image_only = (jax.random.normal(x, (4, 50)) * 3 for x in k)
    np.testing.assert_allclose(lp.cfg(cond, uncond, 1.0), lp.log_probs(cond), atol=1e-6)
    np.testing.assert_allclose(lp.cfg(cond, uncond, 0.0), lp.log_probs(uncond), atol=1e-6)
    np.testing.assert_allclose(lp.cfg3(cond, uncond, uncond, 3.0, 1.2), lp.cfg(cond, uncond, 3.0), atol=1e-5)
    np.testing.assert_allclose(lp.cfg(cond + 7.0, uncond - 2.0, 3.0), lp.cfg(cond, uncond, 3.0), atol=1e-5)
    only = lp.cdk(cond, uncond, k=1, alpha=1.0)
    assert (np.isfinite(np.asarray(only)).sum(-1) == 1).all()
    np.testing.assert_array_equal(np.asarray(only).argmax(-1), np.asarray(cond).argmax(-1))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**30), k=st.integers(1, 20), alpha=st.floats(0.01, 1.0), temp=st.floats(0.1, 3.0),
       top_p=st.floats(0.05, 1.0))
def test_cdk_never_selects_outside_the_head(seed, k, alpha, temp, top_p):
    keys = jax.random.split(jax.random.key(seed), 3)
    expert, amateur = jax.random.normal(keys[0], (8, 64)) * 4, jax.random.normal(keys[1], (8, 64)) * 4
    tokens = lp.sample(keys[2], lp.cdk(expert, amateur, k, alpha), temp, 0, top_p)
    head = np.asarray(lp.cdk_head(expert, k, alpha))
    assert head[np.arange(8), np.asarray(tokens)].all()


def test_where_a_prompt_leaves_the_image_state_machine():
    t, img = VOCAB.text_ranges[0][0] + np.arange(3), VOCAB.image_offset + np.arange(HW)
    cases = {  # prompt -> (image codes still owed, a <break> due)
        'text': (t, 0, False), 'text <break>': (np.r_[t, VOCAB.break_], HW, False),
        'image': (img, 0, True), 'part of an image': (img[:2], HW - 2, False),
        'text <break> part': (np.r_[t, VOCAB.break_, img[:2]], HW - 2, False),
        'image <break>': (np.r_[img, VOCAB.break_], 0, False), 'image <break> text': (np.r_[img, VOCAB.break_, t], 0, False)}
    for name, (row, owed, due) in cases.items():
        remaining, pending = dec.initial_image_state(row[None], np.ones((1, len(row)), np.int32), VOCAB, HW)
        assert (remaining[0], pending[0]) == (owed, due), name


def test_top_k_and_top_p_truncate():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(np.asarray(lp.top_k(logits, 2))).sum() == 2
    assert np.isfinite(np.asarray(lp.top_p(logits, 0.7))).sum() == 2   # 0.5 + 0.3 reaches 0.7
    assert np.isfinite(np.asarray(lp.top_p(logits, 0.5))).sum() == 1
    assert np.isfinite(np.asarray(lp.top_p(logits, 1.0))).sum() == 4
    wide = jax.random.normal(jax.random.key(0), (2, 65_536)) * 3  # float32 cumsum reaches 1 early here
    assert np.isfinite(np.asarray(lp.top_p(wide, 1.0))).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**30), p=st.floats(0.01, 0.999), scale=st.floats(0.1, 8.0), ties=st.booleans())
def test_top_p_keeps_the_sorted_nucleus(seed, p, scale, ties):
    """The sort-free cut equals the definition: sort descending, keep each id whose mass ranked
    above it is below p, and every id tied with the last one kept (ties and -0.0 included)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(4, 300)).astype(np.float32) * scale
    logits[:, rng.integers(0, 300, 40)] = -np.inf
    if ties:
        logits = np.round(logits * 2) / 2  # many equal values, and -0.0 beside 0.0
    kept = np.isfinite(np.asarray(lp.top_p(jnp.asarray(logits), p)))
    for row, got in zip(logits, kept):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-row, kind='stable')
        before = np.cumsum(probs[order]) - probs[order]
        cut = row[order][max((before < p).sum() - 1, 0)]
        want = row >= cut
        # float32 sums may put the cut one value over when the mass lands on p within rounding
        if (got != want).any():
            edge = np.abs(np.sort(np.cumsum(probs[order])) - p).min()
            assert edge < 1e-5, (p, got.sum(), want.sum())


def guided_prompts():
    """Two samples, stream-major: conditional prompts (text <break>: an image is due), then
    unconditional ones (<mask> <break>, left-padded)."""
    text = VOCAB.text_ranges[0][0] + np.arange(5)
    cond = np.stack([np.concatenate([text + i, [VOCAB.break_]]) for i in range(2)]).astype(np.int32)
    uncond = np.stack([np.array([0, 0, 0, 0, VOCAB.mask, VOCAB.break_])] * 2).astype(np.int32)
    return np.concatenate([cond, uncond]), np.concatenate([np.ones_like(cond), (uncond != 0).astype(np.int32)])


def decode_rows(model, params, tokens, segs, sample, samples=2, max_new=10, rng=1, stop_after_image=False):
    remaining, pending = dec.initial_image_state(tokens[:samples], segs[:samples], VOCAB, HW)
    fn = dec.make_decoder(model, vocab=VOCAB, image_tokens=HW, max_new=max_new, sample=sample,
                          stop_after_image=stop_after_image)
    return jax.device_get(fn(params, jnp.asarray(tokens), jnp.asarray(segs), jax.random.key(rng),
                             jnp.asarray(remaining), jnp.asarray(pending)))


def test_cfg_scale_one_and_zero_in_the_decoder():
    model, params, *_ = model_and_params()
    tokens, segs = guided_prompts()
    guided = decode_rows(model, params, tokens, segs, dec.SampleConfig(cfg_scale=1.0))
    cond_only = decode_rows(model, params, tokens[:2], segs[:2], dec.SampleConfig())
    np.testing.assert_array_equal(guided['tokens'], cond_only['tokens'])
    # scale 0: the unconditional stream alone decides (its tokens fed back to both streams)
    zero = decode_rows(model, params, tokens, segs, dec.SampleConfig(cfg_scale=0.0))
    swapped = np.concatenate([tokens[2:], tokens[:2]]), np.concatenate([segs[2:], segs[:2]])
    remaining, pending = dec.initial_image_state(tokens[:2], segs[:2], VOCAB, HW)
    fn = dec.make_decoder(model, vocab=VOCAB, image_tokens=HW, max_new=10, sample=dec.SampleConfig(cfg_scale=1.0))
    uncond_led = jax.device_get(fn(params, jnp.asarray(swapped[0]), jnp.asarray(swapped[1]), jax.random.key(1),
                                   jnp.asarray(remaining), jnp.asarray(pending)))
    np.testing.assert_array_equal(zero['tokens'], uncond_led['tokens'])


def test_modality_control_with_guidance_and_cdk():
    model, params, *_ = model_and_params()
    tokens, segs = guided_prompts()
    for mode in ('sample', 'cdk', 'mixed'):
        out = decode_rows(model, params, tokens, segs, dec.SampleConfig(cfg_scale=3.0, mode=mode, top_p=0.9),
                          max_new=3 * HW, rng=7)
        for row, n in zip(out['tokens'], out['lengths']):
            row = row[:n]
            assert VOCAB.is_image(row[:HW]).all(), row             # exactly H*W image codes
            assert row[HW] == VOCAB.break_                          # then the image is closed
            rest = row[HW + 1:]
            # text spans hold no image codes; a <break> in text opens a full image again
            i = 0
            while i < len(rest):
                if rest[i] == VOCAB.break_:
                    span = rest[i + 1:i + 1 + HW]
                    assert VOCAB.is_image(span).all()
                    i += 1 + HW + 1
                else:
                    assert not VOCAB.is_image(rest[i])
                    i += 1
    stopped = decode_rows(model, params, tokens, segs, dec.SampleConfig(cfg_scale=3.0), max_new=3 * HW,
                          stop_after_image=True)
    assert stopped['done'].all() and (stopped['lengths'] == HW).all()
    assert VOCAB.is_image(stopped['tokens'][:, :HW]).all() and (stopped['tokens'][:, HW:] == VOCAB.pad).all()


def test_three_streams_reduce_to_two():
    model, params, *_ = model_and_params()
    tokens, segs = guided_prompts()
    two = decode_rows(model, params, tokens, segs, dec.SampleConfig(cfg_scale=3.0))
    # image-only stream = the unconditional prompt: cfg3 reduces to cfg
    three_t = np.concatenate([tokens, tokens[2:]])
    three_s = np.concatenate([segs, segs[2:]])
    three = decode_rows(model, params, three_t, three_s, dec.SampleConfig(cfg_scale=3.0, image_cfg_scale=1.7))
    np.testing.assert_array_equal(two['tokens'], three['tokens'])


def test_cdk_expert_is_the_conditional_stream():
    """With k = 1 and alpha = 1, V_head is the expert's argmax alone, so CD-K decodes the expert's
    greedy path: the conditional stream's by default (the paper's), the CFG-mixed one on request."""
    model, params, *_ = model_and_params()
    tokens, segs = guided_prompts()
    cdk = lambda expert: decode_rows(model, params, tokens, segs, dec.SampleConfig(  # noqa: E731
        mode='cdk', cdk_k=1, cdk_alpha=1.0, cfg_scale=3.0, cdk_expert=expert))['tokens']
    conditional = decode_rows(model, params, tokens[:2], segs[:2], dec.SampleConfig(temperature=0))['tokens']
    guided = decode_rows(model, params, tokens, segs, dec.SampleConfig(temperature=0, cfg_scale=3.0))['tokens']
    assert (conditional != guided).any()  # the two experts disagree somewhere on this model
    np.testing.assert_array_equal(cdk('conditional'), conditional)
    np.testing.assert_array_equal(cdk('guided'), guided)
    assert dec.SampleConfig().cdk_expert == 'conditional'
    with pytest.raises(ValueError, match='cdk_expert'):
        dec.SampleConfig(cdk_expert='amateur')


def test_cdk_with_a_second_smaller_model_as_amateur():
    model, params, *_ = model_and_params()
    small, small_params, *_ = build(tiny_config(vocab_size=VOCAB.size, num_layers=1))
    tokens, segs = guided_prompts()
    cond, cond_segs = tokens[:2], segs[:2]
    remaining, pending = dec.initial_image_state(cond, cond_segs, VOCAB, HW)
    args = (jnp.asarray(cond), jnp.asarray(cond_segs), jax.random.key(4), jnp.asarray(remaining), jnp.asarray(pending))
    # k = 1, alpha = 1: V_head is the expert's argmax alone, whatever the amateur says
    fn = dec.make_decoder(model, vocab=VOCAB, image_tokens=HW, max_new=10, amateur=small,
                          sample=dec.SampleConfig(mode='cdk', cdk_k=1, cdk_alpha=1.0))
    greedy = dec.make_decoder(model, vocab=VOCAB, image_tokens=HW, max_new=10, sample=dec.SampleConfig(temperature=0))
    np.testing.assert_array_equal(jax.device_get(fn(params, *args, amateur_params=small_params))['tokens'],
                                  jax.device_get(greedy(params, *args))['tokens'])
    with pytest.raises(ValueError, match='needs an amateur'):
        dec.make_decoder(model, vocab=VOCAB, image_tokens=HW, max_new=4,
                         sample=dec.SampleConfig(mode='cdk'))(params, *args)


def test_sharded_sampling_equals_one_device():
    tokens, segs = guided_prompts()
    sample = dec.SampleConfig(cfg_scale=2.0, top_p=0.9, mode='mixed')
    model1, params1, *_ = model_and_params()
    one = decode_rows(model1, params1, np.tile(tokens, (2, 1))[[0, 1, 0, 1, 2, 3, 2, 3]],
                      np.tile(segs, (2, 1))[[0, 1, 0, 1, 2, 3, 2, 3]], sample, samples=4)
    mesh = parallel.create_mesh((2, 2, 2))
    model8, params8, mesh, rules = model_and_params(mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        eight = decode_rows(model8, params8, np.tile(tokens, (2, 1))[[0, 1, 0, 1, 2, 3, 2, 3]],
                            np.tile(segs, (2, 1))[[0, 1, 0, 1, 2, 3, 2, 3]], sample, samples=4)
    np.testing.assert_array_equal(one['tokens'], eight['tokens'])


def test_bad_requests_are_refused():
    model, *_ = model_and_params()
    with pytest.raises(ValueError, match='exceeds the model\'s context'):
        dec.check_lengths(model.cfg, 100, 64)
    with pytest.raises(ValueError, match='at least one new token'):
        dec.check_lengths(model.cfg, 10, 0)
    with pytest.raises(ValueError, match='sample mode'):
        dec.SampleConfig(mode='beam')
    with pytest.raises(ValueError, match='more than the'):
        dec.initial_image_state(np.array([[VOCAB.break_] + [VOCAB.image_offset] * (HW + 1)]),
                                np.ones((1, HW + 2), np.int32), VOCAB, HW)
