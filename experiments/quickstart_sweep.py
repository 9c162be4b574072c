"""Which sampling setting draws best? The quickstart's own model, swept over classifier-free
guidance, temperature and decoding mode (docs/quickstart.md, "Sampling sweep"):

    python experiments/quickstart_sweep.py --out=out/quickstart

``--out`` is a finished `cm3jax quickstart` directory (its LM, retriever and world). For every
CFG scale x temperature x mode, ``--num`` images are drawn for each of ``--prompts`` held-out
captions of 1-2 objects (the report's headline set); the Shapes judge scores the first sample
(single) and the one CLIP ranks best (re-ranked). The top-p, CD-K k and alpha are the
quickstart config's. Writes ``quickstart_sweep.md`` (the table), ``.json`` and ``.png`` (two
heat maps) into ``--results`` (experiments/results). Settings already measured (in the JSON, for
the same directory and the same trained LM) are skipped, so an interrupted sweep continues where
it was.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time

import numpy as np

MODES = ('sample', 'cdk', 'mixed')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='out/quickstart', help='a finished `cm3jax quickstart` directory')
    p.add_argument('--results', default='experiments/results', help='where the table, JSON and plot go')
    p.add_argument('--prompts', type=int, default=128, help='held-out captions per setting')
    p.add_argument('--num', type=int, default=8, help='samples per caption (re-ranked by CLIP score)')
    p.add_argument('--cfg', default='1,1.5,2,3', help='CFG scales, comma-separated')
    p.add_argument('--temperatures', default='0.5,1.0', help='temperatures, comma-separated')
    p.add_argument('--modes', default=','.join(MODES), help=f'decoding modes from {MODES}')
    args = p.parse_args(argv)
    args.cfg = [float(x) for x in args.cfg.split(',')]
    args.temperatures = [float(x) for x in args.temperatures.split(',')]
    args.modes = args.modes.split(',')
    if set(args.modes) - set(MODES):
        p.error(f'--modes={",".join(args.modes)}: choose from {",".join(MODES)}')
    if args.prompts < 1 or args.num < 1:
        p.error('--prompts and --num must be at least 1')
    return args


def key(cfg: float, temperature: float, mode: str) -> str:
    return f'cfg={cfg:g} T={temperature:g} {mode}'


def measure(args, config, out: pathlib.Path, todo: list[tuple[float, float, str]], done: dict, save) -> None:
    import dataclasses
    import flax.linen as nn
    import jax
    from cm3jax import quickstart
    from cm3jax.eval.stats import rate
    from cm3jax.retrieval import load as retrieval_load
    from cm3jax.sample import load
    gen, mesh, rules = load.load_generator(out / 'lm')
    retriever = retrieval_load.load_retriever(out / 'retriever')
    world, split = quickstart.prompt_sets(config)['main']
    captions = [d.texts[0] for d in quickstart.scenes(config, world, split, args.prompts)]
    base = quickstart.sample_config(config)
    for number, (cfg, temperature, mode) in enumerate(todo):
        begin = time.perf_counter()
        sample = dataclasses.replace(base, cfg_scale=cfg, temperature=temperature, mode=mode)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            images, _ = quickstart.draw(gen, captions, args.num, sample, config.seed, key(cfg, temperature, mode))
        best = quickstart.clip_scores(retriever, images, captions).argmax(1)
        exact = quickstart.judge_drawn(images, captions, quickstart.world(config))['exact']
        done[key(cfg, temperature, mode)] = {
            'cfg': cfg, 'temperature': temperature, 'mode': mode,
            'single': rate(exact[:, 0]),
            'reranked': rate(exact[np.arange(len(exact)), best]),
            'any': rate(exact.max(1)),
            'seconds': time.perf_counter() - begin}
        save()
        r = done[key(cfg, temperature, mode)]
        print(f'[{number + 1}/{len(todo)}] {key(cfg, temperature, mode)}: single {r["single"]["value"]:.3f}, '
              f're-ranked {r["reranked"]["value"]:.3f} ({r["seconds"]:.0f} s)', flush=True)


def table(results: dict, args) -> str:
    rows = ['| CFG | temperature | mode | single sample | best of {} by CLIP | any of {} |'.format(args.num, args.num),
            '|---|---|---|---|---|---|']
    settings = sorted(results['settings'].values(), key=lambda r: (r['mode'], r['temperature'], r['cfg']))
    best_single = max(settings, key=lambda r: r['single']['value'])
    best_rr = max(settings, key=lambda r: r['reranked']['value'])
    fmt = lambda r: f'{r["value"]:.3f} ± {r["se"]:.3f}'
    for r in settings:
        single = fmt(r['single']) + (' **(best)**' if r is best_single else '')
        reranked = fmt(r['reranked']) + (' **(best)**' if r is best_rr else '')
        rows.append(f'| {r["cfg"]:g} | {r["temperature"]:g} | {r["mode"]} | {single} | {reranked} | {fmt(r["any"])} |')
    head = (f'Text-to-image exact match by the Shapes judge on {results["prompts"]} held-out captions of 1-2 objects, '
            f'{args.num} samples each (top-p {results["top_p"]}, CD-K k={results["cdk_k"]}, '
            f'alpha={results["cdk_alpha"]}); ± is the standard error.')
    return head + '\n\n' + '\n'.join(rows)


def plot(results: dict, args, path: pathlib.Path) -> None:
    """Two heat maps (single sample, re-ranked): a row per (mode, temperature), a column per CFG scale."""
    from PIL import Image, ImageDraw
    rows = [(m, t) for m in args.modes for t in args.temperatures]
    cell, left, top = 64, 130, 40
    panel = left + cell * len(args.cfg) + 20
    img = Image.new('RGB', (2 * panel, top + cell * len(rows) + 30), 'white')
    draw = ImageDraw.Draw(img)
    for p, (metric, title) in enumerate((('single', 'single sample'), ('reranked', f'best of {args.num} by CLIP'))):
        x0 = p * panel
        draw.text((x0 + left, 6), f'exact match, {title}', fill='black')
        for j, cfg in enumerate(args.cfg):
            draw.text((x0 + left + j * cell + 14, top - 16), f'CFG {cfg:g}', fill='black')
        for i, (mode, t) in enumerate(rows):
            y = top + i * cell
            draw.text((x0 + 8, y + cell // 2 - 6), f'{mode}, T={t:g}', fill='black')
            for j, cfg in enumerate(args.cfg):
                r = results['settings'].get(key(cfg, t, mode))
                v = r[metric]['value'] if r else float('nan')
                shade = (235, 235, 235) if np.isnan(v) else (int(255 * (1 - v)), int(90 + 140 * v), 60)
                x = x0 + left + j * cell
                draw.rectangle([x, y, x + cell - 3, y + cell - 3], fill=shade)
                draw.text((x + 14, y + cell // 2 - 6), '-' if np.isnan(v) else f'{v:.2f}', fill='black')
    img.save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = pathlib.Path(args.out).absolute()
    if not (out / 'lm' / 'config.json').exists() or not (out / 'retriever').exists():
        sys.exit(f'--out={out} is not a finished quickstart directory (no lm/ and retriever/): run '
                 f'`cm3jax quickstart --config.out={args.out}` first')
    from ml_collections import ConfigDict
    config = ConfigDict(json.loads((out / 'config.json').read_text()))
    results_dir = pathlib.Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / 'quickstart_sweep.json'
    results = json.loads(path.read_text()) if path.exists() else {}
    # the LM stage's losses (stages.json) tell a retrained model in the same directory
    stages = json.loads((out / 'stages.json').read_text()) if (out / 'stages.json').exists() else {}
    trained = stages.get('lm', {}).get('result', {})
    lm = {k: trained[k] for k in ('step', 'loss', 'eval/loss') if k in trained}
    if (results.get('out'), results.get('prompts'), results.get('num'), results.get('lm')) != (
            str(out), args.prompts, args.num, lm):
        results = {'out': str(out), 'prompts': args.prompts, 'num': args.num, 'lm': lm, 'settings': {}}
    given = sys.argv[1:] if argv is None else argv
    results.update(top_p=config.sample.top_p, cdk_k=config.sample.cdk_k, cdk_alpha=config.sample.cdk_alpha,
                   command=' '.join(['python experiments/quickstart_sweep.py', *given]))
    todo = [s for s in itertools.product(args.cfg, args.temperatures, args.modes) if key(*s) not in results['settings']]
    save = lambda: path.write_text(json.dumps(results, indent=1))
    if todo:
        measure(args, config, out, todo, results['settings'], save)
    save()
    md = table(results, args)
    (results_dir / 'quickstart_sweep.md').write_text(md + '\n')
    plot(results, args, results_dir / 'quickstart_sweep.png')
    print(md)
    print(f'wrote {results_dir}/quickstart_sweep.md, .json and .png')
    return results


if __name__ == '__main__':
    main()
