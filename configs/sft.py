"""Instruction-tuning configs (``task='sft'``; docs/sft.md): a pretrained LM fine-tuned on a mixture of
instruction tasks, on the shared harness (`cm3jax.sft.task`).

``get_config(arg)`` presets and their launch commands:

  shapes   the Shapes task mixture (edit, structure, grounded, write, vqa, caption) on the
           quickstart's pretrained model grown from 2 blocks to 4 (`make demo` first; 14,000
           steps, 78 minutes on a fast two-core CPU, about 2.7 hours on a slow one):
           cm3jax train --config=configs/sft.py:shapes --init_from=out/quickstart/lm --workdir=runs/sft
  tiny     the same at toy size, for tests.

The model is always the pretrained one's (read from ``--init_from``), so the config holds no
``model``; the optimizer starts fresh. With ``data.dir`` empty the Shapes examples are prepared
into the workdir with the pretrained run's tokenizers; ``data.files`` adds instruction files
(JSON lines, `cm3jax.sft.jsonl`), and ``data.dir=DIR`` trains on a directory prepared before.
"""

from ml_collections import ConfigDict

from configs import lm as lm_configs


def get_config(arg: str = 'shapes') -> ConfigDict:
    if arg not in ('shapes', 'tiny'):
        raise ValueError(f'unknown preset {arg!r} in configs/sft.py:{arg}; choose from shapes, tiny')
    tiny = arg == 'tiny'
    base = lm_configs.get_config('tiny')
    config = ConfigDict()
    config.task = 'sft'
    config.seed = 0
    config.init_from = '' if tiny else 'out/quickstart/lm'
    # > 0: a longer context for a RoPE model (its parameters do not depend on it): an edit is two
    # images and a template, about 190 tokens with the quickstart's BPE, past its context of 192
    config.max_len = 0 if tiny else 256
    # > 0: this many new blocks, each starting as the identity, interleaved with the pretrained
    # ones (LLaMA Pro's block expansion; `cm3jax.model.grow`). Two on the quickstart's 2-layer
    # model: edit success 0.469 -> 0.688, grounded boxes 0.749 -> 0.976, at 1.75x the SFT time.
    # Four gave 0.695 at 2.5x, the same held-out loss at every eval (docs/sft.md, "What was measured")
    config.grow_layers = 0 if tiny else 2
    config.loss, config.mesh, config.sharding = base.loss, base.mesh, base.sharding
    # The paper: lr 5e-5 and warmup 150, after pretraining at a peak of 1e-4 to 6e-4. The toy was
    # pretrained at 6e-3 (Muon) and must learn six new formats in minutes, so it fine-tunes at
    # half that; 1e-3 learned no grounded boxes (docs/sft.md, "What was measured").
    config.optim = base.optim
    config.optim.update(name='muon', learning_rate=3e-3, warmup_steps=10 if tiny else 150, final_lr_fraction=0.0)
    config.train = base.train
    config.train.update(steps=60 if tiny else 14000, batch=16, seq_len=128 if tiny else 256,
                        eval_every=30 if tiny else 500, checkpoint_every=30 if tiny else 500, log_every=10)
    config.data = ConfigDict({
        'dir': '', 'eval_dir': '',
        'files': '',                 # instruction files (JSON lines), comma-separated
        # the mixture: task weights, and the up- and down-sampling thresholds of their rates.
        # Captioning's 2.5 (a sixth of the rows) keeps it near its score before SFT; at 1 of 8 it fell 0.09.
        # Edits' 6 (0.39 of the examples), with 14,000 steps: edit success 0.867 (0.813 on 256 other
        # held-out edits), against 0.789 at 5 and 10,000 steps and 0.688 at 3 and 7,000 steps.
        'weights': 'edit:6,structure:1,grounded:2,write:1,vqa:3,caption:2.5',
        'min_rate': 0.05, 'max_rate': 0.5,
        # 'cm3': the paper's loss on the whole sequence with CM3 spans; 'prompt': Chameleon's, the output only
        'loss': 'cm3',
        'cm3_rate': 0.3, 'cm3_min_spans': 0, 'cm3_max_spans': 4,
        # guidance's streams: all conditions -> <mask> at this rate, the text ones alone at it again
        'condition_dropout': 0.1,
        'caption_dropout': 0.0,      # the pretrained run's, copied by `with_pretrained` (sampling reads it)
        'shapes_examples': 400 if tiny else 70000,  # per task, for training: each edit drawn about 1.7 times
        'eval_examples': 32 if tiny else 128,      # per task, held out (the eval loss)
        'world': {'canvas': 16, 'min_objects': 1, 'max_objects': 1} if tiny else
                 {'canvas': 32, 'min_objects': 1, 'max_objects': 3},
    })
    return config
