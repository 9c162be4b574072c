"""The quickstart (what `make demo` runs) fits its sequences and regenerates them from the cache."""

import pytest

from cm3jax import quickstart
from cm3jax.errors import ConfigError
from tests.helpers import tiny_config


def test_quickstart_learns_and_regenerates(capsys):
    config = tiny_config()
    config.mesh.ici = (2, 2, 2)
    config.quickstart.update(steps=80, seq_len=32)
    result = quickstart.run(config)
    assert result['final_loss'] < 0.1 * result['first_loss']
    assert result['exact'] > 0.95
    assert result['cache_error'] < 1e-4
    out = capsys.readouterr().out
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out and 'tokens reproduced' in out


def test_quickstart_rejects_a_batch_the_mesh_cannot_split():
    config = tiny_config()
    config.mesh.ici = (2, 2, 2)
    config.quickstart.batch = 6
    with pytest.raises(ConfigError, match='quickstart.batch=6 must be a multiple of the 4 batch shards'):
        quickstart.run(config)
