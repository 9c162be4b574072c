"""Language-model configs (``task='lm'``): CM3leon sizes (docs/paper.md, "Model"), and Chameleon's switches.

``get_config(arg)``: ``arg`` is a size preset, optionally followed by ``,chameleon`` to turn
on Chameleon's architecture switches at that size (``tiny,chameleon``).

Presets and their launch commands (override any field with ``--config.FIELD=VALUE``):

  tiny           2 layers, d_model 64; the tests and the quickstart (configs/quickstart.py) start from it.
                 cm3jax train --config=configs/lm.py:tiny --workdir=/tmp/cm3jax_tiny
  cm3leon_350m   24 layers, d_model 1024, 16 heads, seq 4096.
                 cm3jax train --config=configs/lm.py:cm3leon_350m --workdir=DIR --config.mesh.ici="(1,-1,1)"
  cm3leon_760m   24 layers, d_model 1536, 16 heads, seq 4096.
                 cm3jax train --config=configs/lm.py:cm3leon_760m --workdir=DIR --config.mesh.ici="(1,-1,1)"
  cm3leon_7b     32 layers, d_model 4096, 32 heads, seq 4096; FSDP x tensor parallel.
                 cm3jax train --config=configs/lm.py:cm3leon_7b --workdir=DIR --config.mesh.ici="(1,-1,4)" --config.model.dtype=bfloat16
  chameleon      Chameleon-7B (also chameleon_7b): RMSNorm, SwiGLU (11008), RoPE, QK-norm, 65,536 ids, z-loss 1e-5.
                 cm3jax train --config=configs/lm.py:chameleon --workdir=DIR --config.mesh.ici="(1,-1,4)" --config.model.dtype=bfloat16
  chameleon_34b  Chameleon-34B: 48 layers, d_model 8192, 64 heads (8 kv heads), SwiGLU 22016, swin norm.
                 cm3jax aot --config=configs/lm.py:chameleon_34b --devices=256 --config.train.batch=256
  converted=DIR  the config a `cm3jax convert chameleon` directory holds (its model's exact shape), to
                 fine-tune it: cm3jax train --config=configs/lm.py:converted=DIR --init_from=DIR --workdir=RUN
                 --config.data.dir=SHARDS (data prepared with DIR's tokenizer and vocab)
"""

import json
import pathlib

from ml_collections import ConfigDict

# CM3leon's joint vocabulary: 56,320 text ids (docs/paper.md, "Tokenizers") plus 8,192 image codes.
CM3LEON_VOCAB = 56_320 + 8_192
CHAMELEON_VOCAB = 65_536  # BPE that already holds the 8,192 image codes
PEAK_LR = {'cm3leon_350m': 6e-4, 'cm3leon_760m': 5e-4, 'cm3leon_7b': 1.2e-4, 'chameleon': 1.2e-4,
           'chameleon_34b': 1.2e-4}  # 34B: the 7B's until a run says otherwise

SIZES = {  # name: (num_layers, d_model, num_heads)
    'tiny': (2, 64, 4),
    'cm3leon_350m': (24, 1024, 16),
    'cm3leon_760m': (24, 1536, 16),
    'cm3leon_7b': (32, 4096, 32),
    'chameleon': (32, 4096, 32),
    'chameleon_34b': (48, 8192, 64),
}
ALIASES = {'chameleon_7b': 'chameleon'}


