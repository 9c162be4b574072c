"""experiments/retrieval_ablation.py's own parts (its stages are cm3jax's commands, tested in
their own files): arguments are checked, the table and plot show every arm and K, and the Colab
notebook passes arguments the script accepts."""

import importlib.util
import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image


def _experiment(repo, name):
    """experiments/NAME.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, 'experiments', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def ablation(repo):
    return _experiment(repo, 'retrieval_ablation')


def test_arguments_are_checked(ablation):
    args = ablation.parse_args(['--workdir=/tmp/x', '--prompts=8', '--eval_docs=16'])
    assert args.retrieved == '2' and args.ks == '0,1,2'
    with pytest.raises(SystemExit):
        ablation.parse_args(['--prompts=64', '--eval_docs=32'])


def test_table_and_plot_show_every_arm_and_k(ablation, tmp_path):
    args = ablation.parse_args([])
    results = {'ks': [0, 1, 2], 'prompts': 128, 'vq_ceiling': 0.9,
               'arms': {arm: {'loss': {k: 1.5 - 0.1 * k - 0.2 * j for k in range(3)},
                              'exact': {k: 0.1 * k + 0.3 * j for k in range(3)}, 'attr': {}}
                        for j, arm in enumerate(('none', 'ra'))}}
    md = ablation.table(results, args)
    rows = [line for line in md.splitlines() if line.startswith('| with')]
    assert len(rows) == 2 and rows[1].startswith('| with retrieval (K in {2})')
    assert rows[1].split(' | ')[1:] == ['1.300', '1.200', '1.100', '0.300', '0.400', '0.500 |']
    assert 'ceiling): judge exact 0.900' in md
    ablation.plot(results, tmp_path / 'plot.png')
    image = np.asarray(Image.open(tmp_path / 'plot.png'))
    assert image.shape[1] == 720 and (image == [40, 110, 200]).all(-1).sum() > 1000  # the RA bars are drawn


def notebook_arguments(repo, name: str) -> dict:
    """colab/NAME.ipynb: every code cell compiles; the scope (WORKDIR, ARGS, ...) its cell that runs
    experiments/NAME.py sets up, run up to the script's call."""
    with open(os.path.join(repo, 'colab', f'{name}.ipynb')) as f:
        notebook = json.load(f)
    sources = [''.join(c['source']) for c in notebook['cells'] if c['cell_type'] == 'code']
    for source in sources:
        compile(source, 'notebook cell', 'exec')
    (run,) = [s for s in sources if f'{name}.py' in s]
    scope = {'sys': None, 'subprocess': None}
    exec(run.split('\nsubprocess.run')[0], scope)
    return scope


def test_the_colab_notebook_runs_the_script_with_valid_arguments(ablation, repo):
    scope = notebook_arguments(repo, 'retrieval_ablation')
    args = ablation.parse_args(scope['ARGS'])
    assert args.workdir == scope['WORKDIR']


def test_a_stopped_trainer_is_not_marked_done(ablation, tmp_path, monkeypatch):
    """SIGTERM makes the trainers save and return normally: the stage must not count as done."""
    (tmp_path / 'vq' / 'checkpoints' / '200').mkdir(parents=True)
    monkeypatch.setattr(ablation, 'train_vq', lambda args, workdir: None)  # the "trainer" stopped at step 200
    with pytest.raises(SystemExit, match='stopped at step 200 of 600; run the same command again'):
        ablation.main([f'--workdir={tmp_path}'])
    assert not (tmp_path / 'vq' / '.done').exists()
    assert ablation.steps_saved(tmp_path / 'vq') == 200 and ablation.steps_saved(tmp_path / 'none') == 0


@pytest.fixture(scope='module')
def sweep(repo):
    return _experiment(repo, 'quickstart_sweep')


