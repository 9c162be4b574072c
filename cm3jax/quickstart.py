"""`cm3jax quickstart` (what `make demo` runs): from nothing to pictures drawn from captions and
captions written for pictures, on the Shapes world, judged exactly.

Stages, each the function of a cm3jax command run on a preset (configs/quickstart.py holds the
overrides), in ``config.out``:

  1. bpe            a byte-level BPE on the world's captions        (`cm3jax prepare`'s first step)
  2. tokenizer      the VQ-GAN on the world's images                 (`cm3jax train`, configs/vq.py)
  3. prepare        training and held-out documents -> token shards  (`cm3jax prepare`)
  4. retriever      the CLIP retriever on the world's pairs          (`cm3jax train`, configs/clip.py)
  5. index          memory bank and neighbour lists                  (`cm3jax build-index`)
  6. lm             the LM: CM3, retrieval augmentation, caption dropout (`cm3jax train`, configs/lm.py)
  7. text_to_image  CFG with top-p sampling (sample.mode), scored by CLIP and by the LM (`cm3jax sample`)
  8. captions       captions for held-out images                     (`cm3jax sample --image`)
  9. judge          the Shapes judge on every output; report.md/.json, samples.png, captions.md

A finished stage is recorded in ``stages.json`` and reused by the next run; a trainer stopped
midway resumes exactly from its checkpoint, so a run killed at any point and run again ends
with the same report.
"""

from __future__ import annotations

import copy
import json
import pathlib
import time

import numpy as np
from tqdm import tqdm

from cm3jax.data.worlds import shapes
from cm3jax.eval.stats import rate

STAGES = ('bpe', 'tokenizer', 'prepare', 'retriever', 'index', 'lm', 'text_to_image', 'captions', 'judge')
# The config fields each stage reads beyond those of the stages before it; a stage's settings are
# its own and all of its predecessors', since every stage consumes what the earlier ones wrote.
READS = {'bpe': ('seed', 'world', 'data.bpe_vocab'), 'tokenizer': ('vq', 'mesh', 'sample.prompts'),
         'prepare': ('data',), 'retriever': ('retriever',), 'index': ('index',), 'lm': ('lm',),
         'text_to_image': ('sample',), 'captions': (), 'judge': ()}


def world(config, **fields) -> shapes.ShapesConfig:
    return shapes.ShapesConfig(**{**config.world.to_dict(), **fields})


def source(config, split: str, count: int | None = None, **fields) -> dict:
    """A make_source spec of the quickstart's world."""
    spec = {'kind': 'shapes', 'split': split, 'seed': config.seed, 'cfg': {**config.world.to_dict(), **fields}}
    return spec if count is None else {**spec, 'count': count}


def settings(config, name: str) -> dict:
    """The config fields stage ``name`` depends on (``READS`` of it and every stage before it),
    flattened to dotted keys."""
    flat = {}

    def walk(key, value):
        if hasattr(value, 'items'):
            for k, v in value.items():
                walk(f'{key}.{k}', v)
        else:
            flat[key] = list(value) if isinstance(value, tuple) else value

    tree = json.loads(config.to_json_best_effort())
    for stage in STAGES[:STAGES.index(name) + 1]:
        for key in READS[stage]:
            value = tree
            for part in key.split('.'):
                value = value.get(part) if isinstance(value, dict) else None
            walk(key, value)
    return flat


