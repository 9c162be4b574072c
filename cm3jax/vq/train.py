"""`cm3jax train-tokenizer`: the VQ-GAN trained with the shared train loop (taming's recipe).

The generator (encoder, quantizer, decoder) and the PatchGAN discriminator are one parameter
tree ``{'vq', 'disc'}`` with one optimizer and one loss: each player's term stops the gradient
into the other's parameters, so the gradient of the sum is exactly (generator grads, discriminator
grads). That keeps `cm3jax.train.step` (accumulation, NaN guard), `loop`, `checkpoint` and
`metrics` unchanged. What is not a gradient step, the EMA codebook and the dead-code restart,
wraps the step.

The trainer takes an iterator of {'images': uint8 [B, R, R, C]} batches; it never imports
`cm3jax.data` (the command wires a source in).
"""

from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cm3jax import parallel
from cm3jax.train import checkpoint, loop, metrics as metrics_lib, optim, state as state_lib, step as step_lib
from cm3jax.vq import losses, model as vq

STEP_KEYS = ('step', 'params', 'opt')


def vq_config(config) -> vq.VQConfig:
    m = config.model
    fields = {f: m[f] for f in vq.VQConfig.__dataclass_fields__ if f in m}
    return vq.VQConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}).validate()


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of images in [-1, 1] (as on the 0..255 scale): [B, H, W, C] -> [B]."""
    mse = jnp.mean(((x - y) / 2.0) ** 2, axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def ema_settings(quantizer) -> tuple[float, float]:
    """(``quantizer.ema_decay``, ``quantizer.ema_eps``), checked; decay 0 (the default) is off."""
    decay, eps = float(quantizer.get('ema_decay', 0.0)), float(quantizer.get('ema_eps', 1e-5))
    if not 0.0 <= decay < 1.0:
        raise ValueError(f'quantizer.ema_decay={decay} must be in [0, 1): 0 turns the EMA codebook off, '
                         f'values like 0.99 turn it on (the weight kept from the old average each step)')
    if decay and not eps > 0.0:
        raise ValueError(f'quantizer.ema_eps={eps} must be > 0 (the Laplace smoothing that keeps unused codes '
                         f'finite)')
    return decay, eps


def make_loss_fn(model: vq.VQGAN, disc: losses.NLayerDiscriminator | None, loss_cfg, step: jax.Array,
                 ema: bool = False):
    """loss_fn(params {'vq', 'disc'}, {'images': uint8}, rng) -> (loss_sum, stats) for `make_train_step`.

    With ``ema`` the codebook gets no gradient (the EMA moves it; the commitment loss still
    trains the encoder) and stats carry 'code_sums', the batch's per-code latent sums."""
    lc = loss_cfg

    def loss_fn(params, batch, rng):
        x = batch['images'].astype(jnp.float32) / 127.5 - 1.0
        b = x.shape[0]
        vq_params = params['vq']
        if ema:
            frozen = jax.lax.stop_gradient(vq_params['quantize']['embedding'])
            vq_params = {**vq_params, 'quantize': {**vq_params['quantize'], 'embedding': frozen}}
        rec, codes, aux = model.apply({'params': vq_params}, x)
        rec_loss = losses.reconstruction_loss(x, rec, lc.reconstruction)
        quant_loss = aux['codebook_loss'] + aux['commitment_loss']
        total = rec_loss + lc.codebook_weight * quant_loss
        usage = vq.code_usage(codes, model.cfg.num_codes)
        stats = {'rec_loss': rec_loss, 'quant_loss': quant_loss, 'psnr': psnr(x, rec).mean(),
                 'codes/used_fraction': usage['used_fraction'], 'codes/perplexity': usage['perplexity']}
        if lc.entropy_weight:
            entropy, _ = losses.entropy_penalty(aux['distances'], lc.entropy_temperature)
            total = total + lc.entropy_weight * entropy
            stats['entropy_penalty'] = entropy
        if disc is not None:
            gate = losses.adopt_weight(1.0, step, lc.disc_start)
            frozen = jax.lax.stop_gradient(params['disc'])
            g_loss = losses.generator_adversarial_loss(disc.apply({'params': frozen}, rec))
            weight = lc.disc_weight * gate
            if lc.adaptive_weight:
                weight = weight * _adaptive_weight(model, params['vq'], disc, frozen, x, lc.reconstruction)
            fake = disc.apply({'params': params['disc']}, jax.lax.stop_gradient(rec))
            real = disc.apply({'params': params['disc']}, x)
            d_fn = losses.hinge_d_loss if lc.disc_loss == 'hinge' else losses.vanilla_d_loss
            d_loss = gate * d_fn(real, fake)
            total = total + weight * g_loss + d_loss
            stats.update(g_loss=g_loss, d_loss=d_loss, d_weight=weight)
        stats = {k: (v * b, jnp.float32(b)) for k, v in stats.items()}
        stats['loss'] = (total * b, jnp.float32(b))
        stats['code_counts'] = (usage['counts'].astype(jnp.float32), jnp.float32(1.0))
        if ema:  # from this forward pass: the latents the codes were chosen for
            sums = vq.code_sums(aux['z'], codes, model.cfg.num_codes, model.cfg.l2_normalize)
            stats['code_sums'] = (sums, jnp.float32(1.0))
        return total * b, stats

    return loss_fn


