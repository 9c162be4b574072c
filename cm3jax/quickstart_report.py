"""What `cm3jax quickstart` leaves for people to look at: samples.png (a row per caption, the
re-ranked best framed), captions.md (held-out images with written and true captions),
report.md and report.json, and the same numbers in TensorBoard."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw

SCALE = 3          # pixels per image pixel in the grids: 32 px scenes are too small to look at
GAP = 4
BEST = (255, 200, 0)
RIGHT, WRONG = (40, 200, 60), (220, 50, 50)
# shapes_judge.failures' kinds, as report.md names them
WRONG_KINDS = {'count': 'not two objects', 'object': 'a stated object wrong (colour, shape or size)',
               'borrowed_shape': 'a stated object drawn with the other one\'s shape',
               'relation': 'a stated relation broken'}


def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    return int(draw.textlength(text))


def sample_grid(images: np.ndarray, captions, exact: np.ndarray, best: np.ndarray) -> Image.Image:
    """images UInt8[P, N, R, R, 3] -> one picture: a row per caption (the caption on the left), the
    N samples framed in yellow where CLIP re-ranking picked it, a green or red bar under each for
    the judge's verdict."""
    p, n, r = images.shape[0], images.shape[1], images.shape[2] * SCALE
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    label = max(_text_width(probe, str(c)) for c in captions) + 2 * GAP
    cell = r + 2 * GAP
    canvas = Image.new('RGB', (label + n * cell + GAP, p * (cell + 6) + 22), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 4), 'caption', fill=(0, 0, 0))
    draw.text((label, 4), f'{n} samples (yellow: best by CLIP score; bar: judge exact in green, wrong in red)',
              fill=(0, 0, 0))
    for i in range(p):
        y = 22 + i * (cell + 6)
        draw.text((GAP, y + r // 2 - 5), str(captions[i]), fill=(0, 0, 0))
        for j in range(n):
            x = label + j * cell
            if j == best[i]:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=BEST)
            tile = Image.fromarray(images[i, j]).resize((r, r), Image.NEAREST)
            canvas.paste(tile, (x + GAP, y + GAP))
            draw.rectangle([x + GAP, y + cell, x + GAP + r - 1, y + cell + 3], fill=RIGHT if exact[i, j] else WRONG)
    return canvas


def captions_page(out: pathlib.Path, written: list[dict], exact, docs, shown: int = 24) -> str:
    """captions.md: the first ``shown`` held-out images (saved in captions/) with the written and
    the true caption, and whether the judge finds the written one exact."""
    folder = out / 'captions'
    folder.mkdir(exist_ok=True)
    rows = ['| image | written by the model | true caption | judge |', '|---|---|---|---|']
    for i, (w, ok, doc) in enumerate(zip(written[:shown], exact, docs)):
        Image.fromarray(doc.images[0]).resize((doc.images[0].shape[1] * SCALE,) * 2, Image.NEAREST) \
            .save(folder / f'{i:03d}.png')
        rows.append(f'| ![](captions/{i:03d}.png) | {w["generated"]} | {w["true"]} | {"exact" if ok else "wrong"} |')
    n, hits = len(exact), int(np.sum(exact))
    return (f'# Captions of held-out scenes\n\n{hits} of {n} written captions describe their image exactly '
            f'({hits / max(n, 1):.1%}; the judge reads the image, so any template that states every object '
            f'right counts). The first {min(shown, n)}:\n\n' + '\n'.join(rows) + '\n')


def write(out: pathlib.Path, report: dict, arrays, exact: np.ndarray, best: np.ndarray, written: list[dict],
          caption_exact, docs) -> None:
    """samples.png and captions.md (report.md and report.json come with `finish`)."""
    rows = min(8, len(exact))
    grid = sample_grid(arrays['main/images'][:rows], arrays['main/captions'][:rows], exact[:rows], best[:rows])
    grid.save(out / 'samples.png')
    (out / 'captions.md').write_text(captions_page(out, written, caption_exact, docs))


def _pct(rate: dict) -> str:
    return f'{rate["value"]:.3f} ± {rate["se"]:.3f} (n={rate["n"]})'


def _lm_rows(report: dict) -> list[str]:
    lm = report['lm']
    names = {'eval/loss': 'LM held-out loss (nats per token)',
             'image_nll_conditional': 'LM held-out image NLL after the caption (nats per image token)',
             'image_nll_unconditional': 'LM held-out image NLL after `<mask>`, the unconditional stream',
             'binding_gap_nats': 'LM image NLL after the shape-swapped caption, minus after the true one (nats per image)'}
    rows = [f'| {text} | {lm[k]:.3f} |' for k, text in names.items() if k in lm]
    swap = 'its caption to the same caption with the two shapes swapped (binding; 0.5 = none)'
    if 'binding' in lm:
        rows.append(f'| LM prefers {swap} | {_pct(lm["binding"])} |')
    if 'binding' in report.get('retriever', {}):
        rows.append(f'| CLIP prefers {swap} | {_pct(report["retriever"]["binding"])} |')
    return rows


def markdown(report: dict) -> str:
    t, c = report['text_to_image'], report['image_to_text']
    s = report['sample']
    lines = [
        '# cm3jax quickstart report', '',
        'The Shapes judge reads every picture back into objects and checks each caption against it: '
        '"exact" means every stated shape, colour, size and relation is right and nothing else is there. '
        'Values are proportions ± their standard error.', '',
        '| measure | value |', '|---|---|',
        f'| text-to-image, exact (one sample, unseen scenes of 1-2 objects) | {_pct(t["exact"])} |',
        f'| text-to-image, exact, best of {t["num"]} by CLIP score | {_pct(t["exact_reranked"])} |',
        *([f'| text-to-image, exact, best of {t["num"]} by the LM\'s likelihood of the caption after the image '
           f'| {_pct(t["exact_reranked_lm"])} |'] if 'exact_reranked_lm' in t else []),
        f'| text-to-image, exact, any of {t["num"]} (the re-ranker\'s ceiling) | {_pct(t["exact_any_of_num"])} |',
        f'| text-to-image, attributes right (one sample) | {_pct(t["attr"])} |',
        *[f'| text-to-image, exact, scenes of {k} object{"s" if k != "1" else ""} | {_pct(v)} |'
          for k, v in t['by_objects'].items()],
        *[f'| text-to-image, scenes of 2 objects: {WRONG_KINDS[k]} | {_pct(v)} |'
          for k, v in t.get('two_objects_wrong', {}).items()],
        f'| text-to-image, exact, (shape, colour) pairs never seen in training | {_pct(t["held_out_pairs"])} |',
        f'| image-to-text, exact (greedy, unseen scenes of 1-2 objects) | {_pct(c["exact"])} |',
        f'| tokenizer round trip, exact (the ceiling of any LM) | {_pct(report["tokenizer"]["judge_roundtrip"])} |',
        *_lm_rows(report),
        '',
        f'Sampling: CFG {s["cfg_scale"]}, temperature {s["temperature"]}, top-p {s["top_p"]}, mode {s["mode"]} '
        f'(CD-K k={s["cdk_k"]}, alpha={s["cdk_alpha"]}), {s["num"]} samples per caption.', '',
        '| stage | seconds |', '|---|---|',
        *[f'| {name} | {v["seconds"]:.0f} |' for name, v in report['stages'].items()],
        f'| all stages | {report["wall_seconds"]:.0f} |', '',
    ]
    return '\n'.join(lines)


def finish(out: pathlib.Path, report: dict) -> None:
    """report.json, report.md, TensorBoard scalars and the sample grid; then say where they are."""
    (out / 'report.json').write_text(json.dumps(report, indent=1))
    (out / 'report.md').write_text(markdown(report))
    from cm3jax.train.metrics import MetricWriter
    writer = MetricWriter(out)
    t = report['text_to_image']
    writer.write(0, {'quickstart/text_to_image_exact': t['exact']['value'],
                     'quickstart/text_to_image_exact_reranked': t['exact_reranked']['value'],
                     **({'quickstart/text_to_image_exact_reranked_lm': t['exact_reranked_lm']['value']}
                        if 'exact_reranked_lm' in t else {}),
                     'quickstart/image_to_text_exact': report['image_to_text']['exact']['value'],
                     'quickstart/tokenizer_roundtrip': report['tokenizer']['judge_roundtrip']['value']})
    writer.write_image(0, 'quickstart/samples', np.asarray(Image.open(out / 'samples.png').convert('RGB')))
    writer.close()
    print(markdown(report))
    print(f'wrote {out}/samples.png (a row per caption), captions.md, report.md, report.json; '
          f'tensorboard --logdir {out}')
