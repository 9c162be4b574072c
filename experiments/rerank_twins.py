"""Does CLIP re-ranking pick the right picture once the retriever has seen hard negatives?
Retrievers trained with a fraction of each batch being twins (`cm3jax.data.worlds.twins`: the
same scene with one stated thing changed), re-ranking the quickstart's own samples:

    python experiments/rerank_twins.py --out=out/quickstart --twins=0,0.25,0.5 --steps=450,1200
    python experiments/rerank_twins.py --out=out/quickstart --twins=0 --steps=450 --name=rerank_retrievers \
        --retrievers='base=;deep=model.vision_layers=4'

``--out`` is a finished `cm3jax quickstart` directory. For each number of steps and twin
fraction a retriever is trained with the quickstart's other retriever settings into
``OUT/rerank/steps_S_twins_F`` (resumable, and reused when finished), and re-ranks the ``num`` samples per caption that the quickstart drew
(``text_to_image.npz``, judged once). Reported per fraction: held-out recall@1, how often a
pair beats its twin (``twin_t2i``: the caption prefers its own image, which is what re-ranking
needs), the re-ranked exact match against the single sample and the any-of-``num`` ceiling, and
the training seconds. ``--retrievers`` adds an axis of named retriever variants, each a list of
overrides of the quickstart's ``retriever`` config (``name=model.vision_layers=4,optim.learning_rate=1e-3``;
``base=`` is the quickstart's own). Writes ``NAME.md`` (the table), ``.json`` and ``.png`` into
``--results`` (experiments/results), ``NAME`` being ``--name`` (rerank_twins).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from variants import apply_overrides, finish, parse_variants, start  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='out/quickstart', help='a finished `cm3jax quickstart` directory')
    p.add_argument('--results', default='experiments/results', help='where the table, JSON and plot go')
    p.add_argument('--twins', default='0,0.25,0.5', help='twin fractions of each batch, comma-separated')
    p.add_argument('--steps', default='450', help='retriever steps, comma-separated')
    p.add_argument('--retrievers', default='base=',
                   help="named variants of the retriever config, ';'-separated: NAME=KEY=VALUE,KEY=VALUE")
    p.add_argument('--name', default='rerank_twins', help='file name of the results (NAME.md, .json, .png)')
    args = p.parse_args(argv)
    args.twins = [float(x) for x in args.twins.split(',')]
    args.steps = [int(x) for x in args.steps.split(',')]
    if any(not 0 <= f <= 0.5 for f in args.twins):
        p.error(f'--twins: fractions must be in [0, 0.5], got {args.twins}')
    try:
        args.retrievers = parse_variants(args.retrievers)
    except ValueError as e:
        p.error(f'--retrievers: {e}')
    return args


def measure(config, out: pathlib.Path, steps: int, fraction: float, verdict: dict, arrays,
            variant: str = 'base', overrides: dict | None = None) -> dict:
    """Trains (or reuses) one retriever and re-ranks the drawn samples; `verdict` is
    `quickstart.judge_drawn` of them."""
    from cm3jax import quickstart
    from cm3jax.eval.stats import rate
    from cm3jax.retrieval import load as retrieval_load
    config = config.copy_and_resolve_references()
    config.retriever.data.twins = fraction
    config.retriever.train.steps = steps
    apply_overrides(config.retriever, overrides or {}, 'retriever config')
    # the quickstart's own retriever keeps the directory name it had before variants existed
    workdir = out / 'rerank' / (f'steps_{steps}_twins_{fraction:g}' + ('' if not overrides else f'_{variant}'))
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
    judged, wrong = verdict['exact'], failures(verdict)
    return {'variant': variant, 'overrides': overrides or {}, 'twins': fraction, 'steps': steps,
            'seconds': json.loads(timing.read_text()), 'auc': within_caption_auc(scores, judged),
            **{f'auc_vs_{kind}': within_caption_auc(scores, judged, mask) for kind, mask in wrong.items()},
            'recall_t2i_r1': last['eval/validation/t2i_r1'], 'twin_t2i': last['eval/validation/twin_t2i'],
            'twin_i2t': last['eval/validation/twin_i2t'],
            'reranked': rate(judged[np.arange(len(judged)), best])}


def _order(r: dict):
    return r['steps'], r['twins'], bool(r.get('overrides')), r.get('variant', 'base')


def _describe(r: dict) -> str:
    overrides = r.get('overrides') or {}
    return r.get('variant', 'base') + (' (' + ', '.join(f'`{k}={v}`' for k, v in overrides.items()) + ')'
                                       if overrides else '')


def failures(verdict: dict) -> dict[str, np.ndarray]:
    """Bool[P, N] masks of the wrong samples by what is wrong (a sample can be both): an object
    beyond the stated ones, or a stated object missing its colour, shape or size."""
    wrong = verdict['exact'] == 0
    return {'extra_object': wrong & (verdict['extra'] > 0), 'wrong_object': wrong & (verdict['attr'] < 1)}


def within_caption_auc(scores: np.ndarray, judged: np.ndarray, wrong: np.ndarray | None = None) -> float:
    """Float[P, N] scores and 0/1 judgements -> how often an exact sample outscores a wrong one of
    the same caption (ties half), averaged over the captions that have both: what re-ranking needs,
    with the single sample's rate taken out (0.5 is a coin). `wrong` (Bool[P, N]) limits the wrong
    samples to some kind (`failures`)."""
    exact = judged.astype(bool)
    wrong = ~exact if wrong is None else wrong & ~exact
    aucs = []
    for s, e, w in zip(scores, exact, wrong):
        right, bad = s[e], s[w]
        if len(right) and len(bad):
            aucs.append(np.mean(right[:, None] > bad[None]) + 0.5 * np.mean(right[:, None] == bad[None]))
    return float(np.mean(aucs)) if aucs else float('nan')


def table(results: dict) -> str:
    fmt = lambda r: f'{r["value"]:.3f} ± {r["se"]:.3f}'  # noqa: E731
    n = results['num']
    runs = sorted(results['runs'].values(), key=_order)
    # the retriever column appears once a run changes the quickstart's retriever
    named = any(r.get('overrides') for r in runs)
    first = '| retriever | ' if named else '| '
    rows = [f'{first}retriever steps | twins per batch | held-out recall@1 (t2i) | caption prefers its image to the '
            f'twin\'s | exact beats wrong, same caption | best of {n} by CLIP | retriever seconds |',
            '|---' * (7 + named) + '|']
    for r in runs:
        what = (f'| {_describe(r)} | ' if named else '| ')
        auc = f'{r["auc"]:.3f}' if 'auc' in r else '-'  # runs recorded before it was measured
        rows.append(f'{what}{r["steps"]} | {r["twins"]:g} | {r["recall_t2i_r1"]:.3f} | {r["twin_t2i"]:.3f} | '
                    f'{auc} | {fmt(r["reranked"])} | {r["seconds"]:.0f} |')
    head = (f'CLIP re-ranking of the quickstart\'s {n} samples for each of {results["prompts"]} held-out captions '
            f'of 1-2 objects (`{results["out"]}`): single sample {fmt(results["single"])}, any of {n} '
            f'{fmt(results["any"])} (the ceiling of any re-ranker). Each retriever has the quickstart\'s other '
            f'settings; ± is the standard error.')
    if 'wrong' in results:
        w = results['wrong']
        head += (f' Of the wrong samples, {w["wrong_object"]:.0%} draw a stated object with the wrong colour, shape or '
                 f'size, {w["extra_object"]:.0%} hold an object beyond the stated ones and {w["broken_relation"]:.0%} '
                 f'break a stated relation. "Exact beats wrong" is how often an exact sample outscores a wrong one of '
                 f'the same caption (0.5 is a coin).')
    return head + '\n\n' + '\n'.join(rows)


def plot(results: dict, path: pathlib.Path) -> None:
    """Re-ranked exact match per twin fraction, between the single sample and the ceiling."""
    from PIL import Image, ImageDraw
    runs = sorted(results['runs'].values(), key=_order)
    w, h, left, bottom, legend = max(540, 170 + 90 * len(runs)), 300, 50, 52, 120
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
        if r.get('overrides'):
            draw.text((x, h - bottom + 30), r['variant'], fill='black')
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
    verdict = quickstart.judge_drawn(arrays['main/images'], arrays['main/captions'], quickstart.world(config))
    judged = verdict['exact']
    wrong = judged == 0
    results_dir, command = start(args, 'experiments/rerank_twins.py', argv)
    results = {'command': command, 'out': args.out,
               'prompts': int(judged.shape[0]), 'num': int(judged.shape[1]),
               'single': rate(judged[:, 0]), 'any': rate(judged.max(1)),
               # what is wrong with the wrong samples, as fractions of them
               'wrong': {**{kind: float(mask.sum() / max(1, wrong.sum())) for kind, mask in failures(verdict).items()},
                         'broken_relation': float((wrong & (verdict['relation'] == 0)).sum() / max(1, wrong.sum()))},
               'runs': {}}
    for steps, fraction, (variant, overrides) in itertools.product(args.steps, args.twins, args.retrievers.items()):
        key = f'{steps}/{fraction:g}' + (f'/{variant}' if overrides else '')
        r = results['runs'][key] = measure(config, out, steps, fraction, verdict, arrays, variant, overrides)
        print(f'{_describe(r)}, {steps} steps, twins {fraction:g}: recall@1 {r["recall_t2i_r1"]:.3f}, beats its twin {r["twin_t2i"]:.3f}, '
              f're-ranked {r["reranked"]["value"]:.3f} ({r["seconds"]:.0f} s)', flush=True)
        (results_dir / f'{args.name}.json').write_text(json.dumps(results, indent=1))
    return finish(results, results_dir, args.name, table, plot)


if __name__ == '__main__':
    main()