def _adaptive_weight(model, vq_params, disc, disc_params, x, kind):
    """taming's weight ||d rec / d last|| / ||d g / d last|| on the decoder's output conv."""
    def with_last(kernel):
        p = {**vq_params, 'decoder': {**vq_params['decoder'], 'conv_out': {**vq_params['decoder']['conv_out'],
                                                                            'kernel': kernel}}}
        return model.apply({'params': p}, x)[0]

    last = vq_params['decoder']['conv_out']['kernel']
    return losses.adaptive_weight(lambda k: losses.reconstruction_loss(x, with_last(k), kind),
                                  lambda k: losses.generator_adversarial_loss(disc.apply({'params': disc_params},
                                                                                         with_last(k))), last)


def make_step(model, disc, loss_cfg, optimizer, microbatches: int, restart_every: int, restart_min_count: float,
              ema_decay: float = 0.0, ema_eps: float = 1e-5):
    """``step(state, batch, rng) -> (state, metrics)``: `make_train_step` on the combined loss,
    then code usage counting, with ``ema_decay`` > 0 the EMA codebook update (`vq.ema_step` on
    the batch's code counts and latent sums), and, every ``restart_every`` steps, dead-code
    restart onto this batch's latents. state: {'step', 'params', 'opt', 'usage': Float[K]},
    plus 'ema': {'count': Float[K], 'sum': Float[K, D]} when the EMA is on."""
    ema_on = bool(ema_decay)

    def with_codebook(params, codebook):
        return {**params, 'vq': {**params['vq'], 'quantize': {**params['vq']['quantize'], 'embedding': codebook}}}

    def step(state, batch, rng):
        loss_fn = make_loss_fn(model, disc, loss_cfg, state['step'], ema=ema_on)
        inner = step_lib.make_train_step(loss_fn, optimizer, microbatches)
        new, metrics = inner({k: state[k] for k in STEP_KEYS}, batch, rng)
        # means() divided the summed counts (and sums) by microbatches
        counts = metrics.pop('code_counts') * microbatches
        new['usage'] = state['usage'] + counts
        if ema_on:
            sums = metrics.pop('code_sums') * microbatches
            ema, codebook = vq.ema_step(state['ema'], counts, sums, ema_decay, ema_eps)
            ok = metrics['finite/loss'] & metrics['finite/grads']  # like the step: a bad batch changes nothing
            old = state['params']['vq']['quantize']['embedding']
            new['ema'] = jax.tree.map(lambda n, o: jnp.where(ok, n, o), ema, state['ema'])
            new['params'] = with_codebook(new['params'], jnp.where(ok, codebook.astype(old.dtype), old))
        if not restart_every:
            return new, metrics

        def restart(carry):
            params, ema = carry
            x = batch['images'].astype(jnp.float32) / 127.5 - 1.0
            z = model.apply({'params': params['vq']}, x, method=vq.VQGAN.encode_latents)
            z = z.reshape(-1, z.shape[-1])
            if ema_on and model.cfg.l2_normalize:  # the EMA averages unit latents (see vq.code_sums)
                z = vq._normalize(z)
            codebook, n = vq.restart_dead_codes(params['vq']['quantize']['embedding'], new['usage'], z,
                                                jax.random.fold_in(rng, 1), restart_min_count)
            if ema_on:  # restarted codes (restart_dead_codes' rule) start their averages afresh there
                ema = vq.ema_reset(ema, codebook, new['usage'] < restart_min_count)
            return (with_codebook(params, codebook), ema), n

        due = (new['step'] % restart_every == 0) & (new['step'] > state['step'])
        carry = (new['params'], new.get('ema'))
        (params, ema), restarted = jax.lax.cond(due, restart, lambda c: (c, jnp.int32(0)), carry)
        metrics['codes/restarted'] = restarted
        new.update(params=params, usage=jnp.where(due, jnp.zeros_like(new['usage']), new['usage']))
        if ema_on:
            new['ema'] = ema
        return new, metrics

    return step