def test_the_sampling_sweep_checks_arguments_and_tables_every_setting(sweep, tmp_path):
    with pytest.raises(SystemExit):
        sweep.parse_args(['--modes=sample,beam'])
    args = sweep.parse_args(['--cfg=1,3', '--temperatures=0.5'])
    assert args.cfg == [1.0, 3.0] and args.modes == list(sweep.MODES)
    rate = lambda v: {'value': v, 'se': 0.01, 'n': 128}
    settings = {sweep.key(c, 0.5, m): {'cfg': c, 'temperature': 0.5, 'mode': m, 'single': rate(0.1 * c + 0.1 * i),
                                       'reranked': rate(0.2 * c), 'any': rate(0.9), 'seconds': 1.0}
                for c in args.cfg for i, m in enumerate(sweep.MODES)}
    results = {'prompts': 128, 'top_p': 0.9, 'cdk_k': 2, 'cdk_alpha': 0.5, 'settings': settings}
    md = sweep.table(results, args)
    rows = [line for line in md.splitlines() if line.startswith('| 1 ') or line.startswith('| 3 ')]
    assert len(rows) == 6
    (best,) = [r for r in rows if r.count('**(best)**') == 1 and '| mixed |' in r and r.startswith('| 3')]
    assert '0.500 ± 0.010 **(best)**' in best  # the best single-sample setting: CFG 3, mixed
    sweep.plot(results, args, tmp_path / 'sweep.png')
    assert Image.open(tmp_path / 'sweep.png').size[0] > 300


def test_the_sweep_needs_a_finished_quickstart(sweep, tmp_path):
    with pytest.raises(SystemExit, match='is not a finished quickstart directory'):
        sweep.main([f'--out={tmp_path}', f'--results={tmp_path / "r"}'])


@pytest.fixture(scope='module')
def rerank(repo):
    return _experiment(repo, 'rerank_twins')


def test_the_rerank_experiment_checks_arguments_and_tables_every_run(rerank, tmp_path):
    with pytest.raises(SystemExit):
        rerank.parse_args(['--twins=0,0.7'])
    args = rerank.parse_args(['--twins=0,0.5', '--steps=450,1200'])
    assert args.twins == [0.0, 0.5] and args.steps == [450, 1200]
    rate = lambda v: {'value': v, 'se': 0.01, 'n': 256}  # noqa: E731
    runs = {f'{s}/{f:g}': {'steps': s, 'twins': f, 'seconds': 100.0, 'recall_t2i_r1': 0.3 + f, 'twin_t2i': 0.7,
                           'twin_i2t': 0.8, 'reranked': rate(0.69 + f / 10)} for s in args.steps for f in args.twins}
    results = {'out': 'out/quickstart', 'prompts': 256, 'num': 8, 'single': rate(0.684), 'any': rate(0.871),
               'runs': runs}
    md = rerank.table(results)
    rows = [line for line in md.splitlines() if line.startswith('| 450 ') or line.startswith('| 1200 ')]
    assert len(rows) == 4 and '| 1200 | 0.5 | 0.800 | 0.700 | - | 0.740 ± 0.010 | 100 |' in rows
    assert 'single sample 0.684 ± 0.010' in md and 'any of 8 0.871 ± 0.010' in md
    rerank.plot(results, tmp_path / 'rerank.png')
    assert Image.open(tmp_path / 'rerank.png').size[0] > 300


def test_the_rerank_experiment_tables_named_retriever_variants(rerank, tmp_path):
    args = rerank.parse_args(['--retrievers=base=;deep=model.vision_layers=4,optim.learning_rate=1e-3',
                              '--name=rerank_retrievers'])
    assert args.retrievers == {'base': {}, 'deep': {'model.vision_layers': 4, 'optim.learning_rate': 1e-3}}
    for bad in ('deep', 'base=;base=', 'x=model.vision_layers', ''):
        with pytest.raises(SystemExit):
            rerank.parse_args([f'--retrievers={bad}'])
    from configs import clip
    config = clip.get_config('tiny')
    rerank.apply_overrides(config, args.retrievers['deep'])
    assert config.model.vision_layers == 4 and config.optim.learning_rate == 1e-3
    with pytest.raises(SystemExit, match="no field 'model.depth'"):
        rerank.apply_overrides(config, {'model.depth': 4})
    with pytest.raises(SystemExit, match="field 'model.vision_layers'.*cannot be casted"):
        rerank.apply_overrides(config, {'model.vision_layers': 'four'})
    rate = lambda v: {'value': v, 'se': 0.01, 'n': 256}  # noqa: E731
    runs = {f'450/0/{name}': {'variant': name, 'overrides': o, 'steps': 450, 'twins': 0.0, 'seconds': 100.0,
                              'recall_t2i_r1': 0.3, 'twin_t2i': 0.7, 'twin_i2t': 0.8, 'auc': 0.6,
                              'reranked': rate(0.7)}
            for name, o in args.retrievers.items()}
    results = {'out': 'out/quickstart', 'prompts': 256, 'num': 8, 'single': rate(0.684), 'any': rate(0.871),
               'runs': runs}
    rows = [line for line in rerank.table(results).splitlines() if line.startswith('| ')]
    assert rows[1:] == ['| base | 450 | 0 | 0.300 | 0.700 | 0.600 | 0.700 ± 0.010 | 100 |',
                        '| deep (`model.vision_layers=4`, `optim.learning_rate=0.001`) | 450 | 0 | 0.300 | 0.700 | '
                        '0.600 | 0.700 ± 0.010 | 100 |']
    # an exact sample outscoring both wrong ones of its caption, a tie, and captions without a contrast
    scores = np.array([[3., 1., 2.], [1., 1., 0.], [5., 4., 3.]])
    judged = np.array([[1, 0, 0], [1, 0, 1], [1, 1, 1]])
    assert rerank.within_caption_auc(scores, judged) == pytest.approx((1.0 + 0.25) / 2)
    verdict = {'exact': judged, 'attr': np.array([[1, .5, 1], [1, 1, 1], [1, 1, 1]]),
               'extra': np.array([[0, 1, 1], [0, 2, 0], [0, 0, 0]])}
    kinds = rerank.failures(verdict)
    assert kinds['extra_object'].sum() == 3 and kinds['wrong_object'].tolist()[0] == [False, True, False]
    # only the extra-object samples count as wrong: caption 0's exact sample beats both of them
    assert rerank.within_caption_auc(scores, judged, kinds['wrong_object']) == 1.0
    rerank.plot(results, tmp_path / 'rerank.png')
    assert Image.open(tmp_path / 'rerank.png').size[0] > 300


