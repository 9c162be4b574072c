"""`cm3jax aot`: lower and compile an LM config's train step (and its cached decode step) for N
devices without allocating anything, and report what each device would hold (docs/scaling.md).

    report = compile_train_step(config, jax.devices()[:8])
    print(format_report(report))

The state and the batch are `jax.ShapeDtypeStruct`s carrying the mesh's shardings, so a 34B
config compiles on a laptop's simulated CPU devices. Parameter and optimizer bytes are the
per-device shards of the state (exact, from the shardings); activations and temporaries are
XLA's ``temp_size_in_bytes`` from ``compiled.memory_analysis()`` for the backend it compiled on
(a CPU compile stands in for an accelerator's: its fusion and layout choices differ, so treat
it as an estimate there).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax import params as params_lib, parallel
from cm3jax.lm import config as lm_config, task as lm_task
from cm3jax.model import transformer
from cm3jax.train import optim, state as state_lib, step as step_lib

GIB = 2 ** 30


@dataclasses.dataclass
class Report:
    devices: int
    mesh: dict
    batch: int
    seq_len: int
    remat: str
    params: float              # bytes per device
    optimizer: float           # bytes per device
    temporaries: float         # XLA temp_size_in_bytes: activations saved for backward, and scratch
    arguments: float           # argument_size_in_bytes (state + batch)
    outputs: float
    aliased: float             # donated: outputs that reuse argument buffers
    num_params: int

    @property
    def peak(self) -> float:
        """Bytes live at once per device: arguments + temporaries + the outputs not aliased."""
        return self.arguments + self.temporaries + self.outputs - self.aliased


def _shard_bytes(tree) -> float:
    return float(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(tree)))


def _fast_codegen(devices: Sequence[jax.Device]) -> dict:
    """On CPU, skip LLVM's optimisation of the machine code: memory is decided by XLA's buffer
    assignment before code generation, and the program is never run."""
    if devices[0].platform != 'cpu':
        return {}
    return {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def compile_train_step(config, devices: Sequence[jax.Device]) -> Report:
    """Compile ``config``'s LM train step on a mesh of ``devices`` (``config.mesh``, its -1 filled
    in) for ``config.train.batch`` rows of ``config.train.seq_len`` tokens."""
    lm_task.validate(config)
    lm_config.validate(config, num_devices=len(devices))
    mesh = parallel.mesh_from_config(config.mesh, devices)
    rules = parallel.rules_from_config(config)
    t = config.train
    cfg = lm_config.transformer_config(config, mesh, rules)
    model = transformer.Transformer(cfg)
    batch_shards = parallel.axis_size(mesh, rules, 'act_batch')
    if t.batch % (batch_shards * t.microbatches):
        raise ValueError(f'train.batch={t.batch} does not split over {batch_shards} batch shards x '
                         f'{t.microbatches} microbatches; change --config.train.batch')
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config(config.optim, t.steps), mask=optim.decay_mask,
                                     muon_dims=transformer.muon_dims)
    init_fn = lambda rng: model.init(rng, jnp.zeros((batch_shards, 8), jnp.int32))['params']  # noqa: E731
    target = state_lib.state_target(params_lib.abstract(init_fn, mesh, rules, jax.random.key(0)), optimizer, mesh)
    sharding = parallel.logical_sharding(mesh, rules, ('act_batch', 'act_len'))
    tokens = jax.ShapeDtypeStruct((t.batch, t.seq_len), jnp.int32, sharding=sharding)
    batch = {'inputs': tokens, 'targets': tokens, 'segment_ids': tokens,
             'weights': jax.ShapeDtypeStruct((t.batch, t.seq_len), jnp.float32, sharding=sharding)}
    step = step_lib.make_train_step(lm_task.lm_loss_fn(model, config.loss.z_loss), optimizer, t.microbatches)
    jitted = step_lib.jit_train_step(step, params_lib.shardings_of(target), sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = jitted.lower(target, batch, jax.random.key(0)).compile(compiler_options=_fast_codegen(devices))
    mem = compiled.memory_analysis()
    return Report(devices=len(devices), mesh=dict(mesh.shape), batch=t.batch, seq_len=t.seq_len, remat=cfg.remat,
                  params=_shard_bytes(target['params']), optimizer=_shard_bytes(target['opt']),
                  temporaries=float(mem.temp_size_in_bytes), arguments=float(mem.argument_size_in_bytes),
                  outputs=float(mem.output_size_in_bytes), aliased=float(mem.alias_size_in_bytes),
                  num_params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(target['params']))))


@dataclasses.dataclass
class DecodeReport:
    devices: int
    batch: int
    cache_len: int
    params: float        # bytes per device
    cache: float         # the KV cache's bytes per device
    temporaries: float

    @property
    def total(self) -> float:
        return self.params + self.cache + self.temporaries


def compile_decode_step(config, devices: Sequence[jax.Device], batch: int, cache_len: int | None = None) -> DecodeReport:
    """Compile one cached decode step (`transformer.decode_step`) of ``batch`` rows over a KV
    cache of ``cache_len`` slots (default model.max_len) on a mesh of ``devices``."""
    lm_config.validate(config, num_devices=len(devices))
    mesh = parallel.mesh_from_config(config.mesh, devices)
    rules = parallel.rules_from_config(config)
    cfg = dataclasses.replace(lm_config.transformer_config(config, mesh, rules), scan_layers=False, remat='none')
    model = transformer.Transformer(cfg)
    cache_len = cache_len or cfg.max_len
    params = params_lib.abstract(lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))['params'], mesh, rules,
                                 jax.random.key(0))
    shapes = jax.eval_shape(lambda: transformer.init_cache(cfg, batch, cache_len))
    cache = jax.tree.map(lambda x, axes: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.logical_sharding(
        mesh, rules, axes)), shapes, transformer.cache_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=parallel.logical_sharding(mesh, rules, ('act_batch',)))
    fn = jax.jit(lambda p, c, t: transformer.decode_step(model, p, c, t), donate_argnums=1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = fn.lower(params, cache, tokens).compile(compiler_options=_fast_codegen(devices))
    return DecodeReport(devices=len(devices), batch=batch, cache_len=cache_len, params=_shard_bytes(params),
                        cache=_shard_bytes(cache), temporaries=float(compiled.memory_analysis().temp_size_in_bytes))


def format_report(r: Report) -> str:
    rows = [('params', r.params), ('optimizer state', r.optimizer), ('activations + temporaries', r.temporaries),
            ('arguments (state + batch)', r.arguments), ('peak (arguments + temporaries + new outputs)', r.peak)]
    head = (f'{r.num_params / 1e9:.2f}B params on {r.devices} devices, mesh {r.mesh}, batch {r.batch} x '
            f'{r.seq_len} ({r.batch // r.devices if r.batch >= r.devices else r.batch / r.devices} rows/device), '
            f'remat {r.remat}; per device:')
    return '\n'.join([head] + [f'  {name:<46} {b / GIB:9.3f} GiB' for name, b in rows])


def format_decode_report(r: DecodeReport) -> str:
    rows = [('params', r.params), ('KV cache', r.cache), ('temporaries', r.temporaries), ('total', r.total)]
    head = f'decode step: {r.batch} rows over {r.cache_len} cache slots on {r.devices} devices; per device:'
    return '\n'.join([head] + [f'  {name:<46} {b / GIB:9.3f} GiB' for name, b in rows])
