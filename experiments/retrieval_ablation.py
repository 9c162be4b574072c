"""The toy-scale analogue of the paper's Table 1 (docs/paper.md, "Retrieval augmentation"): does retrieval help?

    python experiments/retrieval_ablation.py --workdir=runs/retrieval_ablation

Everything is built here from nothing, on the procedural Shapes world (one object on a 16x16
canvas, so an image is 8x8 = 64 codes and the whole run fits a laptop CPU):

1. ``vq/``         the tiny VQ-GAN (configs/vq.py:tiny) trained on the world's images;
2. ``data/``, ``eval/``  `cm3jax prepare` of training and validation scenes;
3. ``retriever/``  the tiny CLIP (configs/clip.py:tiny) trained on the same world;
4. the memory bank and neighbour lists of `cm3jax build-index` in ``data/`` (and ``eval/``);
5. ``lm_none/``, ``lm_ra/``  the LM trained for the same number of steps without and with
   retrieval augmentation (``--retrieved``, default '2' as in CM3leon);
6. for each LM and K in 0, 1, 2 retrieved documents:
   - the validation loss on the query document alone (caption then image, no CM3 masking; the
     retrieved documents weigh 0), with the neighbours build-index chose for each document;
   - text-to-image on validation captions, the K documents retrieved for the caption's text at
     inference (`cm3jax.retrieval.inference.retrieve`), judged by the Shapes judge (exact: every
     stated shape, colour and size right, nothing extra).

Writes ``results.json``, ``results.md`` (the table), ``results.png`` (the plot) and
``samples.npz`` (every sampled image) in the workdir. Stages whose output exists are skipped, so an interrupted run continues where it was;
``--fresh`` starts over. The VQ round trip of the same validation images is judged too: it is
the ceiling any LM can reach through this tokenizer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ is imported as a package from the repository root

WORLD = {'canvas': 16, 'min_objects': 1, 'max_objects': 1}  # cm3jax.data.worlds.shapes.ShapesConfig
# TOY_CAPS: the paper's 0.9 caps drop near-duplicates of real CLIP ViT-B/32 embeddings of web
# documents. The tiny CLIP puts every Shapes document of one caption within cosine ~0.999 of that
# caption and of each other, so any cap below 1 removes exactly the relevant documents; the
# default turns the caps off (self-exclusion and query dropout stay).


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--workdir', default='runs/retrieval_ablation')
    p.add_argument('--fresh', action='store_true', help='delete the workdir first')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--docs', type=int, default=4000, help='training documents (scenes)')
    p.add_argument('--eval_docs', type=int, default=256, help='validation documents (loss and prompts)')
    p.add_argument('--prompts', type=int, default=128, help='validation captions drawn for text-to-image')
    p.add_argument('--vq_steps', type=int, default=600)
    p.add_argument('--retriever_steps', type=int, default=300)
    p.add_argument('--lm_steps', type=int, default=1200, help='steps of each LM (equal for both arms)')
    p.add_argument('--lm_batch', type=int, default=16)
    p.add_argument('--seq_len', type=int, default=256)
    p.add_argument('--lm_size', default='2,64,4', help='layers,d_model,heads of the LM')
    p.add_argument('--retrieved', default='2', help="the RA arm's data.retrieved ('2': CM3leon, '0,1,2': RA-CM3)")
    p.add_argument('--top_m', type=int, default=4, help='neighbours kept per document by build-index')
    p.add_argument('--max_score', type=float, default=float('inf'),
                   help="the selection's caps on query and pairwise similarity (paper: 0.9); see TOY_CAPS")
    p.add_argument('--ks', default='0,1,2', help='retrieved documents at evaluation')
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--top_p', type=float, default=0.9)
    p.add_argument('--cfg_scale', type=float, default=3.0)
    p.add_argument('--loss_batches', type=int, default=8, help='validation batches for the query loss')
    args = p.parse_args(argv)
    if args.prompts > args.eval_docs:
        p.error(f'--prompts={args.prompts} exceeds --eval_docs={args.eval_docs}')
    return args


def say(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


# ---- 1-4: tokenizer, data, retriever, index -----------------------------------------------------

def train_vq(args, workdir: pathlib.Path) -> None:
    from cm3jax import trainers
    from configs import vq as vq_configs
    config = vq_configs.get_config('tiny')
    # the tokenizer this ablation's results were measured with: one object on 16 px -> 8x8 codes from 256
    config.model.update(resolution=WORLD['canvas'], patch=1, ch=32, ch_mult=(1, 2), norm_groups=32, z_channels=32,
                        embed_dim=16, num_codes=256, num_res_blocks=1)
    config.seed = args.seed
    config.data.source = {'kind': 'shapes', 'split': 'train', 'seed': args.seed, 'cfg': dict(WORLD)}
    config.data.eval = {'split': 'validation', 'seed': args.seed + 1}  # the same validation scenes at every eval
    config.train.update(steps=args.vq_steps, eval_every=args.vq_steps, image_every=args.vq_steps,
                        checkpoint_every=args.vq_steps)
    trainers.train(config, str(workdir))


def prepare_data(args, out: pathlib.Path) -> None:
    from cm3jax.data import prepare
    from configs import data as data_configs
    for name, split, count in (('data', 'train', args.docs), ('eval', 'validation', args.eval_docs)):
        config = data_configs.get_config('shapes')
        config.source.update(split=split, count=count, seed=args.seed, cfg=dict(WORLD))
        config.out, config.vq_workdir = str(out / name), str(out / 'vq')
        if name == 'eval':  # validation documents must read with the training data's BPE
            config.text_tokenizer.path = str(out / 'data' / 'tokenizer.json')
        prepare.run(config)


def train_retriever(args, workdir: pathlib.Path) -> None:
    from cm3jax import trainers
    from configs import clip as clip_configs
    config = clip_configs.get_config('tiny')
    config.seed = args.seed
    config.model.update(image_size=WORLD['canvas'], max_len=16)
    config.data.source.update(seed=args.seed, cfg=dict(WORLD))
    config.train.update(steps=args.retriever_steps, eval_every=args.retriever_steps,
                        checkpoint_every=args.retriever_steps)
    trainers.train(config, str(workdir))


def selection(args):
    from cm3jax.retrieval import select
    return select.SelectConfig(max_query_score=args.max_score, max_pair_similarity=args.max_score)


def build_index(args, out: pathlib.Path) -> dict:
    from cm3jax.retrieval import build, load
    retriever = load.load_retriever(out / 'retriever')
    return build.build_index(out / 'data', retriever, build.BuildConfig(top_m=args.top_m, select=selection(args)),
                             queries=[out / 'eval'])


# ---- 5: the two LMs -----------------------------------------------------------------------------

def lm_config(args, out: pathlib.Path, retrieved: str):
    from cm3jax.data import prepare
    from configs import lm as lm_configs
    layers, d_model, heads = (int(x) for x in args.lm_size.split(','))
    config = lm_configs.get_config('tiny')
    config.seed = args.seed
    config.model.update(num_layers=layers, d_model=d_model, num_heads=heads, mlp_dim=4 * d_model,
                        max_len=args.seq_len, vocab_size=prepare.read_manifest(out / 'data')['vocab']['size'])
    config.data.update(dir=str(out / 'data'), eval_dir=str(out / 'eval'), retrieved=retrieved)
    config.train.update(steps=args.lm_steps, batch=args.lm_batch, seq_len=args.seq_len, eval_every=args.lm_steps,
                        checkpoint_every=args.lm_steps, log_every=50)
    return config


# ---- 6: evaluation ------------------------------------------------------------------------------

def query_loss(gen, mesh, rules, out: pathlib.Path, args, k: int) -> float:
    """Mean next-token loss on validation query documents (caption, then image; no CM3) with
    their K best build-index neighbours before them, the neighbours weighing 0."""
    import flax.linen as nn
    import jax
    from cm3jax import parallel
    from cm3jax.data import augment, cm3, documents, pipeline
    from cm3jax.lm.task import lm_loss_fn

    layout = documents.LayoutConfig(text_first=1.0)
    cfg = pipeline.PipelineConfig(seq_len=args.seq_len, batch=args.lm_batch, seed=args.seed, shuffle=False,
                                  layout=layout, cm3=cm3.CM3Config(rate=0.0), retrieved_weight=0.0)
    hook = augment.RetrievalAugment(out / 'data', gen.vocab, augment.RetrievalConfig((k,)), layout,
                                    neighbours_dir=out / 'eval') if k else None
    data = pipeline.Pipeline(out / 'eval', gen.vocab, cfg, augment=hook)
    loss_fn = jax.jit(lm_loss_fn(gen.model))
    total = weight = 0.0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for _ in range(args.loss_batches):
            batch = parallel.global_batch(next(data), mesh, rules)
            _, stats = loss_fn(gen.params, batch, None)
            s, w = stats['nll']
            total, weight = total + float(s), weight + float(w)
    if data.counts['truncated']:
        say(f'  note: {data.counts["truncated"]} validation examples were longer than --seq_len={args.seq_len}')
    return total / weight


def judge_accuracy(gen, mesh, rules, retriever, out: pathlib.Path, prompts, args, k: int):
    """(exact accuracy, attribute accuracy, images UInt8[P, S, S, 3]) of text-to-image on the
    prompts with K documents retrieved for each prompt's text."""
    import flax.linen as nn
    import jax
    from cm3jax.data.worlds import shapes, shapes_judge
    from cm3jax.retrieval import inference
    from cm3jax.sample import decode, generate

    retrieved = inference.retrieve(retriever, out / 'data', prompts, k, vocab=gen.vocab, cfg=selection(args)) \
        if k else None
    sample = decode.SampleConfig(temperature=args.temperature, top_p=args.top_p, cfg_scale=args.cfg_scale)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        images = generate.text_to_image(gen, prompts, sample=sample, rng=jax.random.key(args.seed + k),
                                        retrieved=retrieved)['images'][:, 0]
    world = shapes.ShapesConfig(**WORLD)
    scores = shapes_judge.mean_scores([shapes_judge.score(im, p, world) for im, p in zip(images, prompts)])
    return scores['exact'], scores['attr'], images


