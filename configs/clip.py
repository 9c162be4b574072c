"""CLIP retriever configs (``task='retriever'``) for `cm3jax train` (docs/paper.md, "Retrieval
augmentation": the frozen bi-encoder that retrieval augmentation searches with, and the CLIP
score that re-ranks samples).

``get_config(arg)`` presets and their launch commands:

  tiny     a small ViT (patch 4) + text transformer for 32x32 Shapes scenes of 1-2 objects, with a
           BPE trained on the captions; reaches held-out text->image recall@1 of 0.836 in 1600
           steps, about nine minutes on one core of a 2-core CPU (tests/test_retriever_learns.py
           trains 800 of them, which reached 0.398 or 0.684, before or after the climb
           from the plateau near 0.35 that docs/retrieval.md describes).
           cm3jax train --config=configs/clip.py:tiny --workdir=/tmp/clip_tiny
  vit_b32  OpenAI's ViT-B/32 shapes (224x224, 77 tokens), with OpenAI's tokenizer.json; give
           ``init_from`` a directory of converted HF weights to fine-tune them:
           cm3jax train --config=configs/clip.py:vit_b32 --workdir=DIR
               --config.init_from=/data/clip-vit-base-patch32
               --config.data.source.kind=folder --config.data.source.root=PHOTOS
           (the tokenizer then defaults to init_from/tokenizer.json).

Load the result with `cm3jax.retrieval.load.load_retriever(workdir)`.
"""

import math

from ml_collections import ConfigDict

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SHAPES_WORLD = {'canvas': 32, 'min_objects': 1, 'max_objects': 2}  # cm3jax.data.worlds.shapes.ShapesConfig


def get_config(arg: str = 'tiny') -> ConfigDict:
    if arg not in ('tiny', 'vit_b32'):
        raise ValueError(f'unknown preset {arg!r} in configs/clip.py:{arg}; choose from tiny, vit_b32')
    tiny = arg == 'tiny'
    config = ConfigDict()
    config.task = 'retriever'  # cm3jax.trainers: which Task trains this config
    config.seed = 0
    config.init_from = ''  # a retriever workdir or HF CLIP weights to start from (fresh optimizer)
    # cm3jax.retrieval.clip.ClipConfig fields; vocab_size, eos_token_id and pooling come from the
    # text tokenizer (cm3jax.retrieval.load.clip_config). vocab_multiple pads the embedding table.
    if tiny:
        config.model = ConfigDict({
            'image_size': 32, 'patch_size': 4, 'vision_width': 64, 'vision_layers': 2, 'vision_heads': 2,
            'vision_mlp_dim': 128,
            'max_len': 16, 'text_width': 64, 'text_layers': 2, 'text_heads': 4, 'text_mlp_dim': 128,
            'projection_dim': 64, 'activation': 'gelu', 'logit_scale_init': math.log(1 / 0.07),
            # Shapes are flat colours on grey: pixels in [0, 1] as they are, not OpenAI's photo statistics
            'image_mean': (0.0, 0.0, 0.0), 'image_std': (1.0, 1.0, 1.0),
            'dtype': 'float32', 'vocab_multiple': 128,
            'scan_unroll': 2,  # both layers in one loop body: XLA:CPU's scan residual copies cost ~10% a step
            'text_canon': '', 'text_canon_taps': (1, 2, 3),  # Canon layers in the text tower ('' = off, as CLIP)
        })
    else:  # ViT-B/32: the shapes of openai/clip-vit-base-patch32, so its converted weights load
        config.model = ConfigDict({
            'image_size': 224, 'patch_size': 32, 'vision_width': 768, 'vision_layers': 12, 'vision_heads': 12,
            'vision_mlp_dim': 3072,
            'max_len': 77, 'text_width': 512, 'text_layers': 12, 'text_heads': 8, 'text_mlp_dim': 2048,
            'projection_dim': 512, 'activation': 'quick_gelu', 'logit_scale_init': math.log(1 / 0.07),
            'image_mean': OPENAI_MEAN, 'image_std': OPENAI_STD,
            'dtype': 'float32', 'vocab_multiple': 128, 'scan_unroll': 1, 'text_canon': '', 'text_canon_taps': (1, 2, 3),
        })
    # Text tokenizer: `file`, a tokenizer.json you bring (e.g. HF CLIP's, whose <|startoftext|> and
    # <|endoftext|> are used as CLIP uses them), or '' to train a byte-level BPE of `vocab_size` on
    # the first `train_documents` captions of the training source. Written to WORKDIR/tokenizer.json.
    config.tokenizer = ConfigDict({'file': '', 'vocab_size': 512, 'train_documents': 5000})
    config.data = ConfigDict({
        # cm3jax.data.sources.make_source: a document gives its first image and first caption; its
        # images must already be model.image_size square (shapes: cfg.canvas, digits: size,
        # folder/webdataset: resize).
        'source': ({'kind': 'shapes', 'split': 'train', 'seed': 0, 'cfg': dict(SHAPES_WORLD)} if tiny else
                   {'kind': 'folder', 'root': '', 'resize': 224}),
        # held-out sets for recall@1/@5: name -> overrides of `source`; the first eval_size pairs
        'eval': ({'validation': {'split': 'validation'}, 'held_out': {'split': 'held_out'}} if tiny else {}),
        'eval_size': 256,
        'shuffle_buffer': 0 if tiny else 10_000,  # Shapes scenes are i.i.d.; folders come in file order
        # the fraction of each batch that is hard-negative twins of the rest (Shapes sources only;
        # cm3jax.data.worlds.twins): the same scene with one stated thing changed
        'twins': 0.0,
        # each pair's binding negative (Shapes sources only; NegCLIP): its caption with two objects'
        # shapes swapped, one more text its image must score below its own caption
        'binding_negatives': False,
    })
    # AdamW (cm3jax.train.optim.OptimConfig); CLIP's betas (0.9, 0.98) and eps 1e-6.
    config.optim = ConfigDict({
        'learning_rate': 3e-3 if tiny else 1e-5, 'warmup_steps': 50 if tiny else 500, 'schedule': 'cosine',
        'decay_steps': 0, 'final_lr_fraction': 0.05, 'b1': 0.9, 'b2': 0.98, 'eps': 1e-6,
        'weight_decay': 0.1 if tiny else 0.2, 'grad_clip': 1.0,
    })
    config.train = ConfigDict({
        'steps': 1600 if tiny else 10_000,
        'batch': 96 if tiny else 256,  # global pairs per step: the in-batch negatives
        'microbatches': 1,  # > 1: each microbatch is its own contrastive batch (fewer negatives)
        'log_every': 50,
        'eval_every': 400 if tiny else 1000,  # recall on data.eval; also at step 0 (the random encoder)
        'checkpoint_every': 800 if tiny else 1000,
        'checkpoint_minutes': 0.0 if tiny else 30.0,
        'keep': 3,
        'async_checkpoint': True,
        'progress': True,
    })
    config.mesh = ConfigDict({'ici': (1, -1, 1), 'dcn': (1, 1, 1)})  # pairs split over data x fsdp
    config.sharding = ConfigDict({'rules': ()})  # () = cm3jax.parallel.DEFAULT_RULES
    return config