class Stages:
    """Which stages are done, with their results, seconds and settings, in ``out/stages.json``."""

    def __init__(self, out: pathlib.Path, config=None):
        self.out, self.config = out, config
        self.path = out / 'stages.json'
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def check(self) -> None:
        """Refuses a config that changes what a finished stage read: its outputs, and everything
        made from them, would silently belong to other settings."""
        from cm3jax.errors import ConfigError
        for name in STAGES:
            then = self.done.get(name, {}).get('settings')
            if then is None:  # not done, or recorded before settings were
                continue
            now = settings(self.config, name)
            changed = sorted(k for k in then.keys() | now.keys() if then.get(k, '<unset>') != now.get(k, '<unset>'))
            if changed:
                shown = '; '.join(f'{k}: {then.get(k, "<unset>")!r} there, {now.get(k, "<unset>")!r} now'
                                  for k in changed[:4]) + ('; ...' if len(changed) > 4 else '')
                raise ConfigError(f'{self.out} holds the stage {name!r} done with other settings ({shown}); run '
                                  f'into a new directory (--config.out=...) or remove {self.out} to start over')

    def run(self, name: str, fn) -> dict:
        number = f'[{STAGES.index(name) + 1}/{len(STAGES)}]'
        if name in self.done:
            tqdm.write(f'{number} {name}: done already ({self.done[name]["seconds"]:.0f} s then)')
            return self.done[name]['result']
        tqdm.write(f'{number} {name} ...')
        begin = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - begin
        self.done[name] = {'seconds': seconds, 'result': result}
        if self.config is not None:
            self.done[name]['settings'] = settings(self.config, name)
        self.path.write_text(json.dumps(self.done, indent=1))
        tqdm.write(f'{number} {name}: {seconds:.0f} s')
        return result


def _finished(summary: dict, steps: int, name: str) -> dict:
    # a trainer stopped by SIGTERM saves and returns normally: only a finished run is done
    if summary['step'] < steps:
        raise SystemExit(f'{name} stopped at step {summary["step"]} of {steps}; run the same command again to '
                         f'continue from its checkpoint')
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


# ---- 1-6: tokenizers, data, retriever, LM --------------------------------------------------------

def bpe(config, out: pathlib.Path) -> dict:
    from cm3jax.data import prepare
    from cm3jax.data.sources import make_source
    tok = prepare.train_text_tokenizer(make_source(source(config, 'train')), config.data.bpe_vocab, 5000,
                                       out / 'bpe' / 'tokenizer.json')
    return {'text_ids': tok.num_text}


def tokenizer(config, out: pathlib.Path) -> dict:
    from cm3jax import trainers
    vq = copy.deepcopy(config.vq)
    vq.seed = config.seed
    vq.model.resolution = config.world.canvas
    vq.data.source = source(config, 'train')
    vq.data.eval = {'split': 'validation'}
    vq.mesh = config.mesh
    summary = _finished(trainers.train(vq, str(out / 'vq')), vq.train.steps, 'the tokenizer')
    return {**summary, 'judge_roundtrip': roundtrip(config, out)}


def roundtrip(config, out: pathlib.Path) -> dict:
    """The Shapes judge on held-out scenes after VQ encode and decode: the ceiling of any LM
    that draws through this tokenizer."""
    from cm3jax.data.sources import make_source
    from cm3jax.data.worlds import shapes_judge
    from cm3jax.vq import load, model as vq
    params, cfg = load.load_tokenizer(out / 'vq')
    docs = list(make_source(source(config, 'validation', config.sample.prompts)))
    images = np.stack([d.images[0] for d in docs])
    codes = vq.encode(params, images, cfg)
    rebuilt = np.asarray(vq.decode(params, codes, cfg))
    scores = [shapes_judge.score(im, d.texts[0], world(config)) for im, d in zip(rebuilt, docs)]
    return rate([s['exact'] for s in scores])


def prepare_data(config, out: pathlib.Path) -> dict:
    from cm3jax.data import prepare
    from configs import data as data_configs
    for name, split, count in (('data', 'train', config.data.train), ('eval', 'validation', config.data.eval)):
        data = data_configs.get_config('shapes')
        data.source = source(config, split, count)
        data.out, data.vq_workdir = str(out / name), str(out / 'vq')
        data.text_tokenizer.path = str(out / 'bpe' / 'tokenizer.json')
        prepare.run(data)
    return {'documents': prepare.read_manifest(out / 'data')['documents'],
            'vocab_size': prepare.read_manifest(out / 'data')['vocab']['size']}


