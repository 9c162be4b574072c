"""An SFT data directory: instruction examples prepared with a pretrained model's tokenizers.

    DIR/manifest.json         over every task: vocab, tokenizers, shards tagged with their task
    DIR/TASK/shard-*.array_record, DIR/TASK/manifest.json    one `cm3jax prepare` per task

Examples come from the Shapes generators (`cm3jax.sft.tasks`) and from instruction files
(`cm3jax.sft.jsonl`); each task is prepared on its own (resumably, by `data.prepare.prepare`),
so the mixture (`cm3jax.sft.data`) can weigh them. The tokenizers are the pretrained run's: a
`cm3jax train` workdir on prepared data, or a `cm3jax convert chameleon` directory.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from cm3jax.data import prepare, sources
from cm3jax.data.worlds import shapes
from cm3jax.sft import jsonl, tasks
from cm3jax.vocab import Vocab


@dataclasses.dataclass
class Tokenizers:
    vocab: Vocab
    text: Any                 # cm3jax.text_tokenizer.TextTokenizer
    vq_params: Any
    vq_cfg: Any
    paths: dict               # 'vq_workdir', 'text_tokenizer_path': what sampling reads them from


def tokenizers_of(pretrained: str | pathlib.Path) -> Tokenizers:
    """The tokenizers a pretrained model reads and writes: from its training workdir (through its
    data's manifest) or from a converted directory (`sample.load.read_run`)."""
    from cm3jax.sample import load
    path = pathlib.Path(pretrained)
    if not (path / 'config.json').is_file():
        raise FileNotFoundError(f'{path / "config.json"} is missing: --init_from must be a `cm3jax train` run on '
                                f'prepared data (the quickstart\'s out/quickstart/lm) or a converted Chameleon directory')
    try:
        _, vocab, tok, vq_params, vq_cfg, paths = load.read_run(path)
    except ValueError as e:
        raise ValueError(f'{e}; SFT needs its image tokenizer') from None
    if vq_params is None:
        raise ValueError(f'{path} holds no image tokenizer ({load.VQ_DIR}/): convert the VQ-GAN with it')
    return Tokenizers(vocab, tok, vq_params, vq_cfg, paths)


def prepare_tasks(out_dir: str | pathlib.Path, task_sources: dict[str, list], tok: Tokenizers,
                  cfg: prepare.PrepareConfig = prepare.PrepareConfig(),
                  unsorted: sources.SourceStats | None = None) -> dict:
    """``{task: [sources of Documents]}`` -> the SFT data directory ``out_dir`` (module
    docstring); returns its manifest. A task whose sources are all empty is left out.
    ``unsorted``: the rows no task's pass reads (`jsonl_sources`), recorded with the others."""
    out_dir = pathlib.Path(out_dir)
    shards, counts, first = [], {}, None
    skipped = {'(no task)': dataclasses.asdict(unsorted)} if unsorted is not None and unsorted.skipped else {}
    for task, srcs in task_sources.items():
        tasks.check_task(task)
        docs = _Chain(srcs)
        m = prepare.prepare(docs, out_dir / task, vocab=tok.vocab, text_tokenizer=tok.text, vq_params=tok.vq_params,
                            vq_cfg=tok.vq_cfg, cfg=cfg, extra=tok.paths)
        if (m['skipped'] or {}).get('skipped'):
            skipped[task] = m['skipped']
        if not m['documents']:
            continue
        first = first or m
        counts[task] = m['documents']
        shards += [{**s, 'path': f'{task}/{s["path"]}', 'task': task} for s in m['shards'] if s['documents']]
    if first is None:
        raise ValueError(f'no usable instruction examples for tasks {sorted(task_sources)} in {out_dir} '
                         f'(skipped: {skipped or "none"}): give data.shapes_examples > 0 or data.files')
    identity = {k: first[k] for k in ('vocab', 'vocab_fingerprint', 'text_tokenizer', 'image_tokenizer',
                                      'image_shape', 'shard_size')}
    manifest = {**identity, 'tasks': counts, 'shards': shards, 'documents': sum(counts.values()),
                'tokens': sum(s['tokens'] for s in shards), 'image_tokens': sum(s['image_tokens'] for s in shards),
                'skipped': skipped, **tok.paths}
    (out_dir / prepare.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


class _Chain:
    """Several sources read one after another, sized when they all are; its ``stats`` merge theirs."""

    def __init__(self, srcs: list):
        self.srcs = srcs

    def __len__(self) -> int:
        return sum(len(s) for s in self.srcs)

    def __iter__(self):
        for s in self.srcs:
            yield from s

    @property
    def stats(self):
        """The readers' merged counts (None when no source is a reader: generators skip nothing)."""
        counted = [s.stats for s in self.srcs if getattr(s, 'stats', None) is not None]
        if not counted:
            return None
        out = sources.SourceStats()
        for st in counted:
            out.read += st.read
            for reason, n in st.reasons.items():
                out.skipped += n
                out.reasons[reason] = out.reasons.get(reason, 0) + n
                kept = out.examples.setdefault(reason, [])
                kept += st.examples.get(reason, [])[:sources.MAX_EXAMPLES - len(kept)]
        return out


def shapes_sources(world: shapes.ShapesConfig, seed: int, counts: dict[str, int], split: str = 'train') -> dict:
    """{task: [a `tasks.TaskSource` of counts[task] examples]}."""
    return {t: [tasks.TaskSource(t, world, seed, n, split)] for t, n in counts.items() if n > 0}


def jsonl_sources(paths: list[str], size: int) -> tuple[dict, sources.SourceStats]:
    """Instruction files -> ({task: [`jsonl.JsonlSource` of that task's rows]}, the stats of rows
    that name no known task or are not JSON, which no task's pass sees)."""
    out, early = {}, sources.SourceStats()
    for path in paths:
        for task, lines in jsonl.tasks_by_line(path, early).items():
            out.setdefault(task, []).append(jsonl.JsonlSource(path, size, lines))
    return out, early
