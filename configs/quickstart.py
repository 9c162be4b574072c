"""The main job (``task='quickstart'``): `cm3jax quickstart` from nothing to pictures drawn from
captions and captions written for pictures, on the Shapes world, judged exactly.

``get_config(arg)`` presets and their launch commands:

  default  what `make demo` runs: 32x32 scenes of 1-3 objects, two (shape, colour) pairs held
           out of training; about ten minutes on a 2-core CPU.
           cm3jax quickstart --config=configs/quickstart.py
  tiny     the same stages at toy size (a minute or two), for tests and a first look.
           cm3jax quickstart --config=configs/quickstart.py:tiny --config.out=/tmp/qs

Every stage runs a cm3jax command's own function on a preset, with the overrides below, so any
field of those presets can be changed here: ``--config.lm.train.steps=3000``,
``--config.vq.model.num_codes=1024``. The stages write into ``out``; a second run reuses the
finished ones, and a run stopped midway continues where it was.
"""

from ml_collections import ConfigDict

# The Shapes world (cm3jax.data.worlds.shapes.ShapesConfig fields) the demo draws and judges.
WORLD = {'canvas': 32, 'min_objects': 1, 'max_objects': 3}


def get_config(arg: str = 'default') -> ConfigDict:
    if arg not in ('default', 'tiny'):
        raise ValueError(f'unknown preset {arg!r} in configs/quickstart.py:{arg}; choose from default, tiny')
    tiny = arg == 'tiny'
    config = ConfigDict()
    config.task = 'quickstart'
    config.seed = 0
    config.out = 'out/quickstart'
    config.world = ConfigDict(WORLD if not tiny else {'canvas': 16, 'min_objects': 1, 'max_objects': 1})
    # documents drawn for each prepared split: the LM's training data and its held-out loss
    config.data = ConfigDict({'train': 1000 if tiny else 60_000, 'eval': 128 if tiny else 512,
                              'bpe_vocab': 300 if tiny else 400})

    # Stage 2, the image tokenizer: configs/vq.py:PRESET with these overrides.
    config.vq = ConfigDict({'preset': 'tiny' if tiny else 'shapes',
                            'train': {'steps': 40 if tiny else 1000}})
    # Stage 4, the retriever: configs/clip.py:tiny with these overrides.
    config.retriever = ConfigDict({'train': {'steps': 40 if tiny else 500, 'batch': 32 if tiny else 96},
                                   'data': {'eval_size': 32 if tiny else 256}})
    config.index = ConfigDict({'top_m': 4})
    # Stage 5, the LM: configs/lm.py:tiny with these overrides (CM3, retrieval, caption dropout).
    config.lm = ConfigDict({
        'model': {'num_layers': 2, 'd_model': 64 if tiny else 128, 'num_heads': 4, 'mlp_dim': 256 if tiny else 512,
                  'max_len': 192},
        'train': {'steps': 80 if tiny else 3000, 'batch': 16 if tiny else 64, 'seq_len': 192 if not tiny else 96,
                  'eval_every': 80 if tiny else 1000, 'checkpoint_every': 40 if tiny else 500, 'log_every': 10},
        'optim': {'learning_rate': 3e-3 if tiny else 2e-3, 'warmup_steps': 10 if tiny else 100,
                  'final_lr_fraction': 0.0},
        'data': {'caption_dropout': 0.15, 'cm3_rate': 0.5, 'retrieved': '0' if tiny else '0,0,0,1',
                 'text_first': 0.5},
    })
    # Stages 6-8: sampling, captioning and judging.
    config.sample = ConfigDict({
        'prompts': 16 if tiny else 256,      # captions per measured set (each accuracy's sample size)
        'num': 8,                            # samples per prompt; the best by CLIP score is the re-ranked one
        'cfg_scale': 1.5, 'temperature': 0.5, 'top_p': 0.9, 'top_k': 0,
        'mode': 'mixed', 'cdk_k': 8, 'cdk_alpha': 0.5,
        'grid_prompts': 8,                   # rows of samples.png
        'captions': 16 if tiny else 256,     # held-out images captioned
    })
    config.mesh = ConfigDict({'ici': (1, -1, 1), 'dcn': (1, 1, 1)})
    return config
