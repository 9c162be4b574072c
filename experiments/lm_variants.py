"""Which language model draws and captions best? LM variants trained on one finished quickstart's
stages (its BPE, image tokenizer, data, retriever and index), each judged as the quickstart
judges its own (docs/quickstart.md, "The LM settings"):

    python experiments/lm_variants.py --out=out/quickstart \\
        --variants='base=;canon=lm.model.canon=AC;canon_lr6=lm.model.canon=AC,lm.optim.learning_rate=6e-3'

``--out`` is a finished `cm3jax quickstart` directory. Each variant is a list of overrides of its
config (any field: ``lm.model.num_layers=3``, ``sample.cfg_scale=1.5``; ``base=`` is the
quickstart's own), run as `cm3jax quickstart` in ``--workdir/NAME`` with the first five stages
linked from ``--out``, so only the LM, the drawing, the captions and the judge run again. A
variant whose directory already holds a report is reused, and one stopped midway continues.
Reported per variant: the report's judged measures, the LM's binding probe (how often the true
caption of a two-object scene beats the one with the shapes swapped) and the LM's seconds.
Writes ``NAME.md`` (the table), ``.json`` and ``.png`` into ``--results``, ``NAME`` being
``--name`` (lm_variants).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from variants import apply_overrides, finish, parse_variants, start  # noqa: E402

LINKED = ('bpe', 'vq', 'data', 'eval', 'retriever')  # the stages' directories the variants share
SHARED = ('bpe', 'tokenizer', 'prepare', 'retriever', 'index')  # and their records in stages.json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='out/quickstart', help='a finished `cm3jax quickstart` directory')
    p.add_argument('--workdir', default='', help='where the variants run (default OUT/lm_variants)')
    p.add_argument('--variants', default='base=',
                   help="named variants of the quickstart config, ';'-separated: NAME=KEY=VALUE,KEY=VALUE")
    p.add_argument('--results', default='experiments/results', help='where the table, JSON and plot go')
    p.add_argument('--name', default='lm_variants', help='file name of the results (NAME.md, .json, .png)')
    args = p.parse_args(argv)
    try:
        args.variants = parse_variants(args.variants)
    except ValueError as e:
        p.error(f'--variants: {e}')
    return args


def prepare_variant(out: pathlib.Path, workdir: pathlib.Path) -> None:
    """``workdir`` with the finished first stages of ``out``: their directories linked, their
    records copied into a stages.json of its own (which then records the stages run here)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (workdir / name).exists():
            (workdir / name).symlink_to(out / name, target_is_directory=True)
    if not (workdir / 'stages.json').exists():
        done = json.loads((out / 'stages.json').read_text())
        (workdir / 'stages.json').write_text(json.dumps({k: done[k] for k in SHARED}, indent=1))


def measure(config, out: pathlib.Path, workdir: pathlib.Path, overrides: dict) -> dict:
    """Runs (or reuses) one variant and reads its report."""
    from cm3jax import quickstart
    config = config.copy_and_resolve_references()
    from configs import quickstart as qs_configs
    apply_overrides(config, overrides, 'quickstart config', known=qs_configs.get_config())
    config.out = str(workdir)
    if not (workdir / 'report.json').exists():
        prepare_variant(out, workdir)
        quickstart.run(config)
    report = json.loads((workdir / 'report.json').read_text())
    if 'binding' not in report['lm'] and config.world.max_objects >= 2:  # a run from before the probe existed
        report['lm'].update({k: v for k, v in quickstart.guidance_gap(config, workdir).items()
                             if k.startswith('binding')})
        (workdir / 'report.json').write_text(json.dumps(report, indent=1))
    t, lm = report['text_to_image'], report['lm']
    return {'overrides': overrides, 'single': t['exact'], 'reranked': t['exact_reranked'], 'any': t['exact_any_of_num'],
            'by_objects': t['by_objects'], 'borrowed_shape': t.get('two_objects_wrong', {}).get('borrowed_shape'),
            'held_out_pairs': t['held_out_pairs'], 'captions': report['image_to_text']['exact'],
            'binding': lm.get('binding'), 'binding_gap_nats': lm.get('binding_gap_nats'),
            'image_nll': lm.get('image_nll_conditional'), 'lm_seconds': report['stages']['lm']['seconds']}


def _describe(name: str, overrides: dict) -> str:
    return name + (' (' + ', '.join(f'`{k}={v}`' for k, v in overrides.items()) + ')' if overrides else '')


