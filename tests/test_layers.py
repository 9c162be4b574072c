"""Imports flow one way (docs/architecture.md, "Layers"): every import inside the package goes to
an earlier layer, or stays inside its own group, and nothing imports the CLI.

Lazy imports inside functions count as much as module-level ones: a layer that reaches forward
at run time is as tangled as one that does at import time."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'cm3jax'

# (layer, group): an import is allowed into an earlier layer, or within the same group.
# Order as in docs/architecture.md; lm/config.py reads LM configs into model configs for lm/ and
# sample/ alike, so it sits just below model/, not with lm/task.py.
LAYERS = [
    (1, 'base', ('vocab', 'parallel', 'errors', 'params', 'launch')),
    (2, 'model', ('model',)),
    (2, 'train', ('train',)),
    (2, 'text_tokenizer', ('text_tokenizer',)),
    (2.5, 'lm_config', ('lm.config',)),
    (3, 'readers', ('data.worlds', 'data.sources', 'data.documents', 'data.cm3', 'data.synthetic', 'data.batches',
                    'data.images', 'data.shards', 'data.archives', 'data.instructions')),
    (4, 'vq', ('vq',)),
    (5, 'token_data', ('data.prepare', 'data.pipeline', 'data.augment', 'data.neighbours')),
    (6, 'retrieval', ('retrieval',)),
    (7, 'lm', ('lm',)),
    (7, 'sample', ('sample',)),
    (7.5, 'sft', ('sft',)),  # SFT is the LM's Task on other data, and generates through sample/
    (8, 'eval', ('eval',)),
    (9, 'top', ('convert', 'aot', 'quickstart', 'quickstart_report', 'trainers', 'cli', 'cli_sample', '__main__')),
]


def place(module: str) -> tuple[float, str]:
    """'cm3jax.data.sources' -> its (layer, group); the longest matching prefix wins."""
    if module == 'cm3jax' or module.endswith('.__init__') or (PACKAGE.parent / module.replace('.', '/')).is_dir():
        return 0, 'package'  # package __init__ files hold docstrings only (checked below)
    name = module.removeprefix('cm3jax.').removesuffix('.__init__')
    best = None
    for layer, group, prefixes in LAYERS:
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + '.')) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer, group)
    if best is None:
        raise LookupError(f'cm3jax.{name} has no layer: add it to LAYERS here and to docs/architecture.md')
    return best[1], best[2]


def modules():
    for path in sorted(PACKAGE.rglob('*.py')):
        rel = path.relative_to(PACKAGE.parent).with_suffix('')
        yield '.'.join(rel.parts), path


def imports(path: pathlib.Path, module: str):
    """Every cm3jax module ``path`` imports, anywhere in the file, with its line."""
    tree = ast.parse(path.read_text())
    package = module.rsplit('.', 1)[0] if not path.name == '__init__.py' else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('cm3jax'):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative
                base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
            if not base.startswith('cm3jax'):
                continue
            for alias in node.names:  # `from cm3jax.data import sources` names a module
                candidate = f'{base}.{alias.name}'
                is_module = (PACKAGE.parent / pathlib.Path(*candidate.split('.'))).with_suffix('.py').exists() or \
                    (PACKAGE.parent / pathlib.Path(*candidate.split('.'))).is_dir()
                yield (candidate if is_module else base), node.lineno


def test_every_module_has_a_layer():
    for module, _ in modules():
        place(module)


def test_package_init_files_import_nothing_of_cm3jax():
    for module, path in modules():
        if path.name == '__init__.py':
            assert not list(imports(path, module)), f'{path} imports cm3jax modules; keep package inits empty'


def test_imports_flow_one_way():
    bad = []
    for module, path in modules():
        layer, group = place(module)
        for target, line in imports(path, module):
            to_layer, to_group = place(target)
            if target == 'cm3jax.cli' and module != 'cm3jax.__main__':
                bad.append(f'{module}:{line} imports the CLI')
            elif not (to_layer < layer or to_group == group):
                bad.append(f'{module}:{line} (layer {layer}, {group}) imports {target} (layer {to_layer}, {to_group})')
    assert not bad, 'imports against the layer order:\n' + '\n'.join(bad)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    path = tmp_path / 'm.py'
    path.write_text('def f():\n    from cm3jax.retrieval import train\n    import cm3jax.vq.model\n')
    assert sorted(imports(path, 'cm3jax.train.m')) == [('cm3jax.retrieval.train', 2), ('cm3jax.vq.model', 3)]
    with pytest.raises(LookupError, match='has no layer'):
        place('cm3jax.nowhere')
