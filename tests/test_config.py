"""Presets, command-line overrides and the errors bad configs raise."""

import subprocess
import sys

import pytest

from cm3jax.errors import ConfigError
from cm3jax.lm import config as lm_config
from configs import lm


@pytest.mark.parametrize('preset', list(lm.SIZES) + ['tiny,chameleon', 'cm3leon_350m,chameleon'])
def test_presets_validate(preset):
    config = lm_config.validate(lm.get_config(preset), num_devices=8)
    assert config.model.d_model % config.model.num_heads == 0


def test_preset_shapes_follow_the_paper():
    for preset, (layers, d_model, heads) in {'cm3leon_350m': (24, 1024, 16), 'cm3leon_760m': (24, 1536, 16),
                                              'cm3leon_7b': (32, 4096, 32)}.items():
        m = lm.get_config(preset).model
        assert (m.num_layers, m.d_model, m.num_heads, m.max_len, m.mlp_dim) == (layers, d_model, heads, 4096, 4 * d_model)
        assert (m.norm, m.norm_params, m.position, m.mlp, m.init_std, m.pos_init_std) == \
            ('layernorm', False, 'learned', 'gelu', 0.006, 2e-4)
    c = lm.get_config('chameleon')
    assert (c.model.norm, c.model.mlp, c.model.position, c.model.qk_norm, c.model.vocab_size, c.loss.z_loss) == \
        ('rmsnorm', 'swiglu', 'rope', True, 65_536, 1e-5)


@pytest.mark.parametrize('field,value,message', [
    ('model.num_heads', 6, r'model.num_heads=6 does not divide model.d_model=64'),
    ('model.d_model', -64, r'model.d_model=-64 must be positive'),
    ('model.num_layers', 0, r'model.num_layers=0 must be positive'),
    ('model.attention', 'flash', r"model.attention='flash' is unknown; choose one of \('xla', 'cudnn', 'splash'\)"),
    ('model.remat', 'some', r"model.remat='some' is unknown"),
    ('model.num_kv_heads', 3, r'model.num_kv_heads=3 does not divide model.num_heads=4'),
    ('mesh.ici', (2, 2, 1), r'mesh.ici=\(2, 2, 1\) has 4 devices but there are 8'),
    ('mesh.ici', (1, 1, 8), r'model.num_heads=4 is not divisible by the tensor-parallel size 8'),
    ('mesh.dcn', (1, 2), r'mesh.dcn=\(1, 2\) must have 3 entries'),
    ('loss.z_loss', -1.0, r'loss.z_loss=-1.0 must be >= 0'),
    ('model.scan_unroll', 0, r'model.scan_unroll=0 must be an int >= 1'),
    ('model.image_positions', -1, r'model.image_positions=-1 must be an int >= 0'),
    ('model.image_positions', 64, r'model.image_positions=64 needs model.image_ids=\(start, stop\)'),
    ('model.canon', 'AB', r"model.canon='AB': give the Canon sites, any of \"A\" .* and \"C\""),
    ('model.canon', 'AA', r"model.canon='AA'"),
])
def test_bad_configs_name_the_field(field, value, message):
    config = lm.get_config('tiny')
    section, name = field.split('.')
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        lm_config.validate(config, num_devices=8)


def test_canon_taps_are_checked_when_canon_is_on():
    config = lm.get_config('tiny')
    config.model.canon_taps = (1, 1)
    lm_config.validate(config, num_devices=8)  # off: the taps are not read
    config.model.canon = 'A'
    with pytest.raises(ConfigError, match=r'model.canon_taps=\(1, 1\) must be distinct ints >= 1'):
        lm_config.validate(config, num_devices=8)
    config.model.canon_taps = (0, 2)
    with pytest.raises(ConfigError, match='must be distinct ints >= 1'):
        lm_config.validate(config, num_devices=8)


def test_unknown_presets_are_rejected():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        lm.get_config('huge')
    with pytest.raises(ValueError, match='unknown modifier'):
        lm.get_config('tiny,llama')


def _cli(repo, *args):
    return subprocess.run([sys.executable, '-m', 'cm3jax', *args], cwd=repo, capture_output=True, text=True, timeout=120)


def test_command_line_overrides(repo):
    out = _cli(repo, 'config', '--config=configs/lm.py:tiny,chameleon', '--config.model.num_layers=4',
               '--config.mesh.ici=(1,-1,1)')
    assert out.returncode == 0, out.stderr
    assert 'num_layers: 4' in out.stdout and 'norm: rmsnorm' in out.stdout
    bad = _cli(repo, 'config', '--config=configs/lm.py:tiny', '--config.model.num_heads=5')
    assert bad.returncode != 0 and 'model.num_heads=5 does not divide model.d_model=64' in bad.stderr
    usage = _cli(repo, 'fly')
    assert usage.returncode != 0 and 'usage: cm3jax {train|train-tokenizer|train-retriever|prepare|build-index|sample|quickstart|eval|config|convert|aot}' in usage.stderr
    no_workdir = _cli(repo, 'train')
    assert no_workdir.returncode != 0 and 'cm3jax train needs --workdir=DIR' in no_workdir.stderr
    wrong = _cli(repo, 'train-tokenizer', '--workdir=/tmp/unused')  # the LM config is the default
    assert wrong.returncode != 0 and 'needs a tokenizer config, e.g. --config=configs/vq.py:tiny' in wrong.stderr
    shown = _cli(repo, 'config', '--config=configs/vq.py:tiny')
    assert shown.returncode == 0 and 'num_codes: 256' in shown.stdout, shown.stderr
