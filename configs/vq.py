"""Image-tokenizer (VQ-GAN) configs for `cm3jax train-tokenizer`.

``get_config(arg)`` presets and their launch commands:

  tiny       16x16 images -> 8x8 codes from 256, no GAN; reaches 30 dB on procedural shapes in about
             ten minutes on a 2-core CPU.
             cm3jax train-tokenizer --config=configs/vq.py:tiny --workdir=/tmp/vq_tiny
  cm3leon    256x256 -> 32x32 codes from 8,192 (PAPER.md section 1, Make-A-Scene style).
             cm3jax train-tokenizer --config=configs/vq.py:cm3leon --workdir=DIR
  chameleon  512x512 -> 32x32 codes from 8,192, Chameleon's tokenizer shape.
             cm3jax train-tokenizer --config=configs/vq.py:chameleon --workdir=DIR
"""

from ml_collections import ConfigDict

PRESETS = {  # resolution, ch, ch_mult, attn_resolutions, z_channels, embed_dim, num_codes
    'tiny': (16, 32, (1, 2), (), 32, 16, 256),
    'cm3leon': (256, 128, (1, 1, 2, 4), (32,), 256, 256, 8192),
    'chameleon': (512, 128, (1, 1, 2, 2, 4), (32,), 256, 256, 8192),
}


def get_config(arg: str = 'tiny') -> ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f'unknown preset {arg!r} in configs/vq.py:{arg}; choose from {sorted(PRESETS)}')
    resolution, ch, ch_mult, attn, z, embed, codes = PRESETS[arg]
    tiny = arg == 'tiny'
    config = ConfigDict()
    config.seed = 0
    config.model = ConfigDict({  # cm3jax.vq.model.VQConfig
        'resolution': resolution, 'in_channels': 3, 'out_channels': 3, 'ch': ch, 'ch_mult': ch_mult,
        'num_res_blocks': 1 if tiny else 2, 'attn_resolutions': attn, 'z_channels': z, 'embed_dim': embed,
        'num_codes': codes, 'beta': 0.25, 'l2_normalize': False,
    })
    config.loss = ConfigDict({
        'reconstruction': 'l2' if tiny else 'l1',  # 'l1' (taming) | 'l2' (what PSNR measures)
        'codebook_weight': 1.0,
        'entropy_weight': 0.0,       # MaskGIT's codebook entropy penalty
        'entropy_temperature': 0.01,
        'disc_weight': 0.0 if tiny else 0.8,  # 0 turns the GAN off
        'disc_start': 0 if tiny else 30_000,  # steps before the discriminator joins (taming)
        'disc_loss': 'hinge',        # 'hinge' | 'vanilla'
        'adaptive_weight': True,     # taming's ratio of last-layer gradient norms
        'disc_ndf': 32 if tiny else 64,
        'disc_layers': 2 if tiny else 3,
    })
    config.quantizer = ConfigDict({
        'restart_every': 100, 'restart_min_count': 1.0,  # dead-code restart; 0 = off
        'ema_decay': 0.0,  # EMA codebook (VQ-VAE-2), e.g. 0.99, instead of its gradient; 0 = off, must be < 1
        'ema_eps': 1e-5,   # the EMA's Laplace smoothing of code counts
    })
    config.optim = ConfigDict({  # cm3jax.train.optim.OptimConfig; taming's Adam (0.5, 0.9) steadies the GAN
        'learning_rate': 5e-3 if tiny else 1e-4, 'warmup_steps': 50 if tiny else 1000, 'schedule': 'cosine',
        'decay_steps': 0, 'final_lr_fraction': 0.05, 'b1': 0.9 if tiny else 0.5, 'b2': 0.99 if tiny else 0.9,
        'eps': 1e-8, 'weight_decay': 0.0, 'grad_clip': 1.0,
    })
    config.train = ConfigDict({
        'steps': 1800 if tiny else 500_000,
        'batch': 32 if tiny else 64,
        'microbatches': 1,
        'log_every': 50,
        'eval_every': 600 if tiny else 5000,
        'eval_batches': 4,
        'image_every': 600 if tiny else 5000,  # reconstruction grids (PNG + TensorBoard); 0 = off
        'checkpoint_every': 600 if tiny else 5000,
        'checkpoint_minutes': 0.0 if tiny else 30.0,
        'keep': 3,
        'async_checkpoint': True,
        'progress': True,
    })
    config.data = ConfigDict({'source': 'shapes'})  # procedural flat-colour shapes (cm3jax.data.synthetic)
    config.mesh = ConfigDict({'ici': (1, -1, 1), 'dcn': (1, 1, 1)})  # images split over data x fsdp
    config.sharding = ConfigDict({'rules': ()})
    return config
