"""Does instruction tuning teach the quickstart's model to edit, answer, place, trace and write?
Before and after SFT on the Shapes task mixture (docs/sft.md, "What was measured"):

    make demo    # the pretrained model: out/quickstart/lm
    python experiments/sft_shapes.py --pretrained=out/quickstart/lm --workdir=out/sft_shapes

Fine-tunes ``--pretrained`` with configs/sft.py:shapes (``--steps``, ``--loss`` and ``--lr``
override it) in ``--workdir/run`` (resumed when interrupted), then judges the model before and
after on ``--items`` held-out examples of each task (unseen scenes):

  vqa        answer accuracy (VQA normalisation), by question kind
  edit       edit success: the asked change and nothing else (`cm3jax.eval.instructions`), by
             kind of edit, and its parts: the rest kept, the change made
  grounded   box accuracy: objects drawn in their box (IoU >= 0.5), and exact match
  structure  edge map + caption -> image, the judge's exact match
  write      how-to-write legibility: the string read back by template matching
  caption    captioning exact match (SFT should keep it)

Writes ``sft_shapes.md`` (the table), ``sft_shapes.json`` ({metric: {before, after, n}}),
``sft_shapes.png`` (before/after examples per task) and ``sft_shapes_run.json`` (the command,
settings, timings and a few answers and captions) into ``--results``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

IMAGE_TASKS = ('edit', 'structure', 'grounded', 'write')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--pretrained', default='out/quickstart/lm', help='the quickstart\'s LM workdir')
    p.add_argument('--workdir', default='out/sft_shapes', help='where SFT trains (run/) and samples are kept')
    p.add_argument('--results', default='experiments/results', help='where the table, JSON and plot go')
    p.add_argument('--items', type=int, default=128, help='held-out examples per task')
    p.add_argument('--steps', type=int, default=0, help='SFT steps (0: the config\'s)')
    p.add_argument('--lr', type=float, default=0.0, help='peak learning rate (0: the config\'s)')
    p.add_argument('--loss', default='', help="'cm3' or 'prompt' ('': the config's)")
    p.add_argument('--examples', type=int, default=0, help='Shapes examples per task (0: the config\'s)')
    p.add_argument('--weights', default='', help="the task mixture, e.g. 'edit:2,caption:2' ('': the config's)")
    p.add_argument('--grow', type=int, default=-1,
                   help='new identity blocks placed among the pretrained ones (-1: the config\'s grow_layers)')
    p.add_argument('--edit_cfg', type=float, default=1.5, help='text guidance of edits')
    p.add_argument('--edit_image_cfg', type=float, default=1.0, help='image guidance of edits')
    p.add_argument('--temperature', type=float, default=0.5, help='image sampling temperature')
    p.add_argument('--top_p', type=float, default=0.9)
    p.add_argument('--config', default='configs/sft.py:shapes', help='the SFT preset')
    args = p.parse_args(argv)
    if args.items < 1:
        p.error('--items must be at least 1')
    return args


def sft_config(args):
    from configs import sft as sft_configs
    config = sft_configs.get_config(args.config.split(':', 1)[1] if ':' in args.config else 'shapes')
    if args.steps:
        config.train.steps = args.steps
    if args.lr:
        config.optim.learning_rate = args.lr
    if args.loss:
        config.data.loss = args.loss
    if args.examples:
        config.data.shapes_examples = args.examples
    if args.weights:
        config.data.weights = args.weights
    if args.grow >= 0:
        config.grow_layers = args.grow
    return config


def items(config, task: str, n: int) -> list:
    """``n`` held-out examples of ``task``: validation scenes of another seed than training's."""
    from cm3jax.data.worlds import shapes
    from cm3jax.sft import tasks
    world = shapes.ShapesConfig(**config.data.world.to_dict())
    return [tasks.example(task, world, config.seed + 1, i, 'validation') for i in range(n)]


