"""Instruction tuning: templates, loss weights, the mixture, instruction files, generation, and
the trainer (from --init_from, resumed exactly after SIGTERM), on a tiny random tokenizer and LM."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from cm3jax import trainers
from cm3jax.data import cm3, documents, instructions as ins, prepare
from cm3jax.data.worlds import shapes
from cm3jax.sample import decode as dec, generate, load
from cm3jax.sft import data as sft_data, jsonl, mixture, prepare as sft_prepare, tasks
from cm3jax.train import checkpoint
from configs import data as data_configs, sft as sft_configs
from tests.helpers import VQ32, one_device_env, random_tokenizer_workdir, tiny_config

pytestmark = pytest.mark.xdist_group('sft')  # one worker builds the pretrained run for all
WORLD = shapes.ShapesConfig(canvas=16, min_objects=1, max_objects=1)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A tiny LM pretrained for a few steps on 16 px Shapes documents (random VQ tokenizer)."""
    root = tmp_path_factory.mktemp('pretrained')
    random_tokenizer_workdir(root / 'vq', {**VQ32, 'resolution': 16})
    config = data_configs.get_config('shapes')
    config.source.update(count=200, cfg={'canvas': 16, 'min_objects': 1, 'max_objects': 1})
    config.out, config.vq_workdir = str(root / 'data'), str(root / 'vq')
    config.text_tokenizer.update(vocab_size=300, train_documents=200)
    config.prepare.update(shard_size=100, progress=False)
    manifest = prepare.run(config)
    lm = tiny_config()
    lm.model.update(vocab_size=manifest['vocab']['size'], position='rope', init_std=0.02, max_len=160)
    lm.data.update(dir=str(root / 'data'))
    lm.train.update(steps=10, eval_every=0, log_every=5, seq_len=64, batch=8, checkpoint_every=10, progress=False)
    trainers.train(lm, str(root / 'lm'))
    return root


@pytest.fixture(scope='module')
def tok(pretrained):
    return sft_prepare.tokenizers_of(pretrained / 'lm')


def _spell(tokens, tok):
    """Token ids -> the template's text: '{image}' for each image's codes, '<break>' for breaks."""
    v, out, text = tok.vocab, [], []
    flush = lambda: text and (out.append(tok.text.decode_joint(np.array(text), v)), text.clear())  # noqa: E731
    for t in tokens:
        if v.is_text(np.array([t]))[0]:
            text.append(int(t))
            continue
        flush()
        if v.is_image(np.array([t]))[0]:
            if not out or out[-1] != '{image}':
                out.append('{image}')
        else:
            out.append({v.break_: '<break>', v.eos: '<eos>', v.eoss: '<eoss>'}.get(int(t), f'<{int(t)}>'))
    flush()
    return ' '.join(s.strip() for s in out)


def _record(doc, tok):
    encoder = prepare.ImageEncoder(tok.vq_params, tok.vq_cfg, 8)
    return documents.decode_record(prepare._records([doc], encoder, tok.vocab, tok.text)[0])


EXPECTED = {
    'edit': lambda m: f'Edit first image following the instruction <break> {{image}} <break> {m["instruction"]} '
                      f'<break> {{image}} <eos>',
    'structure': lambda m: f'Make high quality image from canny edge features <break> {{image}} <break> '
                           f'{m["caption"]} <break> {{image}} <eos>',
    'grounded': lambda m: f'Generate high quality image of {m["caption"]} with segmentations ' + ', '.join(
        f'{o.describe()} at ({o.box[0]}, {o.box[1]}, {o.box[2]}, {o.box[3]})'
        for o in shapes.Scene.from_dict(m['scene']).objects) + ' <break> {image} <eos>',
    'write': lambda m: f'draw "{m["text"]}" <break> {{image}} <eos>',
    'vqa': lambda m: f'Question: {m["question"]} Answer: {m["answer"]}. <break> {{image}} <eos>',
    'caption': lambda m: f'{{image}} <break> {m["caption"]} <eos>',
}


@pytest.mark.parametrize('task', tasks.TASKS)
def test_every_task_follows_the_papers_template(task, tok):
    plain = sft_data.SFTDataConfig(seq_len=256, batch=1, weights={task: 1}, loss='prompt', condition_dropout=0.0)
    for i in range(6):
        doc = tasks.example(task, WORLD, 0, i)
        segments, is_image, header = _record(doc, tok)
        assert header['task'] == task and len(header['output']) == len(segments)
        spans = sft_data.output_spans(*documents.join_owned(segments, is_image, tok.vocab), header['output'],
                                      tok.vocab)
        tokens = documents.join(segments, is_image, tok.vocab)
        assert _spell(np.append(tokens, tok.vocab.eos), tok) == EXPECTED[task](doc.meta)
        # as trained: an output before the image (VQA's answer) moves to the end, CM3's infill form
        trained, _ = sft_data.example_tokens(segments, is_image, header, tok.vocab, np.random.default_rng(i), plain)
        assert bool(spans) == (task == 'vqa')
        if spans:
            assert _spell(cm3.invert(trained, tok.vocab), tok) == EXPECTED[task](doc.meta)
            assert trained[-2] == tok.vocab.eoss and trained[-1] == tok.vocab.eos