def vq_ceiling(out: pathlib.Path, docs) -> float:
    """Judge accuracy of the validation images after the VQ round trip."""
    from cm3jax.data.worlds import shapes, shapes_judge
    from cm3jax.vq import load, model as vq
    params, cfg = load.load_tokenizer(out / 'vq')
    images = np.stack([d.images[0] for d in docs])
    recon = np.asarray(vq.decode(params, vq.encode(params, images, cfg), cfg))
    world = shapes.ShapesConfig(**WORLD)
    return shapes_judge.mean_scores([shapes_judge.score(im, d.texts[0], world) for im, d in zip(recon, docs)])['exact']


def arms(args) -> dict[str, str]:
    """The two LMs: name -> their data.retrieved ('' = no retrieval)."""
    return {'none': '', 'ra': args.retrieved}


def evaluate(args, out: pathlib.Path) -> dict:
    from cm3jax.data.sources import make_source
    from cm3jax.retrieval import load as retrieval_load
    from cm3jax.sample import load
    ks = [int(k) for k in args.ks.split(',')]
    source = make_source({'kind': 'shapes', 'split': 'validation', 'seed': args.seed, 'count': args.eval_docs,
                          'cfg': dict(WORLD)})
    docs = list(source)[:args.prompts]
    prompts = [d.texts[0] for d in docs]
    retriever = retrieval_load.load_retriever(out / 'retriever')
    results = {'ks': ks, 'prompts': len(prompts), 'vq_ceiling': vq_ceiling(out, docs), 'arms': {}}
    samples = {}
    for arm in arms(args):
        gen, mesh, rules = load.load_generator(out / f'lm_{arm}')
        row = results['arms'][arm] = {'loss': {}, 'exact': {}, 'attr': {}}
        for k in ks:
            row['loss'][k] = query_loss(gen, mesh, rules, out, args, k)
            row['exact'][k], row['attr'][k], samples[f'{arm}_k{k}'] = judge_accuracy(
                gen, mesh, rules, retriever, out, prompts, args, k)
            say(f'{arm:>4} K={k}: query loss {row["loss"][k]:.3f}, judge exact {row["exact"][k]:.3f}, '
                f'attributes {row["attr"][k]:.3f}')
    np.savez_compressed(out / 'samples.npz', prompts=np.asarray(prompts), **samples)
    return results


