"""What `cm3jax sample` writes for images it is given: captions (``--image``), and on an
instruction-tuned model (docs/sft.md) edits (``--edit`` with ``--image``), answers
(``--question`` with ``--image``) and structure-guided drawings (``--edge`` with ``--prompt``);
each writes its output and a JSON record of what was asked."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def _pair(what: str, n: int, other: str, m: int) -> None:
    if n != m:
        raise ValueError(f'{what} needs one {other} each: got {n} and {m} (repeat the flags in order)')


def _save_rows(rows: np.ndarray, path: pathlib.Path) -> None:
    """uint8 [N, num, R, R, C] -> one PNG, a row per input."""
    from PIL import Image
    Image.fromarray(np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)).save(path)


def captions(gen, images: list, image_paths: list[str], *, judge: bool, repetition_penalty: float,
             where: pathlib.Path) -> None:
    """Greedy captions of ``images`` -> captions.json (and the Shapes judge's verdicts with ``judge``)."""
    from cm3jax.sample import decode, generate
    greedy = decode.SampleConfig(temperature=0.0, repetition_penalty=repetition_penalty)
    written = generate.image_to_text(gen, np.stack(images), form='continue', sample=greedy)
    record = [{'image': path, 'caption': text} for path, text in zip(image_paths, written)]
    if judge:
        from cm3jax.data.worlds import shapes_judge
        for r, image in zip(record, images):
            r['judge_exact'] = shapes_judge.score(image, r['caption'])['exact']
    for r in record:
        print(f'{r["image"]}: {r["caption"]}' + (f'  (judge exact: {r["judge_exact"]:.0f})' if judge else ''))
    where.mkdir(parents=True, exist_ok=True)
    (where / 'captions.json').write_text(json.dumps(record, indent=1))
    print(f'captions of {len(record)} image(s) in {where}/captions.json')


def instructions(gen, *, images: list, image_paths: list[str], edits: list[str], question: str | None, edges: list,
        prompts: list[str], sample, edit_sample, num: int, seed: int, where: pathlib.Path) -> None:
    import jax
    from cm3jax.sample import generate
    if question is not None and not images:
        raise ValueError('--question asks about an --image: give one or more --image=PNG')
    if prompts and not edges:
        raise ValueError('--prompt on an instruction run is the caption of an --edge=PNG map: give one --edge per '
                         '--prompt (or sample without --edit/--question to draw from captions)')
    where.mkdir(parents=True, exist_ok=True)
    rng = jax.random.key(seed)
    if edits:
        _pair('--edit', len(edits), '--image', len(images))
        out = generate.edit(gen, np.stack(images), edits, num=num, sample=edit_sample, rng=rng)
        _save_rows(np.concatenate([np.stack(images)[:, None], out], axis=1), where / 'edits.png')
        (where / 'edits.json').write_text(json.dumps([{'image': p, 'edit': e} for p, e in zip(image_paths, edits)],
                                                     indent=1))
        print(f'{len(edits)} edit(s) x {num}: {where}/edits.png (a row per image: the original, then the edits)')
    if question is not None and images:
        answers = generate.answer(gen, np.stack(images), [question] * len(images))
        record = [{'image': p, 'question': question, 'answer': a} for p, a in zip(image_paths, answers)]
        for r in record:
            print(f'{r["image"]}: {question} -> {r["answer"]}')
        (where / 'answers.json').write_text(json.dumps(record, indent=1))
        print(f'answers in {where}/answers.json')
    if edges:
        _pair('--edge', len(edges), '--prompt', len(prompts))
        out = generate.structure(gen, np.stack(edges), prompts, num=num, sample=sample, rng=rng)
        _save_rows(np.concatenate([np.stack(edges)[:, None], out], axis=1), where / 'structure.png')
        (where / 'structure.json').write_text(json.dumps({'captions': prompts, 'sample': vars(sample)}, indent=1))
        print(f'{len(edges)} edge map(s) x {num}: {where}/structure.png (a row per edge map: it, then the images)')