@pytest.mark.parametrize('task', tasks.TASKS)
def test_the_prompt_masked_loss_weighs_exactly_the_output(task, tok):
    cfg = sft_data.SFTDataConfig(seq_len=256, batch=1, weights={task: 1}, loss='prompt', condition_dropout=0.0)
    for i in range(4):
        segments, is_image, header = _record(tasks.example(task, WORLD, 0, i), tok)
        tokens, weights = sft_data.example_tokens(segments, is_image, header, tok.vocab, np.random.default_rng(i), cfg)
        out = [s for s, o in zip(segments, header['output']) if o][0]
        weighed = tokens[weights > 0]
        # the output's ids, then what closes it: <eoss> (a moved span) <eos>, or <eos>
        closing = [tok.vocab.eoss, tok.vocab.eos] if task == 'vqa' else [tok.vocab.eos]
        np.testing.assert_array_equal(weighed, np.concatenate([out, closing]))
        assert set(np.unique(weights)) <= {0.0, 1.0}


def test_the_whole_sequence_loss_uses_cm3_spans_that_never_cross_a_break(tok):
    cfg = sft_data.SFTDataConfig(seq_len=256, batch=1, weights={'edit': 1}, loss='cm3', condition_dropout=0.0,
                                 cm3=cm3.CM3Config(rate=3.0, max_spans=6))
    v, moved_any = tok.vocab, 0
    for i in range(30):
        task = tasks.TASKS[i % len(tasks.TASKS)]
        segments, is_image, header = _record(tasks.example(task, WORLD, 0, i), tok)
        doc = np.append(documents.join(segments, is_image, v), v.eos)
        tokens, weights = sft_data.example_tokens(segments, is_image, header, v, np.random.default_rng(i), cfg)
        np.testing.assert_array_equal(cm3.invert(tokens, v), doc)  # nothing lost, nothing added
        sentinel = np.isin(tokens, v.sentinels)
        assert (weights[sentinel] == 0).all() and (weights[~sentinel] == 1).all()  # the whole sequence
        first_moved = np.flatnonzero(tokens == v.sentinel(0))
        if task == 'vqa':  # the answer is always <mask:0>, the form generation asks in
            answer = segments[1]
            np.testing.assert_array_equal(tokens[first_moved[1] + 1:first_moved[1] + 1 + len(answer)], answer)
            assert tokens[first_moved[1] + 1 + len(answer)] == v.eoss
        if len(first_moved) > 1:
            moved_any += 1
            tail = tokens[first_moved[1]:-1]  # every moved span: <mask:k> ids <eoss>, none holds a <break>
            assert v.break_ not in tail
    assert moved_any > 15


def test_condition_dropout_trains_the_streams_of_guidance(tok):
    """Edits: both conditions masked (the "none" stream) at the rate, the instruction alone (the
    "image only" stream) at it again, never the image alone (no stream asks for that)."""
    cfg = sft_data.SFTDataConfig(seq_len=256, batch=1, weights={'edit': 1}, loss='prompt', condition_dropout=0.25)
    segments, is_image, header = _record(tasks.example('edit', WORLD, 0, 0), tok)
    v = tok.vocab
    seen = {}
    for i in range(800):
        tokens, weights = sft_data.example_tokens(segments, is_image, header, v, np.random.default_rng(i), cfg)
        prompt = tokens[:np.flatnonzero(tokens == v.break_)[2] + 1]  # up to the <break> before image2
        image_kept = v.is_image(prompt).sum() == len(segments[1])
        kind = ('none' if not image_kept else 'image only') if (tokens == v.mask).any() else 'full'
        seen[kind] = seen.get(kind, 0) + 1
        assert (weights[tokens == v.mask] == 0).all() and (tokens == v.mask).sum() == {'full': 0, 'image only': 1,
                                                                                       'none': 2}[kind]
    assert abs(seen['none'] / 800 - 0.25) < 0.05 and abs(seen['image only'] / 800 - 0.25) < 0.05
    with pytest.raises(ValueError, match='condition_dropout'):
        sft_data.SFTDataConfig(seq_len=8, batch=1, weights={'edit': 1}, condition_dropout=0.6)


