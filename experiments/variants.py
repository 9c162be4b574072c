"""Named variants of a config for the experiments that compare them (rerank_twins.py's
retrievers, lm_variants.py's language models): ``NAME=KEY=VALUE,KEY=VALUE;NAME=...``."""

from __future__ import annotations

import ast
import json
import pathlib
import shlex
import sys


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at each ``sep`` outside brackets, so a value may be a tuple: 'a=(1,2),b=3'."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in '([{') - (ch in ')]}')
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_variants(text: str) -> dict[str, dict]:
    """'base=;deep=model.vision_layers=4,model.text_layers=4' -> {'base': {}, 'deep': {...}}; a value
    is a Python literal (a tuple in brackets may hold commas), or else the string as given."""
    variants = {}
    for item in filter(None, (part.strip() for part in _split(text, ';'))):
        name, eq, rest = item.partition('=')
        if not eq or not name.isidentifier() or name in variants:
            raise ValueError(f'{item!r}: a variant is a new NAME (letters, digits, _), then =, then its overrides')
        overrides = {}
        for pair in filter(None, _split(rest, ',')):
            key, eq, value = pair.partition('=')
            if not eq or not key:
                raise ValueError(f'{pair!r} in variant {name!r} is not KEY=VALUE')
            try:
                overrides[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                overrides[key] = value
        variants[name] = overrides
    if not variants:
        raise ValueError('name at least one variant, e.g. base=')
    return variants


def apply_overrides(config, overrides: dict, what: str = 'config', known=None) -> None:
    """Sets each dotted KEY of `config` (a ConfigDict), refusing a key the config does not have.
    ``known`` (a ConfigDict: the current preset) admits a key that a run's older config lacks
    because the field is newer than the run (its code reads it as off); ``what`` names the config
    in the error."""
    for key, value in overrides.items():
        if not _has(config, key) and not (known is not None and _has(known, key)):
            raise SystemExit(f'{what} has no field {key!r}')
        *path, last = key.split('.')
        node = config
        for part in path:
            node = node[part]
        try:
            node[last] = value  # ConfigDict refuses a value of another type (an int for a float is widened)
        except TypeError as e:
            raise SystemExit(f'{what} field {key!r}: {e}') from None


def _has(config, key: str) -> bool:
    node = config
    for part in key.split('.'):
        if not hasattr(node, 'keys') or part not in node:
            return False
        node = node[part]
    return True


def start(args, script: str, argv=None) -> tuple[pathlib.Path, str]:
    """The results directory (``args.results``, made) and the command line that reproduces this
    run of ``script`` (experiments/NAME.py) with ``argv`` (default: the process's arguments)."""
    results_dir = pathlib.Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    return results_dir, shlex.join(['python', script, *given])


def finish(results: dict, results_dir: pathlib.Path, name: str, table, plot) -> dict:
    """Writes ``NAME.json``, the table ``NAME.md`` (``table(results)``) and ``NAME.png``
    (``plot(results, path)``) into ``results_dir``, prints the table and where they went."""
    (results_dir / f'{name}.json').write_text(json.dumps(results, indent=1))
    md = table(results)
    (results_dir / f'{name}.md').write_text(md + '\n')
    plot(results, results_dir / f'{name}.png')
    print(md)
    print(f'wrote {results_dir}/{name}.md, .json and .png')
    return results