def image_hook(model, params_of, batches, writer, workdir: pathlib.Path, every: int, eval_prefix='eval') -> loop.Hook:
    """Every ``every`` steps: PSNR and code usage over held-out ``batches()``, and a grid of
    originals (top) and reconstructions (bottom) as PNG in ``workdir/images`` and in TensorBoard."""
    recon = jax.jit(lambda p, x: model.apply({'params': p}, x)[:2])

    def run(info: loop.StepInfo) -> None:
        params = params_of(info.state)
        scores, used, first = [], np.zeros(model.cfg.num_codes, bool), None
        for batch in batches():
            images = np.asarray(jax.device_get(batch['images']))
            x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
            rec, codes = jax.device_get(recon(params, x))
            scores.append(np.asarray(psnr(x, rec)))
            used[np.asarray(codes).reshape(-1)] = True
            first = first if first is not None else (images, np.asarray(vq.to_uint8(rec)))
        writer.write(info.step, {f'{eval_prefix}/psnr': float(np.concatenate(scores).mean()),
                                 f'{eval_prefix}/codes_used': float(used.mean())})
        if first is not None and jax.process_index() == 0:
            grid = np.concatenate([np.concatenate(list(row[:8]), axis=1) for row in first], axis=0)
            (workdir / 'images').mkdir(parents=True, exist_ok=True)
            from PIL import Image
            Image.fromarray(grid).save(workdir / 'images' / f'step_{info.step:07d}.png')
            writer.write_image(info.step, 'reconstructions', grid)

    return loop.Hook(run, every)


def train(config, workdir: str, data, eval_batches) -> dict[str, float]:
    """Train (or resume) the tokenizer in ``workdir`` on ``data`` (a `cm3jax.train.loop.DataIterator`
    of host-local {'images': uint8} batches); ``eval_batches()`` yields held-out ones.
    Returns the last held-out PSNR and code usage."""
    with loop.Preemption() as preemption:
        return _train(config, pathlib.Path(workdir).absolute(), data, eval_batches, preemption)