def test_the_rerank_experiment_needs_a_finished_quickstart(rerank, tmp_path):
    with pytest.raises(SystemExit, match='holds no text_to_image.npz'):
        rerank.main([f'--out={tmp_path}', f'--results={tmp_path / "r"}'])


@pytest.fixture(scope='module')
def sft(repo):
    return _experiment(repo, 'sft_shapes')


def test_the_sft_experiment_checks_arguments_and_tables_every_metric(sft):
    args = sft.parse_args(['--items=4', '--steps=10', '--loss=prompt', '--weights=edit:3,caption:2'])
    config = sft.sft_config(args)
    assert config.train.steps == 10 and config.data.loss == 'prompt' and config.task == 'sft'
    assert config.data.weights == 'edit:3,caption:2' and config.grow_layers == 2  # the preset's
    assert sft.sft_config(sft.parse_args(['--grow=0'])).grow_layers == 0
    with pytest.raises(SystemExit):
        sft.parse_args(['--items=0'])
    md = sft.table({'vqa': {'before': 0.1, 'after': 0.9, 'n': 100},
                    'grounded/box_accuracy': {'before': 0.0, 'after': 0.5, 'n': 4}})
    assert '| vqa | accuracy | 0.100 ± 0.030 | 0.900 ± 0.030 | +0.800 | 100 |' in md
    assert '| grounded | box_accuracy | 0.000 ± 0.000 | 0.500 ± 0.250 | +0.500 | 4 |' in md
    held = sft.items(config, 'edit', 3)
    assert [d.id for d in held] == [f'sft/edit/validation/1/{i}' for i in range(3)]  # not training's seed


def test_the_sft_picture_frames_each_output_by_its_verdict(sft, tmp_path):
    config = sft.sft_config(sft.parse_args([]))
    blank = {task: np.zeros((2, 32, 32, 3), np.uint8) for task in sft.IMAGE_TASKS}
    right = {task: [True, False] for task in sft.IMAGE_TASKS}
    sft.picture(blank, blank, right, config, tmp_path / 'p.png', shown=2)
    image = np.asarray(Image.open(tmp_path / 'p.png'))
    side, pad, group, height = 96, 4, 3 * 96 + 2 * 4, 96 + 2 * 4 + 2 * 11 + 6
    assert image.shape == (20 + 4 * height, 90 + 2 * (group + 12), 3)
    for row in range(4):  # the after-SFT tile's frame: green for the first example, red for the second
        y = 20 + row * height + side // 2
        assert tuple(image[y, 90 + 2 * (side + pad) - 2]) == (0, 150, 0)
        assert tuple(image[y, 90 + group + 12 + 2 * (side + pad) - 2]) == (200, 0, 0)
    # the prompt is written under the tiles
    assert (image[20 + side + 4:20 + side + 4 + 22, 90:90 + group] < 128).any()


