"""The main job (``task='quickstart'``): `cm3jax quickstart` from nothing to pictures drawn from
captions and captions written for pictures, on the Shapes world, judged exactly.

``get_config(arg)`` presets and their launch commands:

  default  what `make demo` runs: 32x32 scenes of 1-3 objects, two (shape, colour) pairs held
           out of training; 30 minutes on a slow 2-core CPU (2026-12-07), about 12 estimated on
           the fastest seen (docs/quickstart.md, "What was measured").
           cm3jax quickstart --config=configs/quickstart.py
  tiny     the same stages at toy size (a minute or two), for tests and a first look.
           cm3jax quickstart --config=configs/quickstart.py:tiny --config.out=/tmp/qs

Every stage runs a cm3jax command's own function on a whole preset config held here (``vq``,
``retriever``, ``lm``), so any of their fields can be changed from the command line:
``--config.lm.train.steps=3000``, ``--config.vq.model.num_codes=1024``. What ties the stages
together (the world's images and captions, the data directories, the vocab size, the seed, the
mesh) is set by the quickstart itself. The stages write into ``out``; a second run reuses the
finished ones, and a run stopped midway continues where it was.
"""

from ml_collections import ConfigDict

from configs import clip as clip_configs, lm as lm_configs, vq as vq_configs

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
    config.data = ConfigDict({'train': 2000 if tiny else 24_000, 'eval': 128 if tiny else 512,
                              'bpe_vocab': 300 if tiny else 400})

    # Stage 2, the image tokenizer: configs/vq.py with these changes (its images come from `world`).
    config.vq = vq_configs.get_config('tiny' if tiny else 'shapes')
    config.vq.model.local_encoder = True  # one code per patch, whatever surrounds it (docs/quickstart.md)
    if tiny:
        config.vq.model.ch = 32
    config.vq.train.update(steps=80 if tiny else 600, progress=True)
    # Stage 4, the retriever: configs/clip.py:tiny with these changes (its pairs come from `world`).
    config.retriever = clip_configs.get_config('tiny')
    # 450 steps: re-ranking 0.559 at 300, 0.621 at 600, 0.617 at 900 on one demo's samples (450: the
    # wall-time budget, docs/quickstart.md)
    config.retriever.train.update(steps=40 if tiny else 450, batch=32 if tiny else 96)
    config.retriever.data.eval_size = 32 if tiny else 256
    config.index = ConfigDict({'top_m': 4})
    # Stage 5, the LM: configs/lm.py:tiny, wider, with CM3, retrieval augmentation and caption dropout.
    config.lm = lm_configs.get_config('tiny')
    config.lm.model.update(num_layers=2, d_model=64 if tiny else 128, num_heads=4, mlp_dim=256 if tiny else 512,
                           max_len=192, image_positions=64)  # 8x8 codes; their ids are set from the data
    if not tiny:  # RoPE and a 0.02 init, not CM3leon's learned positions at std 2e-4 (docs/quickstart.md, "Why")
        config.lm.model.update(position='rope', init_std=0.02)
        # Canon layers before attention and MLP: with Muon at 6e-3 they are what makes the LM bind each
        # colour to its shape (binding probe 0.555 -> 0.973; text-to-image 0.691 -> 0.836, two objects
        # 0.355 -> 0.660 on the same stages; docs/quickstart.md, "Binding")
        config.lm.model.canon = 'AC'
    # Batch 32 for 1400 steps beats 64 for 700 at the same tokens, and more steps keep paying (AdamW:
    # text-to-image 0.156 at 1400, 0.355 at 2800, 0.633 at 5600; with Canon layers and Muon at 6e-3,
    # 0.836 at 2400 and 0.855 at 3600, captions 0.914 -> 0.969; docs/quickstart.md, "Binding").
    config.lm.train.update(steps=300 if tiny else 3600, batch=32, seq_len=96,
                           eval_every=300 if tiny else 1200, checkpoint_every=150 if tiny else 1200, log_every=10)
    # Muon on the attention and MLP matrices: at the same steps, text-to-image 0.480 -> 0.680 and
    # captions 0.824 -> 0.883 against AdamW (docs/quickstart.md, "What was measured"). Its peak lr
    # 6e-3 (not 2e-3) with Canon layers: binding emerges at 4e-3 and is strongest at 6e-3-8e-3.
    config.lm.optim.update(learning_rate=3e-3 if tiny else 6e-3, warmup_steps=10 if tiny else 100,
                           final_lr_fraction=0.0, name='muon')
    # CM3 spans in 5% of documents (Poisson rate 0.05), not 18% (0.2): on the same stages two-object
    # pictures 0.359 -> 0.453 and captions 0.859 -> 0.895 (none at all: 0.449 and 0.918; docs/quickstart.md)
    config.lm.data.update(caption_dropout=0.15, cm3_rate=0.5 if tiny else 0.05, retrieved='0', text_first=0.5)
    # Stages 6-8: sampling, captioning and judging.
    config.sample = ConfigDict({
        'prompts': 16 if tiny else 256,      # captions per measured set (each accuracy's sample size)
        'num': 8,                            # samples per prompt; the best by CLIP score is the re-ranked one
        # CFG 2, temperature 0.5: the sweep's best single sample and re-ranked on the Muon-trained
        # model; on 256 captions 0.707 single against 0.680 at temperature 1 (docs/quickstart.md, "Sampling")
        'cfg_scale': 1.5 if tiny else 2.0, 'temperature': 1.0 if tiny else 0.5, 'top_p': 0.9, 'top_k': 0,
        'mode': 'sample', 'cdk_k': 2, 'cdk_alpha': 0.5,
        'grid_prompts': 8,                   # rows of samples.png
        'captions': 16 if tiny else 256,     # held-out images captioned
    })
    config.mesh = ConfigDict({'ici': (1, -1, 1), 'dcn': (1, 1, 1)})
    return config
