"""report.md of `cm3jax eval`: one row per figure, with its protocol beside it."""

from __future__ import annotations

import math

_SKIP = {'protocol', 'se', 'n', 'value', 'reference_n'}


def _fmt(x) -> str:
    if isinstance(x, float):
        return 'nan' if math.isnan(x) else f'{x:.4g}'
    return str(x)


def _protocol(p: dict) -> str:
    """One line; nested settings (sampling) inline, the world's full description left to report.json."""
    def show(v):
        return ', '.join(f'{k} {_fmt(x)}' for k, x in v.items()) if isinstance(v, dict) else _fmt(v)
    return '; '.join(f'{k}: {show(v)}' for k, v in p.items() if k != 'world').replace('|', '/')


def rows(metrics: dict, protocol: dict | None = None, prefix: str = '') -> list[tuple[str, str, str]]:
    """(name, value, protocol) of every figure: entries with a 'value', and plain numbers."""
    out = []
    for name, entry in metrics.items():
        path = f'{prefix}{name}'
        if isinstance(entry, dict):
            here = entry.get('protocol', protocol) or {}
            if 'value' in entry:
                value = _fmt(entry['value'])
                if 'se' in entry:
                    value += f' ± {_fmt(entry["se"])}'
                if 'n' in entry:
                    value += f' (n={entry["n"]})'
                out.append((path, value, _protocol(here)))
            out += rows({k: v for k, v in entry.items() if k not in _SKIP}, here, f'{path}/')
        elif isinstance(entry, (int, float)) and name not in _SKIP:
            out.append((path, _fmt(entry), _protocol(protocol or {})))
    return out


def markdown(report: dict) -> str:
    lines = [f'# cm3jax eval: {report["suite"]}', '',
             f'workdir: {report.get("workdir")}; images: {report.get("images")}; seed {report["seed"]}. '
             'Proportions are ± their standard error; every row names how it was measured.', '',
             '| metric | value | protocol |', '|---|---|---|']
    lines += [f'| {n} | {v} | {p} |' for n, v, p in rows(report['metrics'])]
    return '\n'.join(lines) + '\n'
