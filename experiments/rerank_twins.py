"""Does CLIP re-ranking pick the right picture once the retriever has seen hard negatives?
Retrievers trained with a fraction of each batch being twins (`cm3jax.data.worlds.twins`: the
same scene with one stated thing changed), re-ranking the quickstart's own samples:

    python experiments/rerank_twins.py --out=out/quickstart --twins=0,0.25,0.5 --steps=450,1200

``--out`` is a finished `cm3jax quickstart` directory. For each number of steps and twin
fraction a retriever is trained with the quickstart's other retriever settings into
``OUT/rerank/steps_S_twins_F`` (resumable, and reused when finished), and re-ranks the ``num`` samples per caption that the quickstart drew
(``text_to_image.npz``, judged once). Reported per fraction: held-out recall@1, how often a
pair beats its twin (``twin_t2i``: the caption prefers its own image, which is what re-ranking
needs), the re-ranked exact match against the single sample and the any-of-``num`` ceiling, and
the training seconds. Writes ``rerank_twins.md`` (the table), ``.json`` and ``.png`` into
``--results`` (experiments/results).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='out/quickstart', help='a finished `cm3jax quickstart` directory')
    p.add_argument('--results', default='experiments/results', help='where the table, JSON and plot go')
    p.add_argument('--twins', default='0,0.25,0.5', help='twin fractions of each batch, comma-separated')
    p.add_argument('--steps', default='450', help='retriever steps, comma-separated')
    args = p.parse_args(argv)
    args.twins = [float(x) for x in args.twins.split(',')]
    args.steps = [int(x) for x in args.steps.split(',')]
    if any(not 0 <= f <= 0.5 for f in args.twins):
        p.error(f'--twins: fractions must be in [0, 0.5], got {args.twins}')
    return args


def measure(config, out: pathlib.Path, steps: int, fraction: float, judged: np.ndarray, arrays) -> dict:
    from cm3jax import quickstart
    from cm3jax.eval.stats import rate
    from cm3jax.retrieval import load as retrieval_load
    config = config.copy_and_resolve_references()
    config.retriever.data.twins = fraction
    config.retriever.train.steps = steps
    workdir = out / 'rerank' / f'steps_{steps}_twins_{fraction:g}'
    timing = workdir / 'seconds.json'  # the training's own seconds, kept for a rerun that reuses it
    if not timing.exists():
        begin = time.perf_counter()
        quickstart.retriever(config, out, workdir)
        timing.write_text(json.dumps(time.perf_counter() - begin))
    rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    last = [r for r in rows if 'eval/validation/t2i_r1' in r][-1]
    if last['step'] != steps:
        sys.exit(f'{workdir} stopped at step {last["step"]} of {steps}: delete its seconds.json and run again')
    scores = quickstart.clip_scores(retrieval_load.load_retriever(workdir), arrays['main/images'],
                                    arrays['main/captions'])
    best = scores.argmax(1)
    return {'twins': fraction, 'steps': steps, 'seconds': json.loads(timing.read_text()),
            'recall_t2i_r1': last['eval/validation/t2i_r1'], 'twin_t2i': last['eval/validation/twin_t2i'],
            'twin_i2t': last['eval/validation/twin_i2t'],
            'reranked': rate(judged[np.arange(len(judged)), best])}


def table(results: dict) -> str:
    fmt = lambda r: f'{r["value"]:.3f} ± {r["se"]:.3f}'  # noqa: E731
    n = results['num']
    rows = [f'| retriever steps | twins per batch | held-out recall@1 (t2i) | caption prefers its image to the '
            f'twin\'s | best of {n} by CLIP | retriever seconds |', '|---|---|---|---|---|---|']
    for r in sorted(results['runs'].values(), key=lambda r: (r['steps'], r['twins'])):
        rows.append(f'| {r["steps"]} | {r["twins"]:g} | {r["recall_t2i_r1"]:.3f} | {r["twin_t2i"]:.3f} | '
                    f'{fmt(r["reranked"])} | {r["seconds"]:.0f} |')
    head = (f'CLIP re-ranking of the quickstart\'s {n} samples for each of {results["prompts"]} held-out captions '
            f'of 1-2 objects (`{results["out"]}`): single sample {fmt(results["single"])}, any of {n} '
            f'{fmt(results["any"])} (the ceiling of any re-ranker). Each retriever has the quickstart\'s other '
            f'settings; ± is the standard error.')
    return head + '\n\n' + '\n'.join(rows)


def plot(results: dict, path: pathlib.Path) -> None:
    """Re-ranked exact match per twin fraction, between the single sample and the ceiling."""
    from PIL import Image, ImageDraw
    runs = sorted(results['runs'].values(), key=lambda r: (r['steps'], r['twins']))
    w, h, left, bottom, legend = 540, 300, 50, 40, 120
    img = Image.new('RGB', (w, h), 'white')
    draw = ImageDraw.Draw(img)
    y = lambda v: int(h - bottom - v * (h - bottom - 30))  # noqa: E731
    draw.line([left, y(0), w - 10, y(0)], fill='black')
    for v in (0.25, 0.5, 0.75, 1.0):
        draw.text((8, y(v) - 6), f'{v:.2f}', fill='black')
        draw.line([left, y(v), w - 10, y(v)], fill=(225, 225, 225))
    for value, colour, label in ((results['single']['value'], (200, 60, 60), 'single sample'),
                                 (results['any']['value'], (60, 60, 200), f'any of {results["num"]}')):
        draw.line([left, y(value), w - 10, y(value)], fill=colour, width=2)
        draw.text((w - legend + 10, y(value) - 14), label, fill=colour)
    step = (w - left - legend - 10) // max(1, len(runs))
    for i, r in enumerate(runs):
        x = left + 10 + i * step
        v = r['reranked']['value']
        draw.rectangle([x, y(v), x + step // 2, y(0)], fill=(60, 160, 80))
        draw.text((x, y(v) - 14), f'{v:.3f}', fill='black')
        draw.text((x, h - bottom + 6), f'{r["steps"]} st.', fill='black')
        draw.text((x, h - bottom + 18), f'twins {r["twins"]:g}', fill='black')
    draw.text((left, 6), 'exact match, best of the samples by CLIP score', fill='black')
    img.save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = pathlib.Path(args.out).absolute()
    if not (out / 'text_to_image.npz').exists():
        sys.exit(f'--out={out} holds no text_to_image.npz: run `cm3jax quickstart --config.out={args.out}` first')
    from ml_collections import ConfigDict
    from cm3jax import quickstart
    from cm3jax.eval.stats import rate
    config = ConfigDict(json.loads((out / 'config.json').read_text()))
    arrays = dict(np.load(out / 'text_to_image.npz'))
    judged = quickstart.judge_drawn(arrays['main/images'], arrays['main/captions'], quickstart.world(config))['exact']
    results_dir = pathlib.Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    results = {'command': ' '.join(['python experiments/rerank_twins.py', *given]), 'out': args.out,
               'prompts': int(judged.shape[0]), 'num': int(judged.shape[1]),
               'single': rate(judged[:, 0]), 'any': rate(judged.max(1)), 'runs': {}}
    for steps, fraction in itertools.product(args.steps, args.twins):
        r = results['runs'][f'{steps}/{fraction:g}'] = measure(config, out, steps, fraction, judged, arrays)
        print(f'{steps} steps, twins {fraction:g}: recall@1 {r["recall_t2i_r1"]:.3f}, beats its twin {r["twin_t2i"]:.3f}, '
              f're-ranked {r["reranked"]["value"]:.3f} ({r["seconds"]:.0f} s)', flush=True)
        (results_dir / 'rerank_twins.json').write_text(json.dumps(results, indent=1))
    md = table(results)
    (results_dir / 'rerank_twins.md').write_text(md + '\n')
    plot(results, results_dir / 'rerank_twins.png')
    print(md)
    print(f'wrote {results_dir}/rerank_twins.md, .json and .png')
    return results


if __name__ == '__main__':
    main()
