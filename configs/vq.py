"""Image-tokenizer (VQ-GAN) configs (``task='vq'``) for `cm3jax train` (alias `cm3jax train-tokenizer`).

``get_config(arg)`` presets and their launch commands:

  tiny       one-object Shapes scenes at 16x16 -> 8x8 codes from 256 (pixels folded 2x2 into
             channels, every convolution at 8x8), no GAN; reaches 30 dB on held-out scenes with
             nearly every code used in about three minutes on a 2-core CPU (tests/test_vq_train.py).
             cm3jax train --config=configs/vq.py:tiny --workdir=/tmp/vq_tiny
  shapes     the Shapes world the quickstart draws: 1-3 objects at 32x32 -> 8x8 codes from 512
             (4x4 pixel patches); its round trip reads back right under the Shapes judge.
             cm3jax train --config=configs/vq.py:shapes --workdir=runs/vq
  cm3leon    256x256 -> 32x32 codes from 8,192 (docs/paper.md, "Tokenizers"; Make-A-Scene style).
             cm3jax train --config=configs/vq.py:cm3leon --workdir=DIR
                 --config.data.source.root=PHOTOS --config.data.eval="{'root': 'HELD_OUT'}"
  chameleon  512x512 -> 32x32 codes from 8,192, Chameleon's tokenizer shape.
             cm3jax train --config=configs/vq.py:chameleon --workdir=DIR --config.data.source.root=PHOTOS

Any image source trains it (``data.source``, a `cm3jax.data.sources.make_source` spec): your own
pictures with --config.data.source="{'kind': 'folder', 'root': 'PHOTOS', 'resize': 256}" (a folder
whose captions.jsonl lists the images), WebDataset tars or TFDS likewise.
"""

from ml_collections import ConfigDict

MODELS = {  # cm3jax.vq.model.VQConfig fields
    'tiny': dict(resolution=16, patch=2, ch=64, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                 z_channels=64, embed_dim=16, num_codes=256),
    'shapes': dict(resolution=32, patch=4, ch=64, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                   z_channels=64, embed_dim=16, num_codes=512, local_encoder=True),
    'cm3leon': dict(resolution=256, patch=1, ch=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2, attn_resolutions=(32,),
                    z_channels=256, embed_dim=256, num_codes=8192),
    'chameleon': dict(resolution=512, patch=1, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                      attn_resolutions=(32,), z_channels=256, embed_dim=256, num_codes=8192),
}
WORLDS = {  # cm3jax.data.worlds.shapes.ShapesConfig of the small presets' Shapes sources
    'tiny': {'canvas': 16, 'min_objects': 1, 'max_objects': 1},
    'shapes': {'canvas': 32, 'min_objects': 1, 'max_objects': 3},
}
STEPS = {'tiny': 500, 'shapes': 1000}


def get_config(arg: str = 'tiny') -> ConfigDict:
    if arg not in MODELS:
        raise ValueError(f'unknown preset {arg!r} in configs/vq.py:{arg}; choose from {sorted(MODELS)}')
    small = arg in WORLDS
    config = ConfigDict()
    config.task = 'vq'  # cm3jax.trainers: which Task trains this config
    config.seed = 0
    config.model = ConfigDict({'in_channels': 3, 'out_channels': 3, 'beta': 0.25, 'l2_normalize': False,
                               'norm_groups': 32, **MODELS[arg]})
    config.loss = ConfigDict({
        'reconstruction': 'l2' if small else 'l1',  # 'l1' (taming) | 'l2' (what PSNR measures)
        'codebook_weight': 1.0,
        'entropy_weight': 0.0,       # MaskGIT's codebook entropy penalty
        'entropy_temperature': 0.01,
        'disc_weight': 0.0 if small else 0.8,  # 0 turns the GAN off
        'disc_start': 0 if small else 30_000,  # steps before the discriminator joins (taming)
        'disc_loss': 'hinge',        # 'hinge' | 'vanilla'
        'adaptive_weight': True,     # taming's ratio of last-layer gradient norms
        'disc_ndf': 32 if small else 64,
        'disc_layers': 2 if small else 3,
    })
    config.quantizer = ConfigDict({
        'restart_every': 100, 'restart_min_count': 1.0,  # dead-code restart; 0 = off
        'ema_decay': 0.0,  # EMA codebook (VQ-VAE-2), e.g. 0.99, instead of its gradient; 0 = off, must be < 1
        'ema_eps': 1e-5,   # the EMA's Laplace smoothing of code counts
    })
    config.optim = ConfigDict({  # cm3jax.train.optim.OptimConfig; taming's Adam (0.5, 0.9) steadies the GAN
        'learning_rate': 5e-3 if small else 1e-4, 'warmup_steps': 50 if small else 1000, 'schedule': 'cosine',
        'decay_steps': 0, 'final_lr_fraction': 0.05, 'b1': 0.9 if small else 0.5, 'b2': 0.99 if small else 0.9,
        'eps': 1e-8, 'weight_decay': 0.0, 'grad_clip': 1.0,
    })
    steps = STEPS.get(arg, 500_000)
    config.train = ConfigDict({
        'steps': steps,
        'batch': 32 if small else 64,
        'microbatches': 1,
        'log_every': 50,
        'eval_every': steps if small else 5000,
        'eval_batches': 4,
        'image_every': steps if small else 5000,  # reconstruction grids (PNG + TensorBoard); 0 = off
        'checkpoint_every': steps if small else 5000,
        'checkpoint_minutes': 0.0 if small else 30.0,
        'keep': 3,
        'async_checkpoint': True,
        'progress': True,
    })
    # Images (cm3jax.vq.train): each document's first image; `eval` overrides `source` for the
    # held-out images (PSNR, code usage, reconstruction grids); {} evaluates on the first training images.
    config.data = ConfigDict({
        'source': ({'kind': 'shapes', 'split': 'train', 'seed': 0, 'cfg': WORLDS[arg]} if small else
                   {'kind': 'folder', 'root': '', 'resize': MODELS[arg]['resolution']}),
        'eval': {'split': 'validation'} if small else {},
        'shuffle_buffer': 0 if small else 10_000,  # Shapes scenes are i.i.d.; folders come in file order
    })
    config.mesh = ConfigDict({'ici': (1, -1, 1), 'dcn': (1, 1, 1)})  # images split over data x fsdp
    config.sharding = ConfigDict({'rules': ()})
    return config
