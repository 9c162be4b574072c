"""Real instruction data: JSON lines of segment lists with image paths, the form LLaVA-style and
InstructPix2Pix-style sets convert to.

One example per line:

    {"task": "edit", "segments": [{"text": "Edit first image following the instruction"},
                                  {"image": "before/0001.png", "condition": true},
                                  {"text": "make the sky pink", "condition": true},
                                  {"image": "after/0001.png", "output": true}]}
    {"task": "vqa", "segments": [{"text": "Question: what is on the table? Answer:"},
                                 {"text": " a cup", "output": true}, {"text": "."}, {"image": "coco/12.jpg"}]}

``task`` is one of `tasks.TASKS` (the mixture weighs examples by it); segments are laid out
in order with ``<break>`` around images, as `tasks` does; ``output`` marks what the model learns
to produce (default: the last segment); ``condition`` marks what guidance may drop. Image paths
are relative to the file's folder. Images must already be the tokenizer's size: a silent resize
would teach captions of pictures the model never saw.

`read_row` raises `RowError`, naming the line and the field, on a bad row; `JsonlSource`
(what `cm3jax.sft.prepare` reads) skips such rows, counts them by reason and reports them.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from cm3jax.data import sources
from cm3jax.data.documents import HEADER, Document
from cm3jax.sft import tasks


class RowError(ValueError):
    """A row of an instruction file that cannot be used; ``reason`` groups the counts."""

    def __init__(self, where: str, field: str, problem: str, reason: str):
        super().__init__(f'{where}: {field}: {problem}')
        self.where, self.field, self.problem, self.reason = where, field, problem, reason


def read_row(line: str, where: str, folder: pathlib.Path, size: int | None = None) -> Document:
    """One JSON line -> a Document as `tasks` writes them (``meta['header']``: task, output and
    condition flags). ``where`` names the row in errors ('file.jsonl:7'); ``size``: the square
    side images must have (None: any)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(where, 'line', f'not JSON ({e.msg} at column {e.colno})', 'bad json') from None
    if not isinstance(row, dict):
        raise RowError(where, 'line', f'expected an object, got {type(row).__name__}', 'bad json')
    task = row.get('task')
    if task not in tasks.TASKS:
        raise RowError(where, 'task', f'unknown task {task!r}; choose from {", ".join(tasks.TASKS)}', 'unknown task')
    segs = row.get('segments')
    if not isinstance(segs, list) or not segs:
        raise RowError(where, 'segments', 'must be a non-empty list of {"text": ...} or {"image": ...}',
                       'bad segments')
    segments, output, condition = [], [], []
    for k, seg in enumerate(segs):
        field = f'segments[{k}]'
        if not isinstance(seg, dict) or len({'text', 'image'} & set(seg)) != 1:
            raise RowError(where, field, 'give exactly one of "text" or "image"', 'bad segments')
        if 'text' in seg:
            if not isinstance(seg['text'], str):
                raise RowError(where, f'{field}.text', 'must be a string', 'bad segments')
            segments.append(seg['text'])
        else:
            segments.append(_image(seg['image'], where, f'{field}.image', folder, size))
        for flag in ('output', 'condition'):
            if not isinstance(seg.get(flag, False), bool):
                raise RowError(where, f'{field}.{flag}', f'must be true or false, got {seg[flag]!r}', 'bad segments')
        if seg.get('output', False) and seg.get('condition', False):
            raise RowError(where, field, 'an output cannot also be a condition', 'bad segments')
        output.append(seg.get('output', False))
        if seg.get('condition', False):
            condition.append(k)
    if not any(output):
        output[-1] = True
    if all(output):
        raise RowError(where, 'segments', 'every segment is an output: leave a prompt', 'bad segments')
    header = {'task': task, 'output': output, 'condition': condition}
    return Document(segments, id=where, meta={HEADER: header})


def _image(path, where: str, field: str, folder: pathlib.Path, size: int | None) -> np.ndarray:
    if not isinstance(path, str) or not path:
        raise RowError(where, field, 'must be a path to an image file', 'bad segments')
    full = folder / path
    try:
        pixels = sources.decode_image(str(full), where)
    except sources.Skip as s:
        problem = f'{full}: {s.reason}' + (f' ({s.detail})' if s.detail else '')
        raise RowError(where, field, problem, s.reason) from None
    if size is not None and pixels.shape[:2] != (size, size):
        raise RowError(where, field, f'{full} is {pixels.shape[1]}x{pixels.shape[0]}, but the image tokenizer '
                       f'takes {size}x{size}: resize it first', 'wrong image size')
    return pixels


class JsonlSource(sources.Source):
    """The rows of one instruction file, as Documents; bad rows are skipped and counted
    (``stats``, ``report()``) with the line and field that was wrong. ``lines``: keep only these
    1-based line numbers (None: all; `tasks_by_line` groups them by task)."""
    kind = 'sft_jsonl'

    def __init__(self, path: str | pathlib.Path, size: int | None = None, lines: set[int] | None = None):
        super().__init__()
        self.path, self.size, self.lines = pathlib.Path(path), size, lines
        if not self.path.is_file():
            raise FileNotFoundError(f'{self.path}: no such instruction file (JSON lines, docs/sft.md)')

    def describe(self) -> str:
        return str(self.path)

    def _records(self):
        with open(self.path, encoding='utf-8') as f:
            for n, line in enumerate(f, start=1):
                if line.strip() and (self.lines is None or n in self.lines):
                    yield n, lambda line=line, n=n: self._load(line, n)

    def _load(self, line: str, n: int) -> Document:
        where = f'{self.path.name}:{n}'
        try:
            return read_row(line, where, self.path.parent, self.size)
        except RowError as e:  # counted by reason, with the line and field it was
            raise sources.Skip(e.reason, f'{where} {e.field}', e.problem) from None


def tasks_by_line(path: str | pathlib.Path, stats: sources.SourceStats) -> dict[str, set[int]]:
    """A quick pass over an instruction file (no images read): task -> its line numbers. Rows
    that are not JSON objects or name no known task are counted in ``stats``."""
    out: dict[str, set[int]] = {}
    path = pathlib.Path(path)
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f'{path.name}:{n}'
            try:
                row = json.loads(line)
                task = row.get('task') if isinstance(row, dict) else None
                if task not in tasks.TASKS:  # read_row names the problem
                    read_row(line, where, path.parent, 0)
            except (RowError, json.JSONDecodeError) as e:
                stats.skip(getattr(e, 'reason', 'bad json'), f'{where} {getattr(e, "field", "line")}')
                continue
            out.setdefault(task, set()).add(n)
    return out
