"""`cm3jax eval` end to end on a tiny trained workdir (a random image tokenizer, 16-pixel Shapes
data prepared with it, two LM steps, a tiny random HF CLIP): the Shapes suite writes both reports,
every figure carries its protocol; a missing Inception file is refused naming the file and
where to get it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cm3jax import trainers
from cm3jax.data import prepare
from configs import data as data_configs
from tests.helpers import hf_clip_dir, one_device_env, random_tokenizer_workdir, tiny_config

# A 16-pixel world of up to two objects (small radii make room), and a tokenizer of 4x4 codes for it.
WORLD = {'canvas': 16, 'max_objects': 2, 'sizes': [['small', 2], ['large', 3]]}
VQ = {'resolution': 16, 'ch': 32, 'ch_mult': [1, 2, 2], 'num_res_blocks': 1, 'attn_resolutions': [],
      'z_channels': 8, 'embed_dim': 4, 'num_codes': 32}
ONE_DEVICE = one_device_env()  # the command compiles for one device


def _clip_dir(path):
    """A tiny random HF CLIP whose word-level tokenizer knows the Shapes captions' words."""
    hf_clip_dir(path, ['[UNK]', 'a', 'an', 'and', 'red', 'blue', 'green', 'yellow', 'purple', 'cyan', 'circle',
                       'square', 'triangle', 'left', 'right', 'of', 'above', 'below', 'small', 'large', 'two',
                       'three', 'shapes'], layers=1, max_positions=32, image_size=16)


