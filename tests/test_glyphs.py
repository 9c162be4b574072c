"""The Shapes world's how-to-write task: the 3x5 font, `render_text`, and `read_text` reading it back."""

import itertools

import numpy as np
import pytest

from cm3jax.data.worlds import glyphs as G
from cm3jax.data.worlds.shapes import BACKGROUND, PALETTE

CFG = G.WriteConfig()


def texts(n, seed=0, cfg=CFG):
    rng = np.random.default_rng(seed)
    return [G.sample_text(rng, cfg) for _ in range(n)]


def blur(img):
    """Each pixel averaged with its neighbours by a [1, 2, 1] / 4 kernel per axis (a 1-pixel Gaussian)."""
    f = np.pad(img.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode='edge')
    f = (f[:-2] + 2 * f[1:-1] + f[2:]) / 4
    f = (f[:, :-2] + 2 * f[:, 1:-1] + f[:, 2:]) / 4
    return np.round(f).astype(np.uint8)


def noise(img, rng, amount=20):
    return np.clip(img.astype(np.int64) + rng.integers(-amount, amount + 1, img.shape), 0, 255).astype(np.uint8)


def test_glyphs_are_pairwise_distinct_by_two_pixels():
    font = np.stack([G.glyph(c) for c in G.ALPHABET])
    assert font.shape == (36, 5, 3) and font.dtype == bool
    assert G.ALPHABET == 'abcdefghijklmnopqrstuvwxyz0123456789'
    for (i, a), (j, b) in itertools.combinations(enumerate(font), 2):
        assert (a != b).sum() >= 2, (G.ALPHABET[i], G.ALPHABET[j])
    assert font.any((1, 2)).all()  # a blank glyph could not be told from a gap
    g = G.glyph('a')
    g[:] = True
    assert not G.glyph('a').all()  # a copy, not the font itself


@pytest.mark.parametrize('bad', ['A', ' ', '!', 'ab', ''])
def test_glyph_rejects_characters_outside_the_alphabet(bad):
    with pytest.raises(ValueError, match=G.ALPHABET) as e:
        G.glyph(bad)
    assert repr(bad) in str(e.value)


def test_render_draws_centred_text_in_the_palette_colour():
    img = G.render_text('ab1', 'green')
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert colours == {BACKGROUND, PALETTE['green']}
    # The line box is 5*2 rows by (3*3 + 2)*2 = 22 columns, centred at integer offsets.
    ys, xs = np.nonzero(img.any(-1))
    assert ys.min() >= 11 and ys.max() < 21 and xs.min() >= 5 and xs.max() < 27
    np.testing.assert_array_equal(img[11:21, 5:11].any(-1), G.glyph('a').repeat(2, 0).repeat(2, 1))


@pytest.mark.parametrize('text', ['a', 'ab', 'ab1'])
def test_render_aligns_the_line_to_the_patch_grid(text):
    """With align=4 every 2x2 font pixel lies inside one 4x4 patch: the line starts at the centred
    corner rounded down to a multiple of 4, and reads back the same."""
    cfg = G.WriteConfig(align=4)
    img = G.render_text(text, 'green', cfg)
    y0, x0 = (32 - 10) // 2 // 4 * 4, (32 - cfg.width(len(text))) // 2 // 4 * 4
    np.testing.assert_array_equal(img[y0:y0 + 10, x0:x0 + 6].any(-1), G.glyph('a').repeat(2, 0).repeat(2, 1))
    assert img.any(-1).sum() == G.render_text(text, 'green').any(-1).sum()
    assert G.legible(img, text, cfg)
    with pytest.raises(ValueError, match='align'):
        G.WriteConfig(align=0)


def test_every_character_reads_back_alone_in_every_colour():
    for c, colour in itertools.product(G.ALPHABET, CFG.colours):
        assert G.read_text(G.render_text(c, colour)) == c, (c, colour)


def test_every_character_reads_back_in_every_position():
    for i in range(len(G.ALPHABET)):
        text = ''.join(G.ALPHABET[(i + 7 * k) % 36] for k in range(CFG.max_fit))
        assert G.legible(G.render_text(text, 'purple'), text)


def test_random_strings_read_back_exactly():
    samples = texts(300)
    assert {len(t) for t, _ in samples} == {1, 2, 3} and {c for _, c in samples} == set(CFG.colours)
    for text, colour in samples:
        assert G.read_text(G.render_text(text, colour)) == text