def test_mixture_rates_match_the_weights_and_thresholds():
    weights = {'edit': 3, 'vqa': 1, 'caption': 1, 'write': 0.1}
    assert mixture.mixture_rates(weights) == pytest.approx({'edit': 3 / 5.1, 'vqa': 1 / 5.1, 'caption': 1 / 5.1,
                                                            'write': 0.1 / 5.1})
    rates = mixture.mixture_rates(weights, min_rate=0.1, max_rate=0.5)
    assert rates['edit'] == pytest.approx(0.5) and rates['write'] == pytest.approx(0.1)
    assert rates['vqa'] == pytest.approx(0.2) and sum(rates.values()) == pytest.approx(1.0)
    # one task capped, the others raised to the floor and past it: what is left is shared by weight
    both = mixture.mixture_rates({'edit': 10, 'vqa': 1, 'caption': 1, 'write': 1}, min_rate=0.1, max_rate=0.4)
    assert both == pytest.approx({'edit': 0.4, 'vqa': 0.2, 'caption': 0.2, 'write': 0.2})
    n = 10_000
    counts = mixture.draws(rates, seed=3, n=n)
    for task, r in rates.items():
        se = np.sqrt(r * (1 - r) / n)
        assert abs(counts[task] / n - r) < 3 * se, (task, counts[task] / n, r)
    assert mixture.parse_weights('edit:2, vqa') == {'edit': 2.0, 'vqa': 1.0}
    with pytest.raises(ValueError, match='NAME:WEIGHT'):
        mixture.parse_weights('edit:lots')
    with pytest.raises(ValueError, match='min_rate'):
        mixture.mixture_rates(weights, min_rate=0.3)


def _png(path, size, mode='RGB'):
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).convert(mode).save(path)
    return path.name


def test_instruction_files_name_the_bad_row_and_field_and_skip_it(tmp_path):
    good = _png(tmp_path / 'a.png', 16)
    big = _png(tmp_path / 'big.png', 24)
    rows = [
        {'task': 'vqa', 'segments': [{'text': 'Question: what? Answer:'}, {'text': ' red', 'output': True},
                                     {'text': '.'}, {'image': good}]},
        {'task': 'vqa', 'segments': [{'text': 'q'}, {'image': 'missing.png'}]},
        {'task': 'caption', 'segments': [{'image': big}, {'text': 'a red circle'}]},
        {'task': 'painting', 'segments': [{'text': 'x'}, {'image': good}]},
        {'task': 'edit', 'segments': [{'text': 'x', 'image': good}]},
    ]
    path = tmp_path / 'sft.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in rows) + '\nnot json\n')
    lines = path.read_text().splitlines()
    doc = jsonl.read_row(lines[0], 'sft.jsonl:1', tmp_path, 16)
    assert doc.meta['header'] == {'task': 'vqa', 'output': [False, True, False, False], 'condition': []}
    for n, (field, says) in enumerate([('segments[1].image', 'missing image'),
                                       ('segments[0].image', 'is 24x24, but the image tokenizer takes 16x16'),
                                       ('task', "unknown task 'painting'"),
                                       ('segments[0]', 'exactly one of'), ('line', 'not JSON')], start=2):
        with pytest.raises(jsonl.RowError) as e:
            jsonl.read_row(lines[n - 1], f'sft.jsonl:{n}', tmp_path, 16)
        assert str(e.value).startswith(f'sft.jsonl:{n}: {field}: ') and says in str(e.value)
    # the readers skip and count them: a quick pass by task, then each task's rows
    by_task, early = sft_prepare.jsonl_sources([str(path)], 16)
    assert early.skipped == 2 and set(early.reasons) == {'unknown task', 'bad json'}
    vqa = list(by_task['vqa'][0])
    assert len(vqa) == 1 and by_task['vqa'][0].stats.reasons == {'missing image': 1}
    assert list(by_task['caption'][0]) == [] and by_task['caption'][0].stats.reasons == {'wrong image size': 1}
    assert 'sft.jsonl:3' in by_task['caption'][0].report()


@pytest.fixture(scope='module')
def sft_dir(pretrained, tok):
    """The tiny SFT data directory: 48 Shapes examples of each task."""
    out = pretrained / 'sft_data'
    sft_prepare.prepare_tasks(out, sft_prepare.shapes_sources(WORLD, 0, dict.fromkeys(tasks.TASKS, 48)), tok,
                              prepare.PrepareConfig(shard_size=16, progress=False))
    return out