def _run(*args, cwd, env):
    return subprocess.run([sys.executable, '-m', 'cm3jax', 'eval', *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_eval_runs_on_a_tiny_trained_workdir_and_refuses_a_missing_inception(tmp_path, repo):
    env = {**ONE_DEVICE, 'CM3JAX_CACHE': str(tmp_path / 'cache')}
    missing = tmp_path / 'weights' / 'pt_inception-2015-12-05-6726825d.pth'
    refused = _run('--suite=shapes', f'--workdir={tmp_path}', f'--inception={missing}', cwd=repo, env=env)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert 'Traceback' not in refused.stderr
    assert f'{missing} are missing' in refused.stderr and 'pytorch-fid/releases/download' in refused.stderr

    random_tokenizer_workdir(tmp_path / 'vq', VQ)
    data = data_configs.get_config('shapes')
    data.source.update(count=48, cfg=WORLD)
    data.out, data.vq_workdir = str(tmp_path / 'data'), str(tmp_path / 'vq')
    data.text_tokenizer.update(vocab_size=280, train_documents=48)
    data.prepare.update(shard_size=48, progress=False)
    manifest = prepare.run(data)
    lm = tiny_config()
    lm.mesh.ici = (1, -1, 1)
    lm.model.vocab_size = manifest['vocab']['size']
    lm.data.update(dir=str(tmp_path / 'data'))
    lm.train.update(steps=2, eval_every=1000, log_every=1, seq_len=96, batch=8, checkpoint_every=2, progress=False)
    trainers.train(lm, str(tmp_path / 'lm'))
    _clip_dir(tmp_path / 'clip')

    done = _run('--suite=shapes', f'--workdir={tmp_path / "lm"}', '--num=2', '--extractor=clip',
                f'--retriever={tmp_path / "clip"}', '--cfg=1', '--mode=sample', '--seed=3',
                f'--world={json.dumps(WORLD)}', cwd=repo, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / 'lm' / 'eval'
    report = json.loads((out / 'report.json').read_text())
    md = (out / 'report.md').read_text()
    m = report['metrics']
    assert set(m) == {'text_to_image/judge', 'text_to_image/fid', 'text_to_image/clip_score',
                      'image_to_text/judge_exact', 'image_to_text/cider_d', 'tokenizer'}
    for name, entry in m.items():
        assert entry['protocol']['seed'] == 3 and entry['protocol']['n'] > 0, name
    judge = m['text_to_image/judge']
    assert set(judge['seen_pairs']['categories']) == {'single_object', 'two_objects', 'counting', 'colours',
                                                      'position', 'colour_binding'}
    assert judge['protocol']['n'] == 24 and judge['protocol']['sample']['cfg_scale'] == 1.0
    assert 0 <= judge['seen_pairs']['exact']['value'] <= 1 and 'held_out_pairs' in judge
    assert m['text_to_image/fid']['value'] > 0 and m['text_to_image/fid']['protocol']['extractor'].startswith('CLIP')
    assert 0 <= m['text_to_image/clip_score']['value'] <= 100
    assert m['image_to_text/cider_d']['value'] >= 0 and m['image_to_text/cider_d']['n'] == 12
    assert np.isfinite(m['tokenizer']['psnr_db']['value']) and 'rfid' in m['tokenizer']
    assert list((tmp_path / 'cache' / 'fid').glob('fid-*.npz'))  # the renders' statistics, cached
    for row in ('text_to_image/fid', 'text_to_image/judge/seen_pairs/categories/colour_binding',
                'image_to_text/cider_d', 'tokenizer/psnr_db'):
        assert f'| {row} |' in md, row
    assert 'extractor: CLIP image tower' in md


def test_the_folder_suite_reads_generated_images_and_their_prompts(tmp_path, monkeypatch):
    """Rendered Shapes scenes as 'generated' images: the judge finds them exact; FID against a
    folder of reference images uses the (here: mean-colour) extractor and caches the reference."""
    from PIL import Image
    from cm3jax.data.worlds import shapes as world
    from cm3jax.eval import fid, run
    gen, ref = tmp_path / 'generated', tmp_path / 'reference'
    gen.mkdir(), ref.mkdir()
    lines = []
    for i in range(12):
        doc = world.scene_document(world.DEFAULT, 5, i, 'validation')
        Image.fromarray(doc.images[0]).save(gen / f'{i}.png')
        Image.fromarray(world.scene_document(world.DEFAULT, 6, i, 'train').images[0]).save(ref / f'{i}.png')
        lines.append(json.dumps({'image': f'{i}.png', 'caption': doc.texts[0]}))
    (gen / 'captions.jsonl').write_text('\n'.join(lines) + '\n')
    calls = []

    def mean_colour(x):
        calls.append(len(x))
        return x.reshape(len(x), -1, 3).mean(1)
    monkeypatch.setattr(run, 'extractor_of', lambda opts: fid.callable_extractor(mean_colour, 'mean-colour'))
    opts = run.EvalOptions(suite='folder', images=str(gen), reference=str(ref), extractor='none',
                           cache_dir=str(tmp_path / 'cache'))
    report = run.run(opts)
    m = report['metrics']
    assert m['text_to_image/judge_exact']['value'] == 1.0 and m['text_to_image/judge_exact']['n'] == 12
    assert m['text_to_image/fid']['value'] > 0 and m['text_to_image/fid']['protocol']['reference_n'] == 12
    assert (gen / 'eval' / 'report.md').exists() and len(calls) == 2
    run.run(opts)
    assert len(calls) == 3  # the reference's statistics came from the cache
    with pytest.raises(ValueError, match='needs --images'):
        run.run(run.EvalOptions(suite='coco', workdir=str(tmp_path)))


def test_the_coco_suite_draws_its_captions_and_finds_the_karpathy_test_split(tmp_path):
    """FID-30K's selection (``--num`` images by ``--seed``, one caption each, the real images
    centre-cropped and resized) and the Karpathy test split, on a folder of six images."""
    from PIL import Image
    from cm3jax.eval import run
    (tmp_path / 'val2014').mkdir()
    lines = []
    for i in range(6):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / 'val2014' / f'{i}.jpg')
        lines += [json.dumps({'image': f'val2014/{i}.jpg', 'caption': f'picture {i} caption {j}'}) for j in range(2)]
    (tmp_path / 'captions.jsonl').write_text('\n'.join(lines))
    opts = run.EvalOptions(suite='coco', workdir=str(tmp_path), images=str(tmp_path), num=4, seed=1)
    captions, real, key = run._coco_pairs(opts, 16)
    assert len(captions) == 4 and len(set(c.split()[1] for c in captions)) == 4  # four distinct images
    assert run._coco_pairs(opts, 16)[0] == captions  # the same draw for the same seed
    images = np.concatenate(list(real()))
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    for caption, image in zip(captions, images):  # each real image is the one its caption belongs to
        assert image.mean() == pytest.approx(40 * int(caption.split()[1]), abs=1)
    assert '4 seed 1 at 16' in key
    karpathy = {'images': [{'filepath': 'val2014', 'filename': f'{i}.jpg', 'split': 'test' if i < 2 else 'train',
                            'sentences': [{'raw': f'Picture {i}.'}]} for i in range(6)]}
    (tmp_path / 'dataset_coco.json').write_text(json.dumps(karpathy))
    names, refs = run._karpathy(run.EvalOptions(suite='coco', images=str(tmp_path / 'val2014'),
                                                karpathy=str(tmp_path / 'dataset_coco.json')))
    assert [n.rsplit('/', 1)[1] for n in names] == ['0.jpg', '1.jpg'] and refs == [['Picture 0.'], ['Picture 1.']]