# ---- Report -------------------------------------------------------------------------------------

def table(results: dict, args) -> str:
    ks = results['ks']
    head = ['LM trained', *[f'query loss K={k}' for k in ks], *[f'judge exact K={k}' for k in ks]]
    names = {'none': 'without retrieval', 'ra': f'with retrieval (K in {{{args.retrieved}}})'}
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for arm, row in results['arms'].items():
        cells = [names[arm], *[f'{row["loss"][k]:.3f}' for k in ks], *[f'{row["exact"][k]:.3f}' for k in ks]]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join([
        f'Shapes world {WORLD}; {args.docs} training documents; both LMs {args.lm_size} (layers,d_model,heads), '
        f'{args.lm_steps} steps of {args.lm_batch}x{args.seq_len} tokens. Query loss: nats per token of the '
        f'validation query document; judge exact: fraction of {results["prompts"]} validation captions whose '
        f'sample the Shapes judge reads as exactly the caption (CFG {args.cfg_scale}, temperature '
        f'{args.temperature}, top-p {args.top_p}). K: retrieved documents in the prompt.', '',
        *lines, '',
        f'VQ round trip of the same validation images (the ceiling): judge exact {results["vq_ceiling"]:.3f}.'])


def plot(results: dict, path: pathlib.Path) -> None:
    """Two bar panels (query loss, judge exact) with a bar per (arm, K), drawn with PIL."""
    from PIL import Image, ImageDraw
    ks, names = results['ks'], list(results['arms'])
    colours = {'none': (120, 120, 120), 'ra': (40, 110, 200)}
    w, h, pad = 360, 260, 40
    img = Image.new('RGB', (2 * w, h + 30), 'white')
    draw = ImageDraw.Draw(img)
    for panel, (metric, title) in enumerate((('loss', 'query loss (lower is better)'),
                                             ('exact', 'judge exact (higher is better)'))):
        x0 = panel * w
        top = max(max(r[metric].values()) for r in results['arms'].values()) or 1.0
        draw.text((x0 + pad, 8), title, fill='black')
        draw.line([(x0 + pad, h - pad), (x0 + w - 10, h - pad)], fill='black')
        slot = (w - pad - 10) / len(ks)
        for i, k in enumerate(ks):
            for j, arm in enumerate(names):
                v = results['arms'][arm][metric][k]
                left = x0 + pad + i * slot + 8 + j * (slot - 16) / len(names)
                right = left + (slot - 16) / len(names) - 4
                y = h - pad - (h - 2 * pad) * v / top
                draw.rectangle([left, y, right, h - pad], fill=colours[arm])
                draw.text((left, y - 12), f'{v:.2f}', fill='black')
            draw.text((x0 + pad + i * slot + slot / 2 - 10, h - pad + 6), f'K={k}', fill='black')
    for j, arm in enumerate(names):
        draw.rectangle([pad + 200 * j, h + 10, pad + 200 * j + 12, h + 22], fill=colours[arm])
        draw.text((pad + 200 * j + 18, h + 10), f'LM {"without" if arm == "none" else "with"} retrieval', fill='black')
    img.save(path)


