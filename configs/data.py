"""Data-preparation configs for `cm3jax prepare` (documents -> ArrayRecord shards of token ids).

``get_config(arg)`` presets and their commands (train a tokenizer first: configs/vq.py):

  shapes   the procedural Shapes world (cm3jax.data.worlds.shapes), 32x32 images
           cm3jax prepare --config=configs/data.py:shapes --config.vq_workdir=VQ_DIR --config.out=DATA_DIR
           held-out scenes: add --config.source.split=held_out --config.source.count=1000
           --config.out=EVAL_DIR, passing --config.text_tokenizer.path=DATA_DIR/tokenizer.json
  digits   sklearn's handwritten digits, captioned ("a handwritten digit seven"), 32x32
  folder   an image folder + captions.jsonl: --config.source.root=DIR --config.source.resize=256
           (--config.source.resize=none keeps native sizes: an image not of the tokenizer's size is
           then skipped and counted; --config.source.background="(0, 0, 0)" for alpha)

Then train on them: cm3jax train --config=configs/lm.py:tiny --config.data.dir=DATA_DIR
--config.model.vocab_size=<printed by prepare>.
"""

from ml_collections import ConfigDict, FieldReference

SOURCES = {
    'shapes': lambda: {'kind': 'shapes', 'split': 'train', 'seed': 0, 'count': 20_000, 'cfg': {'canvas': 32}},
    'digits': lambda: {'kind': 'digits', 'split': 'train', 'seed': 0, 'size': 32},
    # resize takes S, (H, W) or none from the command line: a literal-typed field
    'folder': lambda: {'kind': 'folder', 'root': '', 'resize': FieldReference(256, field_type=object),
                       'background': (255, 255, 255)},
}


def get_config(arg: str = 'shapes') -> ConfigDict:
    if arg not in SOURCES:
        raise ValueError(f'unknown preset {arg!r} in configs/data.py:{arg}; choose from {sorted(SOURCES)}')
    config = ConfigDict()
    config.task = 'prepare'  # not a trainer: `cm3jax prepare` runs it
    config.source = ConfigDict(SOURCES[arg]())  # cm3jax.data.sources.make_source
    config.out = ''                           # where shards, manifest.json and tokenizer.json go
    config.vq_workdir = ''                    # a `cm3jax train-tokenizer` workdir
    config.text_tokenizer = ConfigDict({
        'path': '',                           # a saved tokenizer.json; '' = train a BPE on the source
        'vocab_size': 512 if arg != 'folder' else 32_000,
        'train_documents': 5000,
    })
    # CM3's <mask:i>: data.cm3_max_spans <= num_sentinels. layout 'chameleon': the ids of a Chameleon
    # tokenizer.json (text_tokenizer.path) as they are, for fine-tuning converted weights (docs/chameleon.md)
    config.vocab = ConfigDict({'num_sentinels': 8, 'layout': 'cm3leon'})
    config.prepare = ConfigDict({'shard_size': 1024, 'batch': 64, 'progress': True})
    return config
