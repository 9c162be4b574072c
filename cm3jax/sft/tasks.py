"""Instruction-tuning tasks: generators of examples of each `cm3jax.data.instructions`
template from the Shapes world (docs/sft.md).

An example is a `Document` whose segments follow its task's template; ``meta['header']`` (kept
by `prepare` in the record) says which segments are the output and which are conditions that
guidance may drop. The output is the last segment, except VQA's answer, which comes before the
image it is about: training (`cm3jax.sft.data`) and `generate.answer` put it in CM3's infill
form, the answer as the masked span after the image. ``meta`` also holds what a judge needs (the
scenes, the answer, the text drawn).
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np

from cm3jax.data import instructions as ins
from cm3jax.data.documents import HEADER, Document
from cm3jax.data.worlds import glyphs, shapes

QUESTION_KINDS = ('count', 'colour', 'shape', 'size', 'exists', 'relation')


def question_kind(q: str) -> str:
    """The kind (`QUESTION_KINDS`) of a `shapes.question` question."""
    for prefix, kind in (('how many', 'count'), ('what colour', 'colour'), ('what shape', 'shape'),
                         ('what size', 'size'), ('is there', 'exists'), ('is the', 'relation')):
        if q.startswith(prefix):
            return kind
    raise ValueError(f'not a Shapes question: {q!r}')


# ---- generators: (world, rng) -> (template, meta) ----

def _edit(cfg: shapes.ShapesConfig, rng: np.random.Generator, split: str):
    scene = shapes.sample_scene(cfg, rng, split)
    instruction, after = shapes.edit(scene, rng, cfg)
    return (ins.edit(shapes.render(scene), instruction, shapes.render(after)),
            {'scene': scene.to_dict(), 'target': after.to_dict(), 'instruction': instruction})


def _structure(cfg, rng, split):
    scene = shapes.sample_scene(cfg, rng, split)
    image = shapes.render(scene)
    text = shapes.caption(scene, rng, cfg.size_in_caption)
    return ins.structure(shapes.edge_map(image), text, image), {'scene': scene.to_dict(), 'caption': text}


def _grounded(cfg, rng, split):
    scene = shapes.sample_scene(cfg, rng, split)
    text = shapes.caption(scene, rng, cfg.size_in_caption)
    return ins.grounded(text, shapes.boxes(scene), shapes.render(scene)), {'scene': scene.to_dict(), 'caption': text}


def write_config(cfg: shapes.ShapesConfig) -> glyphs.WriteConfig:
    """The how-to-write task's font on ``cfg``'s canvas: glyphs of 2x2-pixel dots where it has
    room, each inside one patch of a 4x4-patch tokenizer (the line aligned to the patch grid)."""
    big = cfg.canvas >= 32
    return glyphs.WriteConfig(canvas=cfg.canvas, scale=2 if big else 1, align=4 if big else 1)


def held_out_text(text: str) -> bool:
    """Whether a string is kept for evaluation: one in 8, by a hash of its characters, so a
    judged string is never drawn whole in training."""
    return zlib.crc32(text.encode()) % 8 == 0


def _write(cfg, rng, split):
    wc = write_config(cfg)
    for _ in range(1000):
        text, colour = glyphs.sample_text(rng, wc)
        if held_out_text(text) == (split != 'train'):
            break
    return ins.write(text, glyphs.render_text(text, colour, wc)), {'text': text, 'colour': colour}


def _vqa(cfg, rng, split):
    scene = shapes.sample_scene(cfg, rng, split)
    q, a = shapes.question(scene, rng, cfg)
    return ins.vqa(shapes.render(scene), q, a), {'scene': scene.to_dict(), 'question': q, 'answer': a,
                                             'kind': question_kind(q)}


def _caption(cfg, rng, split):
    scene = shapes.sample_scene(cfg, rng, split)
    text = shapes.caption(scene, rng, cfg.size_in_caption)
    return ins.caption(shapes.render(scene), text), {'scene': scene.to_dict(), 'caption': text}


GENERATORS: dict[str, Callable] = {'edit': _edit, 'structure': _structure, 'grounded': _grounded,
                                   'write': _write, 'vqa': _vqa, 'caption': _caption}
TASKS = tuple(GENERATORS)


def check_task(name: str) -> str:
    if name not in GENERATORS:
        raise ValueError(f'unknown SFT task {name!r}; choose from {", ".join(TASKS)}')
    return name


def example(task: str, cfg: shapes.ShapesConfig, seed: int, index: int, split: str = 'train') -> Document:
    """Example ``index`` of ``task`` on ``split``'s scenes: a pure function of its arguments (each
    task has its own stream, apart from the pretraining documents')."""
    rng = np.random.default_rng([seed, index, shapes.SPLITS.index(split), 1000 + TASKS.index(check_task(task))])
    tpl, meta = GENERATORS[task](cfg, rng, split)
    return Document(list(tpl.segments), id=f'sft/{task}/{split}/{seed}/{index}',
                    meta={HEADER: tpl.header(task), **meta})


class TaskSource:
    """``count`` examples of one task, as a sized source of Documents (`cm3jax prepare` reads it)."""

    def __init__(self, task: str, cfg: shapes.ShapesConfig, seed: int, count: int, split: str = 'train'):
        self.task, self.cfg, self.seed, self.count, self.split = check_task(task), cfg, seed, count, split

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return (example(self.task, self.cfg, self.seed, i, self.split) for i in range(self.count))