def table(results: dict) -> str:
    fmt = lambda r: f'{r["value"]:.3f} ± {r["se"]:.3f}' if r else '-'  # noqa: E731
    val = lambda r: f'{r["value"]:.3f}' if r else '-'  # noqa: E731
    rows = ['| LM | text-to-image | best of 8 by CLIP | any of 8 | 1 / 2 / 3 objects | 2 objects: borrowed shape | '
            'captions | binding (LM prefers the true caption) | binding gap (nats per image) | LM seconds |',
            '|---' * 10 + '|']
    for name, r in results['runs'].items():
        objects = ' / '.join(val(v) for v in r['by_objects'].values())
        gap = f'{r["binding_gap_nats"]:.2f}' if r.get('binding_gap_nats') is not None else '-'
        rows.append(f'| {_describe(name, r["overrides"])} | {fmt(r["single"])} | {fmt(r["reranked"])} | {val(r["any"])} '
                    f'| {objects} | {val(r["borrowed_shape"])} | {fmt(r["captions"])} | {val(r["binding"])} | {gap} '
                    f'| {r["lm_seconds"]:.0f} |')
    head = (f'LM variants on the stages of `{results["out"]}`, each judged as the quickstart judges its own: one '
            f'sample and the best of 8 by CLIP score for each of 256 unseen captions of 1-2 objects, greedy '
            f'captions of 256 unseen images; ± is the standard error. The binding probe scores 256 unseen '
            f'two-object scenes after their caption and after the same caption with the two shapes swapped '
            f'(0.5: colours and shapes read as a bag of words). LM seconds are the wall time of the LM stage: '
            f'only comparable between runs that had the machine to themselves and ran in one go.')
    return head + '\n\n' + '\n'.join(rows)


def plot(results: dict, path: pathlib.Path) -> None:
    """Per variant, bars of text-to-image, two-object scenes, captions and binding."""
    from PIL import Image, ImageDraw
    runs = list(results['runs'].items())
    series = (('text-to-image', (60, 160, 80), lambda r: r['single']['value']),
              ('2 objects', (200, 140, 40), lambda r: r['by_objects'].get('2', {}).get('value', 0.0)),
              ('captions', (60, 90, 200), lambda r: r['captions']['value']),
              ('binding', (150, 60, 160), lambda r: (r['binding'] or {}).get('value', 0.0)))
    group = 4 * 16 + 24
    w, h, left, bottom = max(560, 60 + group * len(runs)), 320, 50, 40
    img = Image.new('RGB', (w, h), 'white')
    draw = ImageDraw.Draw(img)
    y = lambda v: int(h - bottom - v * (h - bottom - 40))  # noqa: E731
    for v in (0.25, 0.5, 0.75, 1.0):
        draw.text((8, y(v) - 6), f'{v:.2f}', fill='black')
        draw.line([left, y(v), w - 10, y(v)], fill=(225, 225, 225))
    draw.line([left, y(0), w - 10, y(0)], fill='black')
    for i, (name, r) in enumerate(runs):
        x = left + 10 + i * group
        for k, (_, colour, get) in enumerate(series):
            draw.rectangle([x + 16 * k, y(get(r)), x + 16 * k + 12, y(0)], fill=colour)
        draw.text((x, h - bottom + 8), name[:14], fill='black')
    for k, (label, colour, _) in enumerate(series):
        draw.text((left + 110 * k, 6), label, fill=colour)
    draw.text((left, 20), 'exact match (one sample), captions exact, binding preference', fill='black')
    img.save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = pathlib.Path(args.out).absolute()
    done = json.loads((out / 'stages.json').read_text()) if (out / 'stages.json').exists() else {}
    if any(stage not in done for stage in SHARED) or not (out / 'config.json').exists():
        sys.exit(f'--out={out} is not a quickstart directory whose first stages ({", ".join(SHARED)}) are done: '
                 f'run `cm3jax quickstart --config.out={args.out}` first')
    from ml_collections import ConfigDict
    config = ConfigDict(json.loads((out / 'config.json').read_text()))
    workdir = pathlib.Path(args.workdir or out / 'lm_variants').absolute()
    results_dir, command = start(args, 'experiments/lm_variants.py', argv)
    results = {'command': command, 'out': args.out, 'runs': {}}
    for name, overrides in args.variants.items():
        r = results['runs'][name] = measure(config, out, workdir / name, overrides)
        print(f'{_describe(name, overrides)}: text-to-image {r["single"]["value"]:.3f}, captions '
              f'{r["captions"]["value"]:.3f} (LM {r["lm_seconds"]:.0f} s)', flush=True)
        (results_dir / f'{args.name}.json').write_text(json.dumps(results, indent=1))
    return finish(results, results_dir, args.name, table, plot)


if __name__ == '__main__':
    main()