def evaluate(gen, config, args, n: int, desc: str) -> tuple[dict, dict]:
    """The model's outputs on every task's held-out examples, judged -> (metrics, outputs)."""
    import jax
    from tqdm import tqdm
    from cm3jax.data.worlds import glyphs, shapes, shapes_judge
    from cm3jax.eval import instructions as judge
    from cm3jax.sft import tasks
    from cm3jax.sample import decode as dec, generate
    world = shapes.ShapesConfig(**config.data.world.to_dict())
    draw = dec.SampleConfig(temperature=args.temperature, top_p=args.top_p)
    edit_sample = dec.SampleConfig(temperature=args.temperature, top_p=args.top_p, cfg_scale=args.edit_cfg,
                                   image_cfg_scale=args.edit_image_cfg)
    rng = jax.random.key(config.seed + 11)
    metrics, outputs = {}, {}
    for task in tqdm(('vqa', 'caption', *IMAGE_TASKS), desc=desc, leave=False):
        docs = items(config, task, n)
        m = [d.meta for d in docs]
        if task == 'vqa':
            images = np.stack([d.segments[3] for d in docs])
            answers = generate.answer(gen, images, [x['question'] for x in m])
            hits = [judge.vqa_correct(a, x['answer']) for a, x in zip(answers, m)]
            metrics['vqa'] = hits
            for kind in sorted({x['kind'] for x in m}):
                metrics[f'vqa/{kind}'] = [h for h, x in zip(hits, m) if x['kind'] == kind]
            outputs[task] = answers
        elif task == 'caption':
            images = np.stack([d.segments[0] for d in docs])
            written = generate.image_to_text(gen, images, form='continue')
            metrics['caption'] = [shapes_judge.score(im, w, world)['exact'] == 1.0 for im, w in zip(images, written)]
            outputs[task] = written
        elif task == 'edit':
            out = generate.edit(gen, np.stack([d.segments[1] for d in docs]), [x['instruction'] for x in m],
                                sample=edit_sample, rng=rng)[:, 0]
            scenes = [(shapes.Scene.from_dict(x['scene']), shapes.Scene.from_dict(x['target'])) for x in m]
            verdicts = [judge.edit_verdict(im, *pair, world) for im, pair in zip(out, scenes)]
            metrics['edit'] = [v['success'] for v in verdicts]
            for part in ('kept', 'edited'):  # what went wrong: the copy of the rest, or the change
                metrics[f'edit/{part}'] = [v[part] for v in verdicts if v[part] is not None]
            kinds = [judge.edit_kind(*pair) for pair in scenes]
            for kind in sorted(set(kinds)):
                metrics[f'edit/{kind}'] = [v['success'] for v, k in zip(verdicts, kinds) if k == kind]
            outputs[task] = out
        elif task == 'structure':
            out = generate.structure(gen, np.stack([d.segments[1] for d in docs]), [x['caption'] for x in m],
                                     sample=draw, rng=rng)[:, 0]
            metrics['structure'] = [shapes_judge.score(im, x['caption'], world)['exact'] == 1.0
                                    for im, x in zip(out, m)]
            outputs[task] = out
        elif task == 'grounded':
            scenes = [shapes.Scene.from_dict(x['scene']) for x in m]
            out = generate.grounded(gen, [x['caption'] for x in m], [shapes.boxes(s) for s in scenes],
                                    sample=draw, rng=rng)[:, 0]
            metrics['grounded/box_accuracy'] = [h for im, s in zip(out, scenes) for h in judge.box_hits(im, s, world)]
            metrics['grounded/exact'] = [shapes_judge.score(im, x['caption'], world)['exact'] == 1.0
                                         for im, x in zip(out, m)]
            outputs[task] = out
        else:
            out = generate.write(gen, [x['text'] for x in m], sample=draw, rng=rng)[:, 0]
            metrics['write'] = [glyphs.legible(im, x['text'], tasks.write_config(world)) for im, x in zip(out, m)]
            outputs[task] = out
    return metrics, outputs


def table(results: dict) -> str:
    lines = ['| task | metric | before SFT | after SFT | change | n |', '|---|---|---:|---:|---:|---:|']
    for key, r in results.items():
        task, _, metric = key.partition('/')
        se = lambda x: (x * (1 - x) / r['n']) ** 0.5  # noqa: E731
        lines.append(f'| {task} | {metric or "accuracy"} | {r["before"]:.3f} ± {se(r["before"]):.3f} | '
                     f'{r["after"]:.3f} ± {se(r["after"]):.3f} | {r["after"] - r["before"]:+.3f} | {r["n"]} |')
    return '\n'.join(lines)


JUDGED = {'edit': 'edit', 'structure': 'structure', 'grounded': 'grounded/exact', 'write': 'write'}
PROMPT = {'edit': 'instruction', 'structure': 'caption', 'grounded': 'caption', 'write': 'text'}