def retriever(config, out: pathlib.Path, workdir: pathlib.Path | None = None) -> dict:
    """The retriever stage, into ``workdir`` (default ``out/retriever``)."""
    from cm3jax import trainers
    clip = copy.deepcopy(config.retriever)
    clip.seed = config.seed
    clip.model.image_size = config.world.canvas
    clip.model.max_len = 24  # the longest caption of three objects, with its end token
    clip.tokenizer.file = str(out / 'bpe' / 'tokenizer.json')
    clip.data.source = source(config, 'train')
    clip.data.eval = {'validation': {'split': 'validation'}}
    clip.mesh = config.mesh
    workdir = workdir or out / 'retriever'
    summary = _finished(trainers.train(clip, str(workdir)), clip.train.steps, 'the retriever')
    return {**summary, **retriever_binding(config, workdir)}


def binding_probe(config) -> tuple[np.ndarray, list[str], list[str]]:
    """`cm3jax.eval.shapes.binding_probe` on unseen two-object scenes of the quickstart's world."""
    from cm3jax.eval import shapes as shapes_eval
    return shapes_eval.binding_probe(world(config), config.sample.prompts, seed=config.seed + 2)


def retriever_binding(config, workdir: pathlib.Path) -> dict:
    """How often the retriever scores an image higher with its caption than with the caption whose
    two shapes are swapped (0.5: it reads captions as bags of words, and re-ranking cannot catch a
    sample that binds them the wrong way); {} when the world holds no two objects."""
    from cm3jax.eval import shapes as shapes_eval
    from cm3jax.retrieval import load as retrieval_load
    images, captions, swapped = binding_probe(config)
    if not len(images):
        return {}
    retriever = retrieval_load.load_retriever(workdir)
    return {'binding': shapes_eval.preference(retriever.score(images, captions), retriever.score(images, swapped))}


def index(config, out: pathlib.Path) -> dict:
    from cm3jax.retrieval import build, load, select
    # the tiny CLIP maps every scene of one caption within cosine ~0.999 of it and of each other,
    # so the paper's 0.9 caps would drop exactly the relevant documents: off here (docs/quickstart.md)
    caps = select.SelectConfig(max_query_score=float('inf'), max_pair_similarity=float('inf'))
    summary = build.build_index(out / 'data', load.load_retriever(out / 'retriever'),
                                build.BuildConfig(top_m=config.index.top_m, batch=256, select=caps),
                                queries=[out / 'eval'])
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def lm_config(config, out: pathlib.Path):
    from cm3jax.data import prepare
    lm = copy.deepcopy(config.lm)
    lm.seed = config.seed
    vocab = prepare.read_manifest(out / 'data')['vocab']
    lm.model.vocab_size = vocab['size']
    if lm.model.image_positions:  # the data's image codes, found as vocab_size is
        lm.model.image_ids = (vocab['image_offset'], vocab['image_offset'] + vocab['num_image_codes'])
    lm.data.update(dir=str(out / 'data'), eval_dir=str(out / 'eval'))
    lm.mesh = config.mesh
    return lm


def lm(config, out: pathlib.Path) -> dict:
    from cm3jax import trainers
    cfg = lm_config(config, out)
    summary = _finished(trainers.train(cfg, str(out / 'lm')), cfg.train.steps, 'the LM')
    return {**summary, **guidance_gap(config, out)}