def test_the_sft_data_packs_a_resumable_mixture(sft_dir, tok):
    manifest = prepare.read_manifest(sft_dir)
    assert manifest['tasks'] == dict.fromkeys(tasks.TASKS, 48) and manifest['documents'] == 6 * 48
    cfg = sft_data.SFTDataConfig(seq_len=128, batch=4, weights={'edit': 1, 'vqa': 1}, loss='prompt')
    data = sft_data.SFTData(sft_dir, tok.vocab, cfg)
    first = [next(data) for _ in range(3)]
    assert first[0]['inputs'].shape == (4, 128) and first[0]['weights'].sum() > 0
    assert {data.task(i) for i in range(data.position)} == {'edit', 'vqa'}
    state = data.get_state()
    after = next(data)
    again = sft_data.SFTData(sft_dir, tok.vocab, cfg)
    again.set_state(state)
    for k, v in next(again).items():
        np.testing.assert_array_equal(v, after[k])
    with pytest.raises(ValueError, match='no data in'):
        sft_data.SFTData(sft_dir, tok.vocab, sft_data.SFTDataConfig(seq_len=64, batch=1, weights={'nothing': 1}))


def test_generation_for_instructions(pretrained):
    gen, mesh, rules = load.load_generator(pretrained / 'lm')
    import flax.linen as nn
    scene = shapes.sample_scene(WORLD, np.random.default_rng(0))
    image = shapes.render(scene)[None]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # edit, answer and structure: the CLI test below
        placed = generate.grounded(gen, ['a red circle'], [[('red circle', (2, 2, 9, 9))]], num=2)
        written = generate.write(gen, ['ab'])
    assert placed.shape == (1, 2, 16, 16, 3) and written.shape == (1, 1, 16, 16, 3)
    # the prompts: three streams for editing (full, none, image only), the infill form for VQA
    v = gen.vocab
    tpl = ins.edit(image[0], 'make the circle green')
    full, none, image_only = (generate.instruction_prompt(gen, tpl, m) for m in ((), (1, 2), (2,)))
    assert full[-1] == none[-1] == image_only[-1] == v.break_
    assert (none == v.mask).sum() == 2 and (image_only == v.mask).sum() == 1 and (full == v.mask).sum() == 0
    assert len(image_only) < len(full) and v.is_image(image_only).sum() == v.is_image(full).sum() == 16
    q = generate.instruction_prompt(gen, ins.vqa(image[0], 'what colour is the circle?'))
    assert q[-1] == v.sentinel(0) and (q == v.sentinel(0)).sum() == 2
    with pytest.raises(ValueError, match='no condition'):
        generate.write(gen, ['ab'], sample=dec.SampleConfig(cfg_scale=3.0))
    with pytest.raises(ValueError, match='one instruction per image'):
        generate.edit(gen, image, [])


def _sft_command(workdir, pretrained, sft_dir, steps):
    return [sys.executable, '-m', 'cm3jax', 'train', '--config=configs/sft.py:tiny', f'--workdir={workdir}',
            f'--init_from={pretrained / "lm"}', f'--config.data.dir={sft_dir}', f'--config.train.steps={steps}',
            '--config.train.eval_every=0', '--config.train.log_every=2', '--config.train.checkpoint_every=100',
            '--config.train.progress=False', '--config.train.seq_len=128', '--config.train.batch=8']


def _losses(workdir):
    return {r['step']: r['loss'] for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
            if 'loss' in r}


