"""Chameleon-style generation from a directory `cm3jax convert chameleon` wrote (with a VQ-GAN):
the prompt formats, the three guidance streams as Meta's inference builds them, guided image
decoding against the guidance computed by hand, and captioning. Skipped without the [parity]
extra (the weights come from a tiny random transformers Chameleon and taming VQ-GAN)."""

import json
import shutil
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
from cm3jax.vq import model as vq  # noqa: E402
from tests import chameleon_refs, damage  # noqa: E402

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


def test_sample_checkpoint_draws_and_captions_from_the_converted_directory(converted_dir, tmp_path):
    from PIL import Image
    Image.fromarray(_image(4)).save(tmp_path / 'in.png')
    done = damage.cli('sample', f'--checkpoint={converted_dir[0] / "out"}', '--prompt=a red cat', '--num=2',
                f'--image={tmp_path / "in.png"}', '--noend_of_turn', f'--out={tmp_path / "samples"}', '--seed=3')
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'{tmp_path / "samples"}/samples.png' in done.stdout  # it says where the pictures went
    assert np.asarray(Image.open(tmp_path / 'samples' / 'samples.png')).shape == (16, 32, 3)  # one row of 2
    assert f'{tmp_path / "in.png"}: ' in done.stdout and (tmp_path / 'samples' / 'captions.json').is_file()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'small.png')
    done = damage.cli('sample', f'--checkpoint={converted_dir[0] / "out"}', f'--image={tmp_path / "small.png"}')
    damage.refused(done, 'small.png is 8x8, but this model\'s image tokenizer takes 16x16')


def test_train_init_from_the_converted_directory_starts_from_its_params(converted_dir, tmp_path):
    """Shards prepared in the converted directory's vocab (`vocab.layout=chameleon`), then
    `--config=configs/lm.py:converted=DIR --init_from=DIR`: the converted model's own shape, its
    params at step 0; one step at a negligible rate leaves them where they were."""
    out = converted_dir[0] / 'out'
    done = damage.cli('prepare', '--config=configs/data.py:digits', '--config.source.size=16',
                '--config.source.split=test',
                f'--config.vq_workdir={out / "vqgan"}',
                f'--config.text_tokenizer.path={out / "tokenizer.json"}', '--config.vocab.layout=chameleon',
                f'--config.out={tmp_path / "data"}', '--config.prepare.progress=False')
    assert done.returncode == 0, done.stderr[-3000:]
    from cm3jax.data import pipeline, prepare
    vocab = Vocab.from_dict(prepare.read_manifest(tmp_path / 'data')['vocab'])
    assert vocab.size == SIZE and vocab.end_image == TOKENIZER.token_to_id('<eoss>')
    tokens, _ = pipeline.Pipeline(tmp_path / 'data', vocab, pipeline.PipelineConfig(seq_len=96, batch=1)).example(0)
    start = list(tokens).index(vocab.break_)  # the image, wrapped as Chameleon wraps it
    assert vocab.is_image(tokens[start + 1:start + 65]).all() and tokens[start + 65] == vocab.end_image
    done = damage.cli('train', f'--config=configs/lm.py:converted={out}', f'--init_from={out}',
                f'--workdir={tmp_path / "run"}', f'--config.data.dir={tmp_path / "data"}', '--config.train.steps=1',
                '--config.train.batch=8', '--config.train.seq_len=96', '--config.train.eval_every=0',
                '--config.train.progress=False', '--config.optim.learning_rate=1e-12', '--config.optim.warmup_steps=0')
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'initialised params from {out}' in done.stderr + done.stdout
    from cm3jax import params as params_lib
    gen = load_generator(out)[0]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), gen.params)
    after = params_lib.restore(tmp_path / 'run', target)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9),
                 jax.device_get(after), jax.device_get(gen.params))
    done = damage.cli('config', f'--config=configs/lm.py:converted={tmp_path / "nowhere"}')
    damage.refused(done, 'config.json is missing', 'cm3jax convert chameleon')


def test_export_from_a_meta_source_carries_its_vqgan_encoder_to_transformers(converted_dir, gen, tmp_path):
    """A directory converted from Meta's layout has the VQ-GAN but no HF ``vqmodel`` tensors:
    the export writes the encoder side and its ``vq_config``, and transformers' VQ encoder then
    gives the image tokens cm3jax gives."""
    src = tmp_path / 'meta-converted'
    shutil.copytree(converted_dir[0] / 'out', src)
    (src / converted.HF_VQ_FILE).unlink()  # what a Meta source leaves
    record = json.loads((src / 'config.json').read_text())
    record['converted'].pop('hf_vq_config', None)
    (src / 'config.json').write_text(json.dumps(record))
    back = vqgan.from_torch(vqgan.to_torch(jax.device_get(gen.vq_params)), gen.vq_cfg)
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(gen.vq_params))  # the two maps invert

    converted.export_hf(src, tmp_path / 'hf')
    model, info = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / 'hf',
                                                                                 output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    images = np.stack([_image(5), _image(6)])
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        hf_ids = model.eval().model.get_image_tokens(pixels).numpy()
    codes = np.asarray(vq.encode(gen.vq_params, images, gen.vq_cfg)).reshape(len(images), -1)
    np.testing.assert_array_equal(hf_ids, gen.vocab.image_ids(codes))


def test_interleaved_continuation_reads_back_text_and_images(gen):
    """`continue_document` decodes its tokens into segments; an image is a whole span of codes
    between <racm3:break> and <eoss>, decoded by the VQ-GAN; the rest is text."""
    v = gen.vocab
    image = _image(7)
    codes = np.asarray(vq.encode(gen.vq_params, image[None], gen.vq_cfg)).reshape(-1)
    words = TOKENIZER.encode('a red cat').ids
    row = np.array([*words, v.break_, *v.image_ids(codes), v.end_image, *words, v.eos])
    parts = generate.segments_of(gen, row)
    assert [type(p) for p in parts] == [str, np.ndarray, str] and parts[0] == parts[2] == TOKENIZER.decode(words)
    np.testing.assert_array_equal(parts[1], np.asarray(vq.decode(gen.vq_params, codes.reshape(1, 8, 8),
                                                                 gen.vq_cfg))[0])
    greedy = dataclasses.replace(chameleon.TEXT, temperature=0.0)
    out = chameleon.continue_document(gen, ['a red cat', image, 'it is'], max_new=12, sample=greedy)
    assert out == chameleon.continue_document(gen, ['a red cat', image, 'it is'], max_new=12, sample=greedy)
    assert all(isinstance(p, str) or (p.shape == (16, 16, 3) and p.dtype == np.uint8) for p in out)