def test_the_sft_notebook_runs_the_script_with_valid_arguments(sft, repo):
    scope = notebook_arguments(repo, 'sft_shapes')
    args = sft.parse_args(scope['ARGS'])
    assert args.workdir == scope['WORKDIR'] and args.pretrained == 'out/quickstart/lm'


@pytest.fixture(scope='module')
def variants(repo):
    return _experiment(repo, 'lm_variants')


def test_the_lm_variants_experiment_checks_arguments_and_tables_every_variant(variants, tmp_path):
    args = variants.parse_args(['--variants=base=;canon=lm.model.canon=AC,lm.model.canon_taps=(1,2,3,8),'
                                'lm.optim.learning_rate=6e-3'])
    assert args.variants == {'base': {}, 'canon': {'lm.model.canon': 'AC', 'lm.model.canon_taps': (1, 2, 3, 8),
                                                   'lm.optim.learning_rate': 6e-3}}
    with pytest.raises(SystemExit):
        variants.parse_args(['--variants=canon'])
    from configs import quickstart
    config = quickstart.get_config()
    variants.apply_overrides(config, args.variants['canon'], 'quickstart config')
    assert config.lm.model.canon_taps == (1, 2, 3, 8) and config.lm.optim.learning_rate == 6e-3
    with pytest.raises(SystemExit, match="quickstart config has no field 'lm.model.canons'"):
        variants.apply_overrides(config, {'lm.model.canons': 'A'}, 'quickstart config')
    older = ConfigDict({'lm': {'model': {'d_model': 128}}})  # a run's config from before Canon layers
    with pytest.raises(SystemExit, match="has no field 'lm.model.canon'"):
        variants.apply_overrides(older, {'lm.model.canon': 'AC'}, 'quickstart config')
    variants.apply_overrides(older, {'lm.model.canon': 'AC'}, 'quickstart config', known=config)
    assert older.lm.model.canon == 'AC'
    with pytest.raises(SystemExit, match="has no field 'lm.model.canons'"):
        variants.apply_overrides(older, {'lm.model.canons': 'AC'}, 'quickstart config', known=config)
    rate = lambda v: {'value': v, 'se': 0.01, 'n': 256}  # noqa: E731
    run = lambda v: {'overrides': {}, 'single': rate(v), 'reranked': rate(v + 0.02), 'any': rate(0.95),  # noqa: E731
                     'by_objects': {'1': rate(0.99), '2': rate(v - 0.2), '3': rate(0.1)}, 'borrowed_shape': rate(0.1),
                     'held_out_pairs': rate(0.0), 'captions': rate(0.9), 'binding': rate(0.5 + v / 2),
                     'binding_gap_nats': 1.5, 'image_nll': 0.17, 'lm_seconds': 600.0}
    results = {'out': 'out/quickstart', 'runs': {'base': run(0.7), 'canon': {**run(0.8), 'overrides': {'x.y': 1}}}}
    rows = [line for line in variants.table(results).splitlines() if line.startswith('| ')]
    assert rows[1:] == ['| base | 0.700 ± 0.010 | 0.720 ± 0.010 | 0.950 | 0.990 / 0.500 / 0.100 | 0.100 | 0.900 ± 0.010 '
                        '| 0.850 | 1.50 | 600 |',
                        '| canon (`x.y=1`) | 0.800 ± 0.010 | 0.820 ± 0.010 | 0.950 | 0.990 / 0.600 / 0.100 | 0.100 | '
                        '0.900 ± 0.010 | 0.900 | 1.50 | 600 |']
    variants.plot(results, tmp_path / 'lm.png')
    assert Image.open(tmp_path / 'lm.png').size[0] > 300


def test_an_lm_variant_reuses_the_quickstart_stages(variants, tmp_path):
    out = tmp_path / 'qs'
    for name in variants.LINKED:
        (out / name).mkdir(parents=True)
    (out / 'stages.json').write_text(json.dumps({k: {'seconds': 1, 'result': {}} for k in
                                                 (*variants.SHARED, 'lm', 'judge')}))
    variants.prepare_variant(out, tmp_path / 'v')
    assert all((tmp_path / 'v' / name).resolve() == (out / name).resolve() for name in variants.LINKED)
    assert set(json.loads((tmp_path / 'v' / 'stages.json').read_text())) == set(variants.SHARED)
    with pytest.raises(SystemExit, match='is not a quickstart directory whose first stages'):
        variants.main([f'--out={tmp_path}', f'--results={tmp_path / "r"}'])