@pytest.mark.parametrize('cfg', [G.WriteConfig(scale=1, max_chars=8), G.WriteConfig(spacing=0, max_chars=5),
                                 G.WriteConfig(canvas=48, scale=3, max_chars=4)], ids=['scale1', 'spacing0', 'scale3'])
def test_other_configs_read_back_exactly(cfg):
    for text, colour in texts(40, seed=1, cfg=cfg):
        img = G.render_text(text, colour, cfg)
        assert img.shape == (cfg.canvas, cfg.canvas, 3)
        assert G.read_text(img, cfg) == text


def test_degraded_images_still_read():
    rng = np.random.default_rng(2)
    samples = texts(200, seed=3)
    rates = {}
    for name, degrade in (('blur', blur), ('noise', lambda im: noise(im, rng)),
                          ('blur+noise', lambda im: noise(blur(im), rng))):
        rates[name] = np.mean([G.legible(degrade(G.render_text(t, c)), t) for t, c in samples])
    assert all(r >= 0.95 for r in rates.values()), rates
    # A 1-pixel shift off the centre is no degradation at all to the reader.
    for (text, colour), shift in zip(samples[:50], itertools.cycle([(1, 0), (0, -1), (-1, 1), (1, 1)])):
        assert G.legible(np.roll(G.render_text(text, colour), shift, (0, 1)), text)


def test_blank_and_illegible():
    assert G.read_text(np.zeros((32, 32, 3), np.uint8)) == ''
    assert G.read_text(noise(np.zeros((32, 32, 3), np.uint8), np.random.default_rng(0))) == ''
    img = G.render_text('cat', 'red')
    assert G.legible(img, 'cat') and not G.legible(img, 'cot')
    with pytest.raises(ValueError, match='shape'):
        G.read_text(np.zeros((32, 32), np.uint8))


@pytest.mark.parametrize('text, match', [('Cat', r"\['C'\].*ALPHABET"), ('a b', r"\[' '\]"), ('', 'non-empty'),
                                         ('abcde', 'at most 4')])
def test_render_rejects_bad_text(text, match):
    with pytest.raises(ValueError, match=match):
        G.render_text(text, 'red')


def test_render_rejects_unknown_colour():
    with pytest.raises(ValueError, match='pink'):
        G.render_text('a', 'pink')


@pytest.mark.parametrize('kwargs, field, says', [
    (dict(max_chars=5), 'max_chars', 'at most 4'), (dict(canvas=59, scale=4, max_chars=4), 'max_chars', 'at most 3'),
    (dict(min_chars=0), 'min_chars', '1 <= min_chars'), (dict(min_chars=3, max_chars=2), 'min_chars', 'max_chars'),
    (dict(scale=0), 'scale', '>= 1'), (dict(spacing=-1), 'spacing', '>= 0'), (dict(canvas=8), 'canvas', 'scale'),
    (dict(colours=('red', 'pink')), 'colours', 'pink'), (dict(colours=()), 'colours', 'distinct'),
    (dict(colours=('red', 'red')), 'colours', 'distinct'),
])
def test_config_errors_name_the_field(kwargs, field, says):
    with pytest.raises(ValueError, match=f'^WriteConfig.{field}: .*{says}'):
        G.WriteConfig(**kwargs)


def test_config_fit_and_lists():
    assert CFG.max_fit == 4 and CFG.width(4) == 30
    assert G.WriteConfig(scale=1, max_chars=8).max_fit == 8 and G.WriteConfig(spacing=0).max_fit == 5
    cfg = G.WriteConfig(colours=['red', 'blue'])
    assert cfg.colours == ('red', 'blue') and hash(cfg) == hash(G.WriteConfig(colours=('red', 'blue')))


def test_sample_text_is_a_function_of_the_generator():
    assert texts(20, seed=5) == texts(20, seed=5) != texts(20, seed=6)
    cfg = G.WriteConfig(min_chars=2, max_chars=2, colours=('cyan',))
    assert all(len(t) == 2 and c == 'cyan' and set(t) <= set(G.ALPHABET) for t, c in texts(50, cfg=cfg))
    assert all(type(t) is str and type(c) is str for t, c in texts(5))
