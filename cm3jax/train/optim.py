"""AdamW (or Muon) and learning-rate schedules from config (docs/paper.md, "Training").

Defaults follow the paper: betas (0.9, 0.95), eps 1e-8 (Chameleon: 1e-5), weight decay 0.1 on
matrices only, global-norm clip 1.0, linear warmup then linear decay.

``optim.name='muon'``: the hidden matrices (attention and MLP weights; a task says which through
its ``muon_dims``) take Muon's orthogonalised momentum, scaled to AdamW's update size
(``consistent_rms=0.2``, Liu et al. 2025), so the same learning rate and weight decay carry
over; embeddings, the output head and vectors stay on AdamW (docs/training.md, "Config fields").
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from cm3jax.errors import ConfigError

SCHEDULES = ('constant', 'linear', 'cosine', 'exponential')
OPTIMIZERS = ('adamw', 'muon')
NO_DECAY_NAMES = ('bias', 'scale', 'taps')  # norm gains, biases, Canon taps: vectors even when stacked per layer


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Static optimizer settings; `from_config` reads them from ``config.optim``."""
    learning_rate: float = 3e-4
    name: str = 'adamw'            # one of OPTIMIZERS
    muon_beta: float = 0.95        # Muon's (Nesterov) momentum
    warmup_steps: int = 0
    schedule: str = 'linear'       # decay after warmup: one of SCHEDULES
    decay_steps: int = 0           # steps of decay after warmup
    final_lr_fraction: float = 0.0  # linear/cosine end, and exponential's value after decay_steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0         # global norm; 0 turns clipping off

    @classmethod
    def from_config(cls, optim, total_steps: int) -> 'OptimConfig':
        """``config.optim`` -> OptimConfig; ``decay_steps`` 0 means decay until ``total_steps``."""
        fields = {f.name: optim[f.name] for f in dataclasses.fields(cls) if f.name in optim}
        out = cls(**fields)
        if not out.decay_steps:
            out = dataclasses.replace(out, decay_steps=max(1, total_steps - out.warmup_steps))
        out.validate()
        return out

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f'optim.name={self.name!r} is unknown; choose one of {OPTIMIZERS}')
        if not 0 <= self.muon_beta < 1:
            raise ConfigError(f'optim.muon_beta={self.muon_beta} must be in [0, 1)')
        if self.schedule not in SCHEDULES:
            raise ConfigError(f'optim.schedule={self.schedule!r} is unknown; choose one of {SCHEDULES}')
        if self.learning_rate <= 0:
            raise ConfigError(f'optim.learning_rate={self.learning_rate} must be positive')
        for name in ('warmup_steps', 'decay_steps', 'weight_decay', 'grad_clip'):
            if getattr(self, name) < 0:
                raise ConfigError(f'optim.{name}={getattr(self, name)} must be >= 0')
        if not 0 <= self.final_lr_fraction <= 1:
            raise ConfigError(f'optim.final_lr_fraction={self.final_lr_fraction} must be in [0, 1]')
        if self.schedule == 'exponential' and self.final_lr_fraction == 0:
            raise ConfigError('optim.schedule=exponential needs optim.final_lr_fraction > 0 '
                              '(the factor the rate has decayed by after decay_steps)')
        for name in ('b1', 'b2'):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f'optim.{name}={getattr(self, name)} must be in [0, 1)')


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """The rate of step ``s`` (1-based): linear warmup reaching ``learning_rate`` at step
    ``warmup_steps``, then the decay, reaching its end at ``warmup_steps + decay_steps``."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.final_lr_fraction
    if cfg.schedule == 'constant':
        decay = optax.constant_schedule(peak)
    elif cfg.schedule == 'linear':
        decay = optax.linear_schedule(peak, end, cfg.decay_steps)
    elif cfg.schedule == 'cosine':
        decay = optax.cosine_decay_schedule(peak, cfg.decay_steps, alpha=cfg.final_lr_fraction)
    else:  # keeps decaying past decay_steps, unlike linear and cosine which hold at `end`
        decay = optax.exponential_decay(peak, cfg.decay_steps, cfg.final_lr_fraction)
    if not cfg.warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), decay], [cfg.warmup_steps])


def decay_mask(params):
    """True for matrices (weights and embeddings), False for vectors.

    By name as well as rank, because scanned layers stack per-layer norm gains into [L, d]
    (and per-head QK-norm gains into [L, H, D]), which rank alone would call matrices.
    """
    def is_matrix(path, x):
        name = getattr(path[-1], 'key', getattr(path[-1], 'name', None)) if path else None
        return x.ndim >= 2 and name not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimConfig, mask=decay_mask, muon_dims=None) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW with ``mask`` (a pytree of bools or a function of params)
    choosing which parameters decay; or, with ``cfg.name == 'muon'``, Muon on the matrices
    ``muon_dims(params)`` gives `optax.contrib.MuonDimensionNumbers` for (None elsewhere: those
    take AdamW, undecayed).

    Update ``n`` (optax counts from 0) uses ``schedule(cfg)(n + 1)``, so the first step does
    not get a zero rate from the warmup and the last step gets the decay's end value. Only the
    learning rate is injected into the state (to be logged); the other settings stay static,
    so a resumed run follows its config rather than values stored in the checkpoint.
    """
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
    rate = schedule(cfg)
    if cfg.name == 'muon':
        if muon_dims is None:
            raise ConfigError('optim.name=muon: this task does not say which of its weights are matrices for '
                              'Muon; use optim.name=adamw')
        static = ('muon_weight_dimension_numbers', 'weight_decay_mask', 'beta', 'eps', 'weight_decay',
                  'adam_b1', 'adam_b2', 'consistent_rms')
        muon = optax.inject_hyperparams(optax.contrib.muon, static_args=static)(
            learning_rate=lambda count: rate(count + 1), beta=cfg.muon_beta, eps=cfg.eps,
            weight_decay=cfg.weight_decay, weight_decay_mask=mask, adam_b1=cfg.b1, adam_b2=cfg.b2,
            consistent_rms=0.2, muon_weight_dimension_numbers=muon_dims)
        return optax.chain(clip, muon)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=('mask', 'b1', 'b2', 'eps', 'weight_decay'))(
        learning_rate=lambda count: rate(count + 1), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=mask)
    return optax.chain(clip, adamw)


def current_learning_rate(opt_state) -> jax.Array | None:
    """The learning rate `make_optimizer`'s state holds for the last update, if any."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'hyperparams')):
        if hasattr(s, 'hyperparams'):
            return s.hyperparams['learning_rate']
    return None