def _train(config, workdir, data, eval_batches, preemption) -> dict[str, float]:
    parallel.maybe_initialize_distributed()
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    t, lc = config.train, config.loss
    ema_decay, ema_eps = ema_settings(config.quantizer)

    # ---- Mesh: images split over the batch axes, parameters replicated (convnets are small) ----
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config)
    cfg = vq_config(config)
    shards = parallel.axis_size(mesh, rules, 'act_batch')
    if t.batch % (shards * t.microbatches) or t.batch % jax.process_count():
        raise ValueError(f'train.batch={t.batch} must be a multiple of the {shards} batch shards x '
                         f'train.microbatches={t.microbatches} and of the {jax.process_count()} processes')
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))

    # ---- Model, discriminator, optimizer, state ----
    model = vq.VQGAN(cfg)
    disc = losses.NLayerDiscriminator(ndf=lc.disc_ndf, n_layers=lc.disc_layers) if lc.disc_weight else None
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config(config.optim, t.steps))
    example = jnp.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels))

    def init_fn(rng, x):
        params = {'vq': model.init(jax.random.fold_in(rng, 0), x)['params']}
        if disc is not None:
            params['disc'] = disc.init(jax.random.fold_in(rng, 1), x)['params']
        return params

    args = (jax.random.key(config.seed), example)
    replicated = NamedSharding(mesh, P())
    target = {**state_lib.abstract_state(init_fn, optimizer, mesh, rules, *args),
              'usage': jax.ShapeDtypeStruct((cfg.num_codes,), jnp.float32, sharding=replicated)}
    if ema_decay:  # only then, so checkpoints without the EMA keep their layout
        target['ema'] = {'count': jax.ShapeDtypeStruct((cfg.num_codes,), jnp.float32, sharding=replicated),
                         'sum': jax.ShapeDtypeStruct((cfg.num_codes, cfg.embed_dim), jnp.float32,
                                                     sharding=replicated)}
    ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', every_steps=t.checkpoint_every,
                                   every_seconds=60 * t.checkpoint_minutes, keep=t.keep, use_async=t.async_checkpoint)
    state = ckpt.resume(target, data)
    if state is None:
        state = state_lib.init_state(init_fn, optimizer, mesh, rules, *args)
        state['usage'] = jax.device_put(jnp.zeros(cfg.num_codes, jnp.float32), replicated)
        if ema_decay:
            state['ema'] = jax.device_put(vq.ema_init(state['params']['vq']['quantize']['embedding']), replicated)
    else:
        say(f'resumed from step {int(state["step"])} in {ckpt.directory}')
    disc_size = 'off' if disc is None else f'{parallel.num_params(state["params"]["disc"]):,} params'
    say(f'tokenizer: {parallel.num_params(state["params"]["vq"]):,} params, {cfg.resolution}px -> '
        f'{cfg.latent_resolution}x{cfg.latent_resolution} codes from {cfg.num_codes}; discriminator {disc_size}')

    # ---- Update step and hooks ----
    q = config.quantizer
    step = make_step(model, disc, lc, optimizer, t.microbatches, q.restart_every, q.restart_min_count,
                     ema_decay, ema_eps)
    batch_sharding = parallel.logical_sharding(mesh, rules, ('act_batch',))
    train_step = step_lib.jit_train_step(step, state_lib.shardings_of(target), batch_sharding)
    global_batches = _Global(data, mesh, rules)
    writer = metrics_lib.MetricWriter(workdir)
    hooks = [loop.metrics_hook(writer, t.log_every, tokens_per_step=t.batch)]  # "tokens": images here
    if t.eval_every or t.image_every:
        hooks.append(image_hook(model, lambda s: s['params']['vq'], eval_batches, writer, workdir,
                                t.eval_every or t.image_every))

    # ---- Train ----
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, _ = loop.train(state=state, train_step=train_step, data=global_batches, num_steps=t.steps,
                              rng=jax.random.key(config.seed + 1), hooks=hooks, checkpointer=ckpt,
                              progress=t.progress, desc='tokenizer', preemption=preemption)
    ckpt.close()
    writer.close()
    rows = _last_eval(workdir)
    nan = float('nan')
    tqdm.write(f'tokenizer step {int(jax.device_get(state["step"]))}: held-out PSNR {rows.get("eval/psnr", nan):.2f} '
               f'dB, {rows.get("eval/codes_used", nan):.0%} of codes used; {workdir}')
    return rows


class _Global:
    """Host-local batches -> global arrays on the batch axes (keeps get_state / set_state)."""

    def __init__(self, local, mesh, rules):
        self.local, self.put = local, functools.partial(parallel.global_batch, mesh=mesh, rules=rules,
                                                        names=('act_batch',))

    def __next__(self):
        return self.put(next(self.local))

    def get_state(self):
        return self.local.get_state()

    def set_state(self, state):
        self.local.set_state(state)


def _last_eval(workdir) -> dict[str, float]:
    import json
    path = workdir / 'metrics.jsonl'
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return next((r for r in reversed(rows) if 'eval/psnr' in r), {})