def test_sft_starts_from_the_pretrained_run_and_resumes_exactly_after_sigterm(tmp_path, pretrained, sft_dir, repo):
    steps = 30
    env = one_device_env()
    ref = subprocess.run(_sft_command(tmp_path / 'ref', pretrained, sft_dir, steps), cwd=repo, env=env,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert 'initialised params from' in ref.stdout and 'fresh optimizer' in ref.stdout
    losses = _losses(tmp_path / 'ref')
    assert losses[max(losses)] < losses[min(losses)]

    workdir = tmp_path / 'preempted'
    proc = subprocess.Popen(_sft_command(workdir, pretrained, sft_dir, steps), cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / 'metrics.jsonl').exists() and len(_losses(workdir)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and 'SIGTERM: saved step' in err, err[-3000:]
    stopped = checkpoint.Checkpointer(workdir / 'checkpoints').latest_step()
    assert 3 <= stopped < steps
    again = subprocess.run(_sft_command(workdir, pretrained, sft_dir, steps), cwd=repo, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f'resumed from step {stopped}' in again.stdout, again.stderr[-3000:]
    got = _losses(workdir)
    assert {s: got[s] for s in got if s > stopped} == {s: losses[s] for s in losses if s > stopped}
    saved = json.loads((workdir / 'config.json').read_text())
    assert saved['task'] == 'sft' and saved['model']['max_len'] == 160 and saved['init_from'] == str(pretrained / 'lm')


def test_sft_configs_are_checked(pretrained):
    config = sft_configs.get_config('tiny')
    with pytest.raises(Exception, match='--init_from'):
        trainers.train(config, '/nonexistent/never-written')
    config.data.loss = 'everything'
    with pytest.raises(Exception, match="sft loss 'everything'"):
        trainers.train(config, str(pretrained / 'bad'), init_from=str(pretrained / 'lm'))
    with pytest.raises(ValueError, match='unknown preset'):
        sft_configs.get_config('huge')


def test_grown_blocks_start_as_the_identity_and_sft_grows_the_pretrained_model(pretrained, sft_dir, tmp_path):
    import dataclasses

    import flax.linen as nn
    import jax.numpy as jnp

    from cm3jax.model import grow, transformer
    assert grow.placement(2, 2) == ('old', 'new', 'old', 'new') and grow.placement(2, 1) == ('old', 'old', 'new')
    assert grow.placement(3, 0) == ('old',) * 3
    gen, mesh, rules = load.load_generator(pretrained / 'lm')
    old = grow.num_layers(gen.params)
    deeper = transformer.Transformer(dataclasses.replace(gen.model.cfg, num_layers=old + 2))
    tokens = jax.random.randint(jax.random.key(1), (8, 24), 0, gen.model.cfg.vocab_size)  # a row per device
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fresh = nn.unbox(deeper.init(jax.random.key(2), tokens)['params'])
        grown = grow.grow(gen.params, fresh)
        want = gen.model.apply({'params': gen.params}, tokens)
        np.testing.assert_allclose(deeper.apply({'params': grown}, tokens), want, atol=1e-5)
        # the unrolled layout (what decoding uses) grows the same way
        _, flat_old = transformer.unrolled(gen.model, gen.params)
        _, flat_fresh = transformer.unrolled(deeper, fresh)
        flat = grow.grow(flat_old, flat_fresh)
        assert grow.num_layers(flat) == old + 2 and flat['layers_1'] is flat_fresh['layers_0']
    assert not jnp.allclose(fresh['layers']['attn']['wq'][0], grown['layers']['attn']['wq'][0])

    config = sft_configs.get_config('tiny')
    config.grow_layers = 1
    config.data.dir = str(sft_dir)
    config.train.update(steps=4, eval_every=0, log_every=2, checkpoint_every=100, progress=False, seq_len=128,
                        batch=8)
    trainers.train(config, str(tmp_path / 'grown'), init_from=str(pretrained / 'lm'))
    saved = json.loads((tmp_path / 'grown' / 'config.json').read_text())
    assert saved['model']['num_layers'] == old + 1 and saved['grow_layers'] == 1
    assert grow.num_layers(load.load_generator(tmp_path / 'grown')[0].params) == old + 1
    config.grow_layers = -1
    with pytest.raises(Exception, match='grow_layers=-1'):
        trainers.train(config, str(tmp_path / 'bad'), init_from=str(pretrained / 'lm'))


def test_sample_edits_answers_and_traces_from_the_command_line(pretrained, tmp_path, repo):
    scene = shapes.sample_scene(WORLD, np.random.default_rng(1))
    Image.fromarray(shapes.render(scene)).save(tmp_path / 'scene.png')
    Image.fromarray(shapes.edge_map(shapes.render(scene))).save(tmp_path / 'edges.png')
    command = [sys.executable, '-m', 'cm3jax', 'sample', f'--workdir={pretrained / "lm"}', f'--out={tmp_path}',
               f'--image={tmp_path / "scene.png"}', '--edit=make the circle green', '--question=how many shapes?',
               f'--edge={tmp_path / "edges.png"}', '--prompt=a red circle', '--num=2']
    env = one_device_env()
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.asarray(Image.open(tmp_path / 'edits.png')).shape == (16, 3 * 16, 3)  # the original, then 2 edits
    assert np.asarray(Image.open(tmp_path / 'structure.png')).shape == (16, 3 * 16, 3)
    assert json.loads((tmp_path / 'answers.json').read_text())[0]['question'] == 'how many shapes?'
    assert f'{tmp_path}/edits.png' in done.stdout and 'how many shapes? ->' in done.stdout
    bad = subprocess.run(command[:-4] + ['--edit=another one'], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and '--edit needs one --image each: got 2 and 1' in bad.stderr
    assert 'Traceback' not in bad.stderr