def steps_saved(workdir: pathlib.Path) -> int:
    """The last step checkpointed in a trainer's workdir (orbax names step directories by number)."""
    steps = [int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()]
    return max(steps, default=0)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = pathlib.Path(args.workdir).absolute()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()

    def stage(name: str, done: pathlib.Path, fn, *fn_args, steps: int = 0) -> None:
        if done.exists():
            say(f'{name}: done already ({done})')
            return
        say(f'{name} ...')
        start = time.perf_counter()
        fn(*fn_args)
        # a trainer stopped by SIGTERM saves and returns normally: only a finished run is done
        reached = steps_saved(done.parent)
        if reached < steps:
            raise SystemExit(f'{name} stopped at step {reached} of {steps}; run the same command again to continue')
        done.touch()
        say(f'{name}: {time.perf_counter() - start:.0f}s')

    stage('VQ tokenizer', out / 'vq' / '.done', train_vq, args, out / 'vq', steps=args.vq_steps)
    stage('prepare', out / 'eval' / '.done', prepare_data, args, out)
    stage('retriever', out / 'retriever' / '.done', train_retriever, args, out / 'retriever',
          steps=args.retriever_steps)
    stage('build-index', out / 'data' / '.index_done', lambda: say(f'  {build_index(args, out)}'))
    from cm3jax import trainers
    for arm, retrieved in arms(args).items():
        stage(f'LM {arm}', out / f'lm_{arm}' / '.done', trainers.train, lm_config(args, out, retrieved),
              str(out / f'lm_{arm}'), steps=args.lm_steps)
    say('evaluation ...')
    results = evaluate(args, out)
    results['args'], results['invocation_seconds'] = vars(args), time.perf_counter() - begin  # skipped stages excluded
    (out / 'results.json').write_text(json.dumps(results, indent=2))
    md = table(results, args)
    (out / 'results.md').write_text(md + '\n')
    plot(results, out / 'results.png')
    print(md)
    say(f'wrote {out / "results.md"}, results.json and results.png')
    return results


if __name__ == '__main__':
    main()