def get_config(arg: str = 'tiny') -> ConfigDict:
    if arg.startswith('converted='):
        return converted(arg[len('converted='):])
    size, *modifiers = [part.strip() for part in arg.split(',')]
    size = ALIASES.get(size, size)
    if size not in SIZES:
        raise ValueError(f'unknown preset {size!r} in configs/lm.py:{arg}; choose from {sorted([*SIZES, *ALIASES])}')
    unknown = set(modifiers) - {'chameleon'}
    if unknown:
        raise ValueError(f'unknown modifier(s) {sorted(unknown)} in configs/lm.py:{arg}; the only one is "chameleon"')
    layers, d_model, heads = SIZES[size]

    config = ConfigDict()
    config.task = 'lm'  # cm3jax.trainers: which Task trains this config
    config.seed = 0
    config.model = m = ConfigDict()
    m.vocab_size = 512 if size == 'tiny' else CM3LEON_VOCAB
    m.vocab_multiple = 128  # padded up further so the mesh axes of 'vocab' divide it
    m.num_layers = layers
    m.d_model = d_model
    m.num_heads = heads
    m.num_kv_heads = heads
    m.mlp_dim = 4 * d_model
    m.max_len = 128 if size == 'tiny' else 4096
    m.norm = 'layernorm'
    m.norm_params = False
    m.norm_eps = 1e-5
    m.norm_placement = 'pre'
    m.mlp = 'gelu'
    m.position = 'learned'
    m.rope_theta = 10_000.0
    m.qk_norm = False
    m.qk_norm_eps = 1e-5
    m.tie_embeddings = True
    m.init_std = 0.006
    m.pos_init_std = 2e-4
    m.zero_init_out = True
    m.attention = 'xla'  # 'xla' | 'cudnn' (NVIDIA GPU) | 'splash' (TPU)
    m.scan_layers = True
    # layers per scan iteration, params stacked either way; a tiny model unrolls them all, which
    # spares XLA:CPU the loop's residual copies (~7% of a quickstart LM step)
    m.scan_unroll = 8 if size == 'tiny' else 1
    m.remat = 'none' if size == 'tiny' else 'full'
    # a learned embedding of each image code's place in its image, added to its token's
    # (cm3jax.model.transformer.image_index); 0 = off, as in CM3leon and Chameleon. When on,
    # image_ids = [start, stop) of the data's image-code ids, and image_positions >= codes per image.
    m.image_positions = 0
    m.image_ids = (0, 0)
    # Canon layers: a causal short convolution over the previous `canon_taps` tokens on the
    # residual stream, before each attention ('A') and/or MLP ('C') (cm3jax.model.layers.Canon);
    # '' = off, as in CM3leon and Chameleon
    m.canon = ''
    m.canon_taps = (1, 2, 3)
    m.dtype = 'float32'  # compute dtype; params stay float32
    m.param_dtype = 'float32'

    config.loss = ConfigDict({'z_loss': 0.0})
    config.mesh = ConfigDict({'ici': (1, -1, 1), 'dcn': (1, 1, 1)})  # ('data', 'fsdp', 'tensor')
    config.sharding = ConfigDict({'rules': ()})  # () = cm3jax.parallel.DEFAULT_RULES

    # AdamW and the schedule (docs/paper.md, "Training"; `cm3jax.train.optim.OptimConfig`).
    config.optim = ConfigDict({
        'learning_rate': 3e-3 if size == 'tiny' else PEAK_LR.get(size, 3e-4),
        'name': 'adamw',          # or 'muon' on the attention and MLP matrices (cm3jax.train.optim)
        'muon_beta': 0.95,
        'warmup_steps': 50 if size == 'tiny' else 1500,
        'schedule': 'linear',     # after warmup: constant | linear | cosine | exponential
        'decay_steps': 0,         # 0: decay until train.steps
        'final_lr_fraction': 0.1,
        'b1': 0.9, 'b2': 0.95, 'eps': 1e-8,
        'weight_decay': 0.1,      # matrices only
        'grad_clip': 1.0,
    })
    # `cm3jax train`: steps, global batch, checkpoints, logging (cm3jax.train.run).
    config.train = ConfigDict({
        'steps': 300 if size == 'tiny' else 100_000,
        'batch': 16 if size == 'tiny' else 2048,  # global rows per step (paper: 8M tokens)
        'seq_len': 96 if size == 'tiny' else 4096,
        'microbatches': 1,        # gradient accumulation: the batch runs in this many passes
        'log_every': 10,
        'eval_every': 100,
        'eval_batches': 2,
        'checkpoint_every': 100 if size == 'tiny' else 1000,
        'checkpoint_minutes': 0.0 if size == 'tiny' else 30.0,  # also save after this long; 0 = off
        'keep': 3,                # checkpoints kept
        'async_checkpoint': True,
        'profile_start': 0,       # > 0: trace steps (profile_start, profile_start + profile_steps]
        'profile_steps': 5,
        'peak_flops': 0.0,        # MFU's peak per device (CPU: per process); 0 = datasheet, else measured
        'progress': True,
    })
    # Training data: shards written by `cm3jax prepare` in `dir` (held-out ones in `eval_dir`), laid
    # out and CM3-masked on the fly (cm3jax.data.pipeline; docs/paper.md, "The CM3 objective"); with
    # `dir` empty, the synthetic copy / reverse / sort / add task of `tasks` (cm3jax.data.synthetic).
    config.data = ConfigDict({
        'dir': '', 'eval_dir': '',
        'tasks': 'copy,reverse,sort,add', 'min_len': 2, 'max_len': 8,
        'text_first': 0.5,        # caption-then-image (text-to-image) order, else image first
        # a document's captions -> one <mask> (weight 0), so that the unconditional stream of CFG and
        # CD-K, T(image | <mask>), is trained; it applies to documents with an image only
        'caption_dropout': 0.15,
        'cm3_rate': 1.0,          # spans ~ Poisson(rate), clamped to [min, max] (0 = plain causal)
        'cm3_min_spans': 0,
        'cm3_max_spans': 8,       # at most the vocab's sentinels (cm3jax prepare: vocab.num_sentinels)
        # Retrieval augmentation (docs/paper.md, "Retrieval augmentation"): K retrieved documents before each query, K drawn
        # from these counts ('2': CM3leon; '0,1,2': RA-CM3; '' = off), picked from the neighbour lists
        # that `cm3jax build-index` wrote in `dir` (and `eval_dir`); retrieved documents come from `dir`.
        'retrieved': '',
        'query_weight': 1.0,      # the query's loss weight (RA-CM3 up-weighted it)
        'retrieved_weight': 1.0,  # the retrieved documents' loss weight (0: learn from the query only)
    })

    if size.startswith('chameleon') or 'chameleon' in modifiers:
        apply_chameleon(config, full_size=size.startswith('chameleon'))
    if size == 'chameleon_34b':  # the 34B's GQA, wider MLP and swin norm (docs/paper.md, "Chameleon")
        config.model.update(num_kv_heads=8, mlp_dim=22_016, norm_placement='swin')
    return config


