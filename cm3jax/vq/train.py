"""The VQ-GAN image tokenizer's `Task` (taming's recipe) for `cm3jax.train.run`.

The generator (encoder, quantizer, decoder) and the PatchGAN discriminator are one parameter
tree ``{'vq', 'disc'}`` with one optimizer and one loss: each player's term stops the gradient
into the other's parameters, so the gradient of the sum is exactly (generator grads, discriminator
grads). That keeps `cm3jax.train.step` (accumulation, NaN guard), `loop`, `checkpoint` and
`metrics` unchanged. What is not a gradient step, the EMA codebook and the dead-code restart,
wraps the step, and their state (code usage, the EMA's averages) is the task's extra state.

Images come from any document source (``config.data.source``, a `cm3jax.data.sources.make_source`
spec: the Shapes world, digits, an image folder, WebDataset tars, TFDS), each document's first
image, which must be ``model.resolution`` square (folders, tars and TFDS resize with
``data.source.resize``). Corrupt records are skipped, counted and reported. Held-out images for
PSNR, code usage and the reconstruction grids: ``data.eval``, overrides of the source.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.data import batches as batches_lib
from cm3jax.data.sources import make_source
from cm3jax.errors import ConfigError
from cm3jax.train import loop, metrics as metrics_lib, step as step_lib
from cm3jax.train.run import Env, Task
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
        raise ConfigError(f'quantizer.ema_decay={decay} must be in [0, 1): 0 turns the EMA codebook off, '
                         f'values like 0.99 turn it on (the weight kept from the old average each step)')
    if decay and not eps > 0.0:
        raise ConfigError(f'quantizer.ema_eps={eps} must be > 0 (the Laplace smoothing that keeps unused codes '
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




# ---- The task -----------------------------------------------------------------------------------

class Tokenizer(NamedTuple):
    """What `build` gives the rest of the task (``env.model``)."""
    model: vq.VQGAN
    disc: losses.NLayerDiscriminator | None
    ema_decay: float
    ema_eps: float

    @property
    def cfg(self) -> vq.VQConfig:
        return self.model.cfg


def build(env: Env) -> Tokenizer:
    config = env.config
    lc = config.loss
    cfg = vq_config(config)
    ema_decay, ema_eps = ema_settings(config.quantizer)
    disc = losses.NLayerDiscriminator(ndf=lc.disc_ndf, n_layers=lc.disc_layers) if lc.disc_weight else None
    env.say(f'tokenizer: {cfg.resolution}px -> {cfg.latent_resolution}x{cfg.latent_resolution} codes from '
            f'{cfg.num_codes}; discriminator {"on" if disc else "off"}; EMA codebook '
            f'{f"decay {ema_decay}" if ema_decay else "off"}')
    return Tokenizer(vq.VQGAN(cfg), disc, ema_decay, ema_eps)


def init(env: Env, rng: jax.Array) -> dict:
    tok = env.model
    x = jnp.zeros((1, tok.cfg.resolution, tok.cfg.resolution, tok.cfg.in_channels))
    params = {'vq': tok.model.init(jax.random.fold_in(rng, 0), x)['params']}
    if tok.disc is not None:
        params['disc'] = tok.disc.init(jax.random.fold_in(rng, 1), x)['params']
    return params


def extra_state(env: Env, params) -> dict:
    """Code usage since the last restart, and the EMA's averages when it is on (only then, so
    checkpoints without the EMA keep their layout)."""
    tok = env.model
    extra = {'usage': jnp.zeros(tok.cfg.num_codes, jnp.float32)}
    if tok.ema_decay:
        extra['ema'] = vq.ema_init(params['vq']['quantize']['embedding'])
    return extra


def step(env: Env, optimizer) -> callable:
    tok, q = env.model, env.config.quantizer
    return make_step(tok.model, tok.disc, env.config.loss, optimizer, env.config.train.microbatches,
                     q.restart_every, q.restart_min_count, tok.ema_decay, tok.ema_eps)


def _example(env: Env):
    cfg = env.model.cfg
    return batches_lib.first_image(cfg.resolution, 'data.source', 'model.resolution', cfg.in_channels)


def train_data(env: Env) -> batches_lib.SourceBatches:
    d = env.config.data
    source = make_source({**d.source.to_dict(), 'shard': (jax.process_index(), jax.process_count())})
    return batches_lib.SourceBatches(source, env.config.train.batch // jax.process_count(), _example(env),
                                     shuffle_buffer=d.shuffle_buffer, seed=env.config.seed)


def held_out(env: Env) -> list[dict]:
    """The fixed held-out batches (``train.eval_batches`` of ``train.batch`` images) of
    ``data.source`` with ``data.eval``'s overrides, the same on every process."""
    d, t = env.config.data, env.config.train
    try:
        source = make_source({**d.source.to_dict(), **d.eval.to_dict()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f'data.eval={d.eval.to_dict()} does not fit data.source ({e}); give overrides of '
                          f'data.source for the held-out images (e.g. "{{\'root\': \'HELD_OUT\'}}" for a folder), '
                          f'or "{{}}" to evaluate on the first training images') from None
    images, _ = batches_lib.take(source, t.eval_batches * t.batch, _example(env), 'data.eval')
    stacked = batches_lib.stack(images)['images']
    return [{'images': stacked[i:i + t.batch]} for i in range(0, len(stacked), t.batch)]


def evals(env: Env, writer: metrics_lib.MetricWriter) -> list[loop.Hook]:
    t = env.config.train
    every = t.eval_every or t.image_every
    if not every:
        return []
    fixed = held_out(env)
    return [image_hook(env.model.model, lambda s: s['params']['vq'], lambda: fixed, writer, env.workdir, every)]


def summary(env: Env, scalars: dict) -> tuple[dict, str]:
    nan = float('nan')
    return scalars, (f'held-out PSNR {scalars.get("eval/psnr", nan):.2f} dB, '
                     f'{scalars.get("eval/codes_used", nan):.0%} of codes used')


def task(config) -> Task:
    """The image tokenizer for `cm3jax.train.run.run` (``config.task == 'vq'``; configs/vq.py)."""
    del config  # everything is read from env.config once the mesh exists
    return Task(name='tokenizer', build=build, init=init, train_data=train_data, step=step,
                extra_state=extra_state, evals=evals, summary=summary, batch_axes=('act_batch',))