def picture(before: dict, after: dict, right: dict, config, path: pathlib.Path, shown: int = 6) -> None:
    """Per image task a row of examples: the input (edit, structure), then before and after SFT,
    the after framed green where the judge counts it right (``right[task]``, per item) and red
    where not, and the instruction, caption or string under them."""
    import textwrap
    from PIL import Image, ImageDraw
    scale, pad, line = 3, 4, 11
    tiles = []
    for task in IMAGE_TASKS:
        docs = items(config, task, shown)
        row = []
        for i, d in enumerate(docs):
            # a white tile where the task has no input image, so the columns line up
            given = d.segments[1] if task in ('edit', 'structure') else np.full_like(after[task][i], 255)
            row.append(([given, before[task][i], after[task][i]], bool(right[task][i]), d.meta[PROMPT[task]]))
        tiles.append((task, row))
    side = tiles[0][1][0][0][-1].shape[0] * scale
    group = 3 * side + 2 * pad
    height = side + 2 * pad + 2 * line + 6
    canvas = Image.new('RGB', (90 + shown * (group + 12), 20 + len(tiles) * height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((90, 4), 'each example: [input] | before SFT | after SFT (green: judged right, red: wrong)',
              fill=(0, 0, 0))
    for r, (task, row) in enumerate(tiles):
        y = 20 + r * height
        draw.text((4, y + side // 2 - 6), task, fill=(0, 0, 0))
        x = 90
        for images, ok, prompt in row:
            for k, im in enumerate(images):
                tile = Image.fromarray(np.asarray(im)).resize((side, side), Image.NEAREST)
                canvas.paste(tile, (x + k * (side + pad), y))
            last = x + 2 * (side + pad)
            draw.rectangle((last - 2, y - 2, last + side + 1, y + side + 1), outline=(0, 150, 0) if ok else (200, 0, 0),
                           width=2)
            for j, text in enumerate(textwrap.wrap(prompt, group // 6)[:2]):
                draw.text((x, y + side + 4 + j * line), text, fill=(0, 0, 0))
            x += group + 12
    canvas.save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import flax.linen as nn
    import jax
    from cm3jax import trainers
    from cm3jax.sample import load
    pretrained = pathlib.Path(args.pretrained)
    if not (pretrained / 'config.json').is_file():
        print(f'{pretrained} is not a trained LM: run `make demo` first (it writes out/quickstart/lm)', file=sys.stderr)
        return 2
    workdir, results = pathlib.Path(args.workdir), pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    config = sft_config(args)
    begin = time.perf_counter()
    summary = trainers.train(config, str(workdir / 'run'), init_from=str(pretrained))
    # SFT's seconds over every call that trained (a rerun of a finished run adds only its check)
    seconds = workdir / 'sft_seconds.json'
    trained = time.perf_counter() - begin + (json.loads(seconds.read_text())['seconds'] if seconds.exists() else 0.0)
    seconds.write_text(json.dumps({'seconds': round(trained, 1)}))
    if summary['step'] < config.train.steps:
        print(f'SFT stopped at step {summary["step"]}; run the same command again to continue', file=sys.stderr)
        return 1
    judged, outputs = {}, {}
    for name, where in (('before', pretrained), ('after', workdir / 'run')):
        gen, mesh, rules = load.load_generator(where)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            judged[name], outputs[name] = evaluate(gen, config, args, args.items, f'judge {name} SFT')
    out = {k: {'before': float(np.mean(judged['before'][k])), 'after': float(np.mean(judged['after'][k])),
               'n': len(judged['after'][k])} for k in judged['after']}
    record = {'command': 'python ' + ' '.join(['experiments/sft_shapes.py', *(argv if argv is not None else
                                                                             sys.argv[1:])]),
              'sft_steps': int(summary['step']), 'sft_seconds': round(trained, 1),
              'loss': config.data.loss, 'learning_rate': config.optim.learning_rate,
              'grow_layers': config.grow_layers,
              'sampling': {'temperature': args.temperature, 'top_p': args.top_p, 'edit_cfg': args.edit_cfg,
                           'edit_image_cfg': args.edit_image_cfg},
              'final_train_loss': summary.get('loss'), 'eval_loss': summary.get('eval/loss'),
              'answers_after': outputs['after']['vqa'][:8], 'captions_after': outputs['after']['caption'][:8]}
    (results / 'sft_shapes.json').write_text(json.dumps(out, indent=1))
    (results / 'sft_shapes_run.json').write_text(json.dumps(record, indent=1))
    grown = f', {config.grow_layers} new blocks' if config.grow_layers else ''
    text = (f'# SFT on the Shapes task mixture: before and after\n\n`{record["command"]}`\n\n'
            f'{summary["step"]} steps of configs/sft.py:shapes (loss {config.data.loss}, lr '
            f'{config.optim.learning_rate:g}{grown}) in {trained / 60:.1f} min; {args.items} held-out examples per task '
            f'(± is the standard error).\n\n{table(out)}\n')
    (results / 'sft_shapes.md').write_text(text)
    picture(outputs['before'], outputs['after'], {t: judged['after'][k] for t, k in JUDGED.items()}, config,
            results / 'sft_shapes.png')
    print(text)
    print(f'wrote {results}/sft_shapes.md, .json, .png and _run.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
