"""Instruction templates: CM3leon's (docs/sft.md; the paper's section 6), the one place each
instruction task's text is written. `cm3jax.sft.tasks` fills them with Shapes examples to train
on, and `cm3jax.sample.generate` with a user's inputs to generate from.

  edit       Edit first image following the instruction <break> {image1} <break> {instruction} <break> {image2}
  structure  Make high quality image from canny edge features <break> {edge image} <break> {caption} <break> {image}
  grounded   Generate high quality image of {caption} with segmentations {obj1} at {loc1}, ... <break> {image}
  write      draw "{text}" <break> {image}
  vqa        Question: {q} Answer: {a}. <break> {image}
  caption    {image} <break> {caption}                    (pretraining's image-to-text layout)

Segments are text (str) or images (uint8 [S, S, 3]; None where generation is to fill it in),
laid out with ``<break>`` around images as every document is (`documents.join`). A location is
a box in pixels, ``(x0, y0, x1, y1)`` with x1 and y1 exclusive.
"""

from __future__ import annotations

import dataclasses

EDIT = 'Edit first image following the instruction'
STRUCTURE = 'Make high quality image from canny edge features'


@dataclasses.dataclass(frozen=True)
class Template:
    """An example's parts: segments (str or uint8 [S, S, 3]), which are the output, and which are
    conditions (the unconditional streams of guidance replace them with ``<mask>``)."""
    segments: tuple
    output: tuple[bool, ...]
    condition: tuple[int, ...] = ()

    def header(self, task: str) -> dict:
        return {'task': task, 'output': [bool(o) for o in self.output], 'condition': list(self.condition)}


def edit(image1, instruction: str, image2=None) -> Template:
    return Template((EDIT, image1, instruction, image2), (False, False, False, True), (1, 2))


def structure(edges, caption: str, image=None) -> Template:
    return Template((STRUCTURE, edges, caption, image), (False, False, False, True), (1, 2))


def location(box) -> str:
    return '({}, {}, {}, {})'.format(*(int(v) for v in box))


def grounded(caption: str, objects: list[tuple[str, tuple[int, int, int, int]]], image=None) -> Template:
    """objects: [(description, box)], e.g. [('small red circle', (3, 4, 10, 11))]."""
    where = ', '.join(f'{name} at {location(box)}' for name, box in objects)
    return Template((f'Generate high quality image of {caption} with segmentations {where}', image), (False, True))


def write(text: str, image=None) -> Template:
    return Template((f'draw "{text}"', image), (False, True))


def vqa(image, question: str, answer: str = '') -> Template:
    return Template((f'Question: {question} Answer:', f' {answer}', '.', image), (False, True, False, False))


def caption(image, text: str = '') -> Template:
    return Template((image, text), (False, True))