def converted(directory: str) -> ConfigDict:
    """The LM config of a `cm3jax convert chameleon` directory (``DIR/config.json``), without its
    record of the conversion; JSON lists become the tuples the presets hold."""
    path = pathlib.Path(directory).expanduser() / 'config.json'
    if not path.is_file():
        raise ValueError(f'configs/lm.py:converted={directory}: {path} is missing; give a directory that '
                         f'`cm3jax convert chameleon` wrote')
    record = json.loads(path.read_text())
    if record.get('task') != 'lm':
        raise ValueError(f'{path} is not a language-model config (task={record.get("task")!r})')
    record.pop('converted', None)

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x
    return ConfigDict(tuples(record))


def apply_chameleon(config: ConfigDict, full_size: bool) -> None:
    """Chameleon's stability changes (docs/paper.md, "Chameleon"); swin-norm stays off as at 7B."""
    m = config.model
    m.norm = 'rmsnorm'
    m.norm_params = True
    m.mlp = 'swiglu'
    m.position = 'rope'
    m.qk_norm = True
    m.zero_init_out = False
    m.init_std = 0.02
    m.tie_embeddings = False
    config.loss.z_loss = 1e-5
    config.optim.eps = 1e-5
    if full_size:
        config.optim.warmup_steps = 4000
    if full_size:
        m.vocab_size = CHAMELEON_VOCAB
        m.mlp_dim = 11_008
    else:
        m.mlp_dim = 2 * m.d_model
        m.num_kv_heads = max(1, m.num_heads // 2)  # exercise GQA at toy size