def guidance_gap(config, out: pathlib.Path) -> dict:
    """Held-out image-token NLL after the caption and after the unconditional prompt: guidance
    subtracts the second stream, so it must be trained (caption dropout) to mean anything. And
    binding: how often the true caption of a two-object scene gives its image a lower NLL than the
    caption with the two shapes swapped (`binding_probe`), and by how many nats per image."""
    import flax.linen as nn
    import jax
    from cm3jax.eval import shapes as shapes_eval
    from cm3jax.sample import generate, load
    gen, mesh, rules = load.load_generator(out / 'lm')
    docs = scenes(config, *prompt_sets(config)['main'], config.sample.prompts)
    images, captions = np.stack([d.images[0] for d in docs]), [d.texts[0] for d in docs]
    pairs, true, swapped = binding_probe(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        nll = generate.image_nll(gen, captions + [None] * len(captions), np.concatenate([images, images]))
        if len(pairs):
            bound = generate.image_nll(gen, true + swapped, np.concatenate([pairs, pairs])) * gen.image_tokens
    result = {'image_nll_conditional': float(nll[:len(docs)].mean()),
              'image_nll_unconditional': float(nll[len(docs):].mean())}
    if len(pairs):
        result |= {'binding': shapes_eval.preference(-bound[:len(true)], -bound[len(true):]),
                   'binding_gap_nats': float((bound[len(true):] - bound[:len(true)]).mean())}
    return result


# ---- 7-9: sampling, captioning, judging ----------------------------------------------------------

def prompt_sets(config) -> dict[str, tuple[shapes.ShapesConfig, str]]:
    """name -> (world, split) of each measured set of captions: unseen scenes of 1-2 objects (the
    headline), of exactly 1, 2 and 3 objects, and scenes holding a (shape, colour) pair that
    training never showed."""
    top = min(2, config.world.max_objects)
    sets = {'main': (world(config, min_objects=1, max_objects=top), 'validation')}
    for k in range(1, config.world.max_objects + 1):
        sets[f'objects_{k}'] = (world(config, min_objects=k, max_objects=k), 'validation')
    sets['held_out_pairs'] = (world(config, min_objects=1, max_objects=top), 'held_out')
    return sets


def scenes(config, cfg: shapes.ShapesConfig, split: str, n: int) -> list:
    """The first ``n`` documents of ``split`` (a seed of its own, apart from training's)."""
    return [shapes.scene_document(cfg, config.seed + 1, i, split) for i in range(n)]


def sample_config(config):
    from cm3jax.sample import decode
    s = config.sample
    return decode.SampleConfig(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
                               mode=s.mode, cdk_k=s.cdk_k, cdk_alpha=s.cdk_alpha)


ROWS = 512  # samples per decode call: large batches amortise each step's fixed cost


def draw(gen, captions: list[str], num: int, sample, seed: int, desc: str = 'draw') -> tuple[np.ndarray, np.ndarray]:
    """``num`` images per caption -> (uint8 images [P, num, R, R, 3], their codes Int[P, num, h, w]),
    in decode calls of about ``ROWS`` samples, each call's key folded from ``seed`` and its first
    caption's index."""
    import jax
    from cm3jax.sample import generate
    step, drawn = max(1, ROWS // num), []
    width = 1 + max(len(gen.text(c)) for c in captions)  # caption <break>: every call of one shape
    for start in tqdm(range(0, len(captions), step), desc=desc, unit='call', leave=False):
        rng = jax.random.fold_in(jax.random.key(seed), start)
        drawn.append(generate.text_to_image(gen, captions[start:start + step], num=num, sample=sample,
                                            rng=rng, pad_to=width))
    return tuple(np.concatenate([d[k] for d in drawn]) for k in ('images', 'codes'))


def text_to_image(config, out: pathlib.Path) -> dict:
    """Every set's captions drawn ``sample.num`` times (the headline set) or once (the others), and
    the headline's samples scored by CLIP; saved to ``text_to_image.npz``."""
    import flax.linen as nn
    import jax
    from cm3jax.retrieval import load as retrieval_load
    from cm3jax.sample import load
    gen, mesh, rules = load.load_generator(out / 'lm')
    sample, arrays = sample_config(config), {}
    sets = {name: [d.texts[0] for d in scenes(config, cfg, split, config.sample.prompts)]
            for name, (cfg, split) in prompt_sets(config).items()}
    once = [name for name in sets if name != 'main']  # one sample per caption: drawn together, in calls of one shape
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        main, codes = draw(gen, sets['main'], config.sample.num, sample, config.seed, 'draw main')
        rest, _ = draw(gen, sum((sets[name] for name in once), []), 1, sample, config.seed + 1, 'draw the other sets')
    arrays['main/images'], arrays['main/codes'] = main, codes
    for name, images in zip(once, np.split(rest, len(once))):
        arrays[f'{name}/images'] = images
    for name, captions in sets.items():
        arrays[f'{name}/captions'] = np.asarray(captions)
    arrays['main/scores'] = clip_scores(retrieval_load.load_retriever(out / 'retriever'), arrays['main/images'],
                                        arrays['main/captions'])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        arrays['main/lm_scores'] = lm_scores(gen, codes, arrays['main/captions'])
    np.savez_compressed(out / 'text_to_image.npz', **arrays)
    return {'file': str(out / 'text_to_image.npz')}


def clip_scores(retriever, images: np.ndarray, captions) -> np.ndarray:
    """uint8 [P, N, R, R, 3] and P captions -> Float[P, N] CLIP scores, in one batched pass (the
    re-ranking of `cm3jax sample --retriever`)."""
    flat = retriever.score(images.reshape(-1, *images.shape[2:]), list(np.repeat(captions, images.shape[1])))
    return np.asarray(flat).reshape(images.shape[:2])


def lm_scores(gen, codes: np.ndarray, captions) -> np.ndarray:
    """The codes the LM drew, Int[P, N, h, w], and P captions -> Float[P, N]: minus the nats the LM
    spends writing each caption after its sample (`generate.caption_nll_codes`): a re-ranker beside
    CLIP that reads the samples with the model that binds colours to shapes. It reads the drawn
    codes, not the decoded pixels: encoding those again changes many codes, which the LM reads
    far worse (docs/quickstart.md, "Binding")."""
    from cm3jax.sample import generate
    flat = generate.caption_nll_codes(gen, codes.reshape(-1, *codes.shape[2:]),
                                      list(np.repeat(captions, codes.shape[1])))
    return -flat.reshape(codes.shape[:2])


def captions(config, out: pathlib.Path) -> dict:
    """Captions for held-out scenes of 1-2 objects, greedy, saved to ``captions.json``."""
    import flax.linen as nn
    import jax
    from cm3jax.sample import generate, load
    gen, mesh, rules = load.load_generator(out / 'lm')
    cfg, split = prompt_sets(config)['main']
    docs = scenes(config, cfg, split, config.sample.captions)
    images = np.stack([d.images[0] for d in docs])
    written = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for start in tqdm(range(0, len(images), ROWS), desc='caption', unit='call', leave=False):
            written += generate.image_to_text(gen, images[start:start + ROWS], form='continue')
    record = [{'true': d.texts[0], 'generated': g} for d, g in zip(docs, written)]
    (out / 'captions.json').write_text(json.dumps(record, indent=1))
    return {'file': str(out / 'captions.json')}


def judge_drawn(images: np.ndarray, captions, cfg: shapes.ShapesConfig, desc: str = 'judge') -> dict:
    """uint8 [P, N, R, R, 3] drawn for P captions -> {'exact', 'attr', 'extra', 'relation': Float[P, N]}
    by the Shapes judge (`shapes_judge.score`'s fields; relation is NaN where a caption states none)."""
    from cm3jax.data.worlds import shapes_judge
    scored = [[shapes_judge.score(im, str(c), cfg) for im in row]
              for row, c in tqdm(zip(images, captions), total=len(captions), desc=desc, leave=False)]
    return {k: np.array([[s[k] for s in row] for row in scored]) for k in ('exact', 'attr', 'extra', 'relation')}


def judge(config, out: pathlib.Path, done: dict) -> dict:
    """The report: every drawn image scored against its caption, every written caption against
    its image, by the Shapes judge; then report.md, samples.png and captions.md."""
    from cm3jax import quickstart_report
    from cm3jax.data.worlds import shapes_judge
    cfg = world(config)
    arrays = np.load(out / 'text_to_image.npz')
    t2i, attr = {}, {}
    for name in prompt_sets(config):
        judged = judge_drawn(arrays[f'{name}/images'], arrays[f'{name}/captions'], cfg, f'judge {name}')
        t2i[name], attr[name] = {'exact': judged['exact']}, rate(judged['attr'][:, 0])
    main = t2i['main']['exact']
    best = arrays['main/scores'].argmax(1)
    report = {
        'text_to_image': {
            'exact': rate(main[:, 0]),
            'exact_reranked': rate(main[np.arange(len(main)), best]),
            'exact_any_of_num': rate(main.max(1)),
            # the best of the same samples by the LM's own caption likelihood (absent in older runs)
            **({'exact_reranked_lm': rate(main[np.arange(len(main)), arrays['main/lm_scores'].argmax(1)])}
               if 'main/lm_scores' in arrays else {}),
            'attr': attr['main'],
            'by_objects': {k.split('_')[1]: rate(t2i[k]['exact'][:, 0]) for k in t2i if k.startswith('objects_')},
            'held_out_pairs': rate(t2i['held_out_pairs']['exact'][:, 0]),
            'num': int(main.shape[1]),
        },
    }
    if 'objects_2' in t2i:  # what goes wrong where the model is weakest (docs/quickstart.md)
        wrong = [shapes_judge.failures(im[0], str(c), cfg)
                 for im, c in zip(arrays['objects_2/images'], arrays['objects_2/captions'])]
        report['text_to_image']['two_objects_wrong'] = {k: rate([w[k] for w in wrong]) for k in wrong[0]}
    written = json.loads((out / 'captions.json').read_text())
    docs = scenes(config, *prompt_sets(config)['main'], len(written))
    i2t = [shapes_judge.score(d.images[0], w['generated'], cfg) for d, w in zip(docs, written)]
    report['image_to_text'] = {'exact': rate([s['exact'] for s in i2t]), 'attr': rate([s['attr'] for s in i2t])}
    report['tokenizer'] = {'judge_roundtrip': done['tokenizer']['result']['judge_roundtrip'],
                           'psnr': done['tokenizer']['result'].get('eval/psnr')}
    keep = ('loss', 'eval/loss', 'eval/image/nll', 'eval/text/nll', 'image_nll_conditional', 'image_nll_unconditional',
            'binding', 'binding_gap_nats')
    report['lm'] = {k: v for k, v in done['lm']['result'].items() if k in keep}
    if 'binding' in done['retriever']['result']:
        report['retriever'] = {'binding': done['retriever']['result']['binding']}
    report['sample'] = config.sample.to_dict()
    quickstart_report.write(out, report, arrays, main, best, written, [s['exact'] for s in i2t], docs)
    return report


def run(config) -> dict:
    """Run (or finish) every stage in ``config.out``; returns report.json's contents."""
    world(config)  # a bad world fails here, before any stage
    out = pathlib.Path(config.out).absolute()
    stages = Stages(out, config)
    stages.check()  # before config.json is overwritten: a refused run leaves the directory as it was
    out.mkdir(parents=True, exist_ok=True)
    (out / 'config.json').write_text(config.to_json_best_effort(indent=2))
    begin = time.perf_counter()
    steps = {'bpe': bpe, 'tokenizer': tokenizer, 'prepare': prepare_data, 'retriever': retriever, 'index': index,
             'lm': lm, 'text_to_image': text_to_image, 'captions': captions}
    for name, fn in steps.items():
        stages.run(name, lambda fn=fn: fn(config, out))
    report = stages.run('judge', lambda: judge(config, out, stages.done))
    report = {**report, 'stages': {k: {'seconds': v['seconds']} for k, v in stages.done.items()},
              'wall_seconds': sum(v['seconds'] for v in stages.done.values()),
              'this_run_seconds': time.perf_counter() - begin}
    from cm3jax import quickstart_report
    quickstart_report.finish(out, report)
    return report
