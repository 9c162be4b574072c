"""Every `cm3jax ...` command shown in README.md, docs/ and the configs' docstrings names a real
command, real flags, and config fields that exist in its preset (with values of the field's
type), so a command copied from the docs gets past the argument parsing."""

import ast
import importlib
import pathlib
import re
import shlex

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r'<|^[A-Z_]+$|^[A-Z_]+/')  # <printed by prepare>, DIR, PHOTOS, EVAL_DIR/...


def _commands():
    """(where, argv) of every `cm3jax COMMAND ...` line inside the markdown files' code blocks
    and in the configs' docstrings, with backslash continuations joined."""
    files = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md')), *sorted((REPO / 'configs').glob('*.py'))]
    for path in files:
        lines = path.read_text().splitlines()
        fenced = path.suffix == '.py'  # a config's docstring is all commands and prose lines
        i = 0
        while i < len(lines):
            line, start = lines[i].strip(), i
            i += 1
            if line.startswith('```'):
                fenced = not fenced if path.suffix == '.md' else fenced
                continue
            while line.endswith('\\') and i < len(lines):
                line = line[:-1] + ' ' + lines[i].strip()
                i += 1
            m = re.match(r'(?:\S+=\S+ )*(?:python -m cm3jax.launch .*?-- )?cm3jax ([a-z-]+(?: .*)?)$', line)
            if not fenced or not m:
                continue
            try:
                argv = shlex.split(m.group(1).split(' #')[0])
            except ValueError:
                continue
            yield f'{path.relative_to(REPO)}:{start + 1}', argv


COMMANDS = list(_commands())


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20, COMMANDS


@pytest.mark.parametrize('where,argv', COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, argv):
    from cm3jax import cli
    from absl import flags
    assert argv[0] in cli.COMMANDS, f'{where}: no command {argv[0]!r}'
    known = set(flags.FLAGS)
    config, overrides = None, []
    for arg in argv[1:]:
        if not arg.startswith('--'):
            continue
        name, _, value = arg[2:].partition('=')
        if name == 'config':
            path, _, preset = value.partition(':')
            if preset.startswith('converted='):  # a converted directory's config is the chameleon preset, reshaped
                preset = 'chameleon'
            module = importlib.import_module('configs.' + pathlib.Path(path).stem)
            config = module.get_config(preset) if preset else module.get_config()
        elif name.startswith('config.'):
            overrides.append((name[len('config.'):], value))
        else:
            assert name in known, f'{where}: no flag --{name}'
    if overrides:
        if config is None:
            from configs import lm
            config = lm.get_config('tiny')
        for field, value in overrides:
            *parents, leaf = field.split('.')
            node = config
            for part in parents:
                assert part in node, f'{where}: --config.{field}: no field {part!r}'
                node = node[part]
            assert leaf in node, f'{where}: --config.{field}: no field {leaf!r} (fields: {sorted(node)})'
            if PLACEHOLDER.search(value):
                continue
            try:  # as the flag parser does: strings stay strings, other fields are literals
                parsed = value if isinstance(node[leaf], str) else ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
            node[leaf] = parsed  # ConfigDict checks the type
