"""The ``cm3jax`` command: ``cm3jax COMMAND --config=configs/lm.py:PRESET [--config.FIELD=VALUE ...]``.

``--config=configs/NAME.py:PRESET`` names a file; when no such file is under the current
directory, the presets installed with cm3jax are used, so the same line works anywhere.

Commands:
  train        train what the config's ``task`` names (lm, vq, retriever) in --workdir (resumes
               there; --init_from=DIR to start from another run's params)
  train-tokenizer  the same, for a tokenizer config (--config=configs/vq.py:tiny)
  train-retriever  the same, for a retriever config (--config=configs/clip.py:tiny)
  prepare      documents -> token shards (--config=configs/data.py:shapes --config.out=DIR --config.vq_workdir=DIR)
  build-index  embed --data's documents with --retriever into a memory bank and write every document's
               neighbour list next to its shards (--queries=EVAL_DIR for held-out data, --top_m)
  sample       from a --workdir trained on prepared data (or --checkpoint=DIR from `cm3jax convert`): --prompt=CAPTION draws images (--num, --cfg, --mode,
               --temperature, --top_p, --top_k, --cdk_k, --cdk_alpha; --retriever=DIR re-ranks by CLIP score,
               --retrieve=K puts K retrieved documents first), --image=PNG writes captions; --judge scores
               both with the Shapes judge; an SFT model edits (--image with --edit=INSTRUCTION), answers
               (--image with --question=Q) and draws from edge maps (--edge=PNG with --prompt)
  quickstart   the main job on the Shapes world: tokenizers, data, retriever, LM, pictures from captions and
               captions for pictures, judged (--config=configs/quickstart.py, the default; out/quickstart)
  eval         --workdir=RUN --suite=shapes|coco|folder: generate what the suite needs (or read --images), score
               it (FID with --extractor=inception|clip|none and --inception=PTH, CLIP score with --retriever,
               CIDEr-D, the Shapes judge) and write RUN/eval/report.json and report.md (docs/eval.md)
  convert chameleon  downloaded Chameleon / Anole weights -> one directory that sample, train --init_from and
               load_generator read: --src=DIR --dst=DIR [--layout=hf|meta] [--dtype=bfloat16]; --to=hf writes
               such a directory (or a run fine-tuned from one, --step) back in the HF layout (docs/chameleon.md)
  aot          lower and compile the train step for --devices=N devices without allocating them, and print
               the per-device memory (docs/scaling.md)
  config       print the resolved, validated config

Errors of cm3jax's own (a config that cannot work, damaged or foreign data and checkpoints, a
NaN loss, an unknown --config.FIELD) print as one line saying what to change and exit 1;
--verbose (or CM3JAX_TRACEBACK=1) shows the traceback instead.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pathlib
import sys

import configs
from absl import app, flags
from ml_collections import config_flags

from cm3jax.errors import Cm3jaxError

PRESETS = pathlib.Path(configs.__file__).resolve().parent  # the configs/ installed with cm3jax
DEFAULT_CONFIG = f'{PRESETS / "lm.py"}:tiny'
# The command line the config flag takes its --config.FIELD overrides from: `run` fills it in
# before parsing. Left to read sys.argv, ml_collections would apply the overrides to the default
# config while this module is imported, where an unknown field is a traceback no code can catch.
_ARGV: list[str] = sys.argv[:1]
_CONFIG = config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG, 'A config file and its preset, e.g. configs/lm.py:tiny.', lock_config=True,
    sys_argv=_ARGV)
_WORKDIR = flags.DEFINE_string('workdir', None, 'train: directory for checkpoints, metrics and TensorBoard logs.')
_INIT_FROM = flags.DEFINE_string('init_from', None, 'train: start from the params of the latest checkpoint in '
                                 'this workdir (or weights the task reads), with a fresh optimizer.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'sample: a caption to draw (repeat for several).')
_IMAGE = flags.DEFINE_multi_string('image', None, 'sample: an image file to caption (repeat for several); RGB, '
                                   'of the image tokenizer\'s size.')
_NUM = flags.DEFINE_integer('num', 4, 'sample: images per prompt.')
_CFG = flags.DEFINE_float('cfg', 1.5, 'sample: classifier-free guidance scale (1 = off).')
_MODE = flags.DEFINE_enum('mode', 'mixed', ['sample', 'cdk', 'mixed'], 'sample: plain sampling, contrastive '
                          'decoding (CD-K), or half of each.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.5, 'sample: temperature (0 = greedy).')
_TOP_P = flags.DEFINE_float('top_p', 0.9, 'sample: nucleus mass.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'sample: keep the k likeliest tokens (0 = off).')
_CDK_K = flags.DEFINE_integer('cdk_k', 8, 'sample: CD-K\'s k (V_head is measured against the k-th likeliest).')
_CDK_ALPHA = flags.DEFINE_float('cdk_alpha', 0.5, 'sample: CD-K\'s alpha (V_head keeps p >= alpha * the k-th).')
_REPETITION = flags.DEFINE_float('repetition_penalty', 1.0, 'sample: CTRL\'s penalty on text tokens already in '
                                 'the document (1 = off; captions are greedy; Chameleon weights sample text with '
                                 'Meta\'s 1.2).')
_JUDGE = flags.DEFINE_bool('judge', False, 'sample: score the drawn images against their prompts, and the written '
                           'captions against their images, with the Shapes judge.')
_SEED = flags.DEFINE_integer('seed', 0, 'sample: random seed.')
_OUT = flags.DEFINE_string('out', None, 'sample: where samples.png and samples.json go (default WORKDIR/samples).')
_RETRIEVER = flags.DEFINE_string('retriever', None, 'build-index, sample: a `cm3jax train-retriever` workdir or a '
                                 'directory of HF CLIP weights (config.json, weights, tokenizer.json).')
_RETRIEVE = flags.DEFINE_integer('retrieve', 0, 'sample: documents retrieved from the training data\'s memory bank '
                                 'and put before each prompt (needs --retriever and `cm3jax build-index`).')
_DATA = flags.DEFINE_string('data', None, 'build-index: the prepared data to index (the memory bank\'s documents).')
_QUERIES = flags.DEFINE_multi_string('queries', [], 'build-index: held-out prepared data that gets neighbour '
                                     'lists against the same bank.')
_TOP_M = flags.DEFINE_integer('top_m', 8, 'build-index: neighbours kept per document.')
_SUITE = flags.DEFINE_enum('suite', None, ['shapes', 'coco', 'folder'], 'eval: what to measure (docs/eval.md).')
_IMAGES = flags.DEFINE_string('images', None, 'eval: a folder of images with captions.jsonl (coco: the real '
                              'images; folder: generated ones), or tfds:NAME:SPLIT.')
_CAPTIONS = flags.DEFINE_string('captions', None, 'eval: the captions.jsonl (default IMAGES/captions.jsonl).')
_EXTRACTOR = flags.DEFINE_enum('extractor', 'inception', ['inception', 'clip', 'none'], 'eval: FID\'s features.')
_INCEPTION = flags.DEFINE_string('inception', None, 'eval: pt_inception-2015-12-05-6726825d.pth (default '
                                 '$CM3JAX_INCEPTION, else ~/.cache/cm3jax/).')
_RESIZE = flags.DEFINE_enum('resize', 'clean', ['clean', 'tf1'], 'eval: how images reach Inception\'s 299 px.')
_REFERENCE = flags.DEFINE_string('reference', None, 'eval --suite=folder: FID reference images (a folder) or '
                                 'statistics (.npz).')
_KARPATHY = flags.DEFINE_string('karpathy', None, 'eval --suite=coco: Karpathy\'s dataset_coco.json (CIDEr-D on '
                                'its test split).')
_WORLD = flags.DEFINE_string('world', '{}', 'eval: Shapes world fields as JSON, e.g. \'{"max_objects": 2}\'.')
_STEP = flags.DEFINE_integer('step', None, 'sample, and train with --init_from: the checkpoint step to read '
                             '(default: the latest).')
_IMAGE_CFG = flags.DEFINE_float('image_cfg', 1.2, 'sample: the image-only stream\'s guidance scale (Chameleon; and '
                                 'an SFT model\'s --edit, whose default is 1.5).')
_QUESTION = flags.DEFINE_string('question', 'What do you see in this image?', 'sample: what is asked about each '
                                '--image (Chameleon: the chat turn after it; an SFT model answers it, docs/sft.md).')
_EDIT = flags.DEFINE_multi_string('edit', None, 'sample (an SFT model): an instruction for the --image of the '
                                  'same position, e.g. "make the circle green" (docs/sft.md).')
_EDGE = flags.DEFINE_multi_string('edge', None, 'sample (an SFT model): an edge map PNG to draw from, with the '
                                  '--prompt of the same position as its caption.')
_DEVICES = flags.DEFINE_integer('devices', None, 'aot: compile for this many devices (on CPU they are simulated); '
                                'convert: the device count --mesh must multiply out to.')
_CONVERT_MESH = flags.DEFINE_string('mesh', '(1,-1,1)', 'convert: the (data, fsdp, tensor) mesh the weights will '
                                    'run on, recorded in DIR/config.json and checked against the model; aot: '
                                    'the mesh to compile for (= --config.mesh.ici).')
_END_OF_TURN = flags.DEFINE_bool('end_of_turn', True, 'sample (Chameleon): close the --question with the chat '
                                  'format\'s end-of-turn token <reserved08706>.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'sample: a directory `cm3jax convert chameleon` wrote (in place '
                                  'of --workdir).')
_SRC = flags.DEFINE_string('src', None, 'convert: the downloaded weights (HF folder or Meta release folder); with '
                           '--to=hf, a converted directory or a run fine-tuned from one.')
_DST = flags.DEFINE_string('dst', None, 'convert: the new directory to write.')
_LAYOUT = flags.DEFINE_enum('layout', 'hf', ['hf', 'meta'], 'convert: the layout of --src.')
_TO = flags.DEFINE_enum('to', 'cm3jax', ['cm3jax', 'hf'], 'convert: cm3jax (from downloaded weights) or hf (back).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'convert: the params\' dtype.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'on an error, print its traceback, not just the line saying what '
                             'to change (CM3JAX_TRACEBACK=1 does the same).')


# A command that trains one kind of model refuses a config of another, saying which config it wants.
TRAIN_COMMANDS = {'train': None, 'train-tokenizer': ('vq', 'a tokenizer config, e.g. --config=configs/vq.py:tiny'),
                  'train-retriever': ('retriever', 'a retriever config, e.g. --config=configs/clip.py:tiny')}


def _trainer(command: str):
    def train(config) -> None:
        if not _WORKDIR.value:
            raise app.UsageError(f'cm3jax {command} needs --workdir=DIR (checkpoints and metrics go there)')
        wanted = TRAIN_COMMANDS[command]
        if wanted and config.get('task') != wanted[0]:
            raise app.UsageError(f'cm3jax {command} needs {wanted[1]}; this config\'s task is '
                                 f'{config.get("task")!r} (cm3jax train trains any task)')
        from cm3jax import trainers
        trainers.train(config, _WORKDIR.value, _INIT_FROM.value, _STEP.value)
    return train


def _prepare(config) -> None:
    if config.get('task') != 'prepare':
        raise app.UsageError('cm3jax prepare needs a data config, e.g. --config=configs/data.py:shapes')
    from cm3jax.data import prepare
    prepare.run(config)


def _sample(config) -> None:
    del config  # the run's own config.json is read from --workdir
    if _CHECKPOINT.value:
        flags.FLAGS.workdir = _CHECKPOINT.value
    if not _WORKDIR.value or not (_PROMPT.value or _IMAGE.value):
        raise app.UsageError('cm3jax sample needs --workdir=DIR (a `cm3jax train` run on prepared data) and '
                             '--prompt="a red circle left of a blue square" to draw, or --image=PNG to caption '
                             '(each repeatable)')
    if _RETRIEVE.value and not _RETRIEVER.value:
        raise app.UsageError('--retrieve needs --retriever=DIR (the retriever that built the memory bank)')
    import flax.linen as nn
    import jax
    from cm3jax import cli_sample
    from cm3jax.sample import decode, generate, load
    gen, mesh, rules = load.load_generator(_WORKDIR.value, step=_STEP.value)
    if gen.vq_cfg is None:
        raise ValueError(f'{_WORKDIR.value} has no image tokenizer: convert the weights with the release\'s '
                         f'vqgan.ckpt and vqgan.yaml (docs/chameleon.md)')
    images = [generate.read_image(path, gen.vq_cfg.resolution) for path in _IMAGE.value or []]  # before any work
    where = pathlib.Path(_OUT.value or pathlib.Path(_WORKDIR.value) / 'samples')
    sample = decode.SampleConfig(cfg_scale=_CFG.value, mode=_MODE.value, temperature=_TEMPERATURE.value,
                                 top_p=_TOP_P.value, top_k=_TOP_K.value, cdk_k=_CDK_K.value, cdk_alpha=_CDK_ALPHA.value)
    chameleon = gen.vocab.end_image != gen.vocab.break_
    if chameleon and (_EDIT.value or _EDGE.value):
        raise app.UsageError('--edit and --edge need the CM3leon layout\'s templates (docs/sft.md); these weights '
                             'use Chameleon\'s: ask with --prompt, or --image and --question')
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if chameleon:  # Chameleon / Anole weights: their formats and presets
            _chameleon_sample(gen, images, where)
            return
        if _EDIT.value or _EDGE.value or flags.FLAGS['question'].present:  # an instruction-tuned model
            import dataclasses
            edges = [generate.read_image(path, gen.vq_cfg.resolution) for path in _EDGE.value or []]
            edit = dataclasses.replace(generate.EDIT_SAMPLE, **_given_sampling())
            cli_sample.instructions(gen, images=images, image_paths=_IMAGE.value or [], edits=_EDIT.value or [],
                                    question=_QUESTION.value if flags.FLAGS['question'].present else None,
                                    edges=edges, prompts=_PROMPT.value or [], sample=sample, edit_sample=edit,
                                    num=_NUM.value, seed=_SEED.value, where=where)
            return
        if _PROMPT.value:
            _draw(gen, sample, where)
        if images:
            cli_sample.captions(gen, images, _IMAGE.value, judge=_JUDGE.value, repetition_penalty=_REPETITION.value,
                                where=where)


def _given_sampling(*names: str) -> dict:
    """The sampling flags given on the command line (all of them, or those ``names``), as
    `decode.SampleConfig` fields: what overrides a preset."""
    fields = {'cfg_scale': _CFG, 'image_cfg_scale': _IMAGE_CFG, 'temperature': _TEMPERATURE, 'top_p': _TOP_P,
              'top_k': _TOP_K, 'mode': _MODE, 'cdk_k': _CDK_K, 'cdk_alpha': _CDK_ALPHA,
              'repetition_penalty': _REPETITION}
    return {k: f.value for k, f in fields.items() if flags.FLAGS[f.name].present and (not names or k in names)}


def _chameleon_sample(gen, images, where: pathlib.Path) -> None:
    """`cm3jax.sample.chameleon` with its presets; the sampling flags given override them."""
    import dataclasses
    import jax
    import numpy as np
    from PIL import Image
    from cm3jax.sample import chameleon
    where.mkdir(parents=True, exist_ok=True)
    if _PROMPT.value:
        sample = dataclasses.replace(chameleon.IMAGE, **_given_sampling('cfg_scale', 'image_cfg_scale', 'temperature',
                                                                        'top_p', 'top_k'))
        out = chameleon.text_to_image(gen, _PROMPT.value, num=_NUM.value, sample=sample,
                                      rng=jax.random.key(_SEED.value))
        grid = np.concatenate([np.concatenate(list(row), axis=1) for row in out['images']], axis=0)
        Image.fromarray(grid).save(where / 'samples.png')
        (where / 'samples.json').write_text(json.dumps({'prompts': _PROMPT.value, 'sample': vars(sample),
                                                        'codes': out['codes'].tolist()}, indent=1))
        print(f'{len(_PROMPT.value)} prompt(s) x {_NUM.value}: {where}/samples.png (a row per prompt)')
    if images:
        sample = dataclasses.replace(chameleon.TEXT, **_given_sampling('temperature', 'top_p', 'top_k',
                                                                       'repetition_penalty'))
        written = chameleon.image_to_text(gen, np.stack(images), question=_QUESTION.value, sample=sample,
                                          end_of_turn=_END_OF_TURN.value, rng=jax.random.key(_SEED.value))
        record = [{'image': path, 'caption': text} for path, text in zip(_IMAGE.value, written)]
        for r in record:
            print(f'{r["image"]}: {r["caption"]}')
        (where / 'captions.json').write_text(json.dumps(record, indent=1))


def _draw(gen, sample, where: pathlib.Path) -> None:
    import jax
    import numpy as np
    from PIL import Image
    from cm3jax.sample import generate
    retrieved = score_fn = None
    if _RETRIEVER.value:
        from cm3jax.retrieval import inference, load as retrieval_load
        retriever = retrieval_load.load_retriever(_RETRIEVER.value)
        score_fn = inference.score_fn(retriever)
        if _RETRIEVE.value:
            data_dir = json.loads((pathlib.Path(_WORKDIR.value) / 'config.json').read_text())['data']['dir']
            retrieved = inference.retrieve(retriever, data_dir, _PROMPT.value, _RETRIEVE.value, vocab=gen.vocab)
    out = generate.text_to_image(gen, _PROMPT.value, num=_NUM.value, sample=sample, rng=jax.random.key(_SEED.value),
                                 retrieved=retrieved, score_fn=score_fn)
    where.mkdir(parents=True, exist_ok=True)
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in out['images']], axis=0)
    Image.fromarray(grid).save(where / 'samples.png')
    record = {'prompts': _PROMPT.value, 'sample': vars(sample), 'codes': out['codes'].tolist(),
              'scores': out['scores'].tolist() if 'scores' in out else None}
    if _JUDGE.value:
        from cm3jax.data.worlds import shapes_judge
        record['judge_exact'] = [[shapes_judge.score(im, p)['exact'] for im in row]
                                 for row, p in zip(out['images'], _PROMPT.value)]
        print(f'Shapes judge, exact: {np.mean(record["judge_exact"]):.3f} over {np.size(record["judge_exact"])} images')
    (where / 'samples.json').write_text(json.dumps(record, indent=1))
    print(f'{len(_PROMPT.value)} prompt(s) x {_NUM.value} samples: the pictures are in {where}/samples.png (a row '
          f'per prompt{", best CLIP score first" if score_fn else ""}); codes and settings in {where}/samples.json')


def _convert(config) -> None:
    del config  # flags only
    if not _SRC.value or not _DST.value:
        raise app.UsageError('cm3jax convert chameleon needs --src=DIR (the downloaded weights) and --dst=DIR (new)')
    from cm3jax.convert import converted
    if _TO.value == 'hf':
        summary = converted.export_hf(_SRC.value, _DST.value, _STEP.value)
    else:
        summary = converted.convert(_SRC.value, _DST.value, _LAYOUT.value, _DTYPE.value,
                                    mesh=_mesh_flag(_CONVERT_MESH.value), devices=_DEVICES.value)
    print(json.dumps({k: v for k, v in summary.items() if k != 'hf_vq_config'}, indent=1))


def _mesh_flag(text: str) -> tuple[int, ...]:
    """--mesh="(1,-1,4)" -> (1, -1, 4); its sizes are checked where the mesh is resolved."""
    import ast
    try:
        return tuple(int(n) for n in ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(f'--mesh={text!r}: give the (data, fsdp, tensor) shape, e.g. --mesh="(1,-1,4)"') from None


def _aot(config) -> None:
    if config.get('task') != 'lm':
        raise app.UsageError('cm3jax aot needs an LM config, e.g. --config=configs/lm.py:cm3leon_7b')
    n = _DEVICES.value
    if n:  # simulated CPU devices must be asked for before the backend starts; other backends ignore it
        os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={n}'
    import jax
    from cm3jax import aot
    devices = jax.devices()
    if n and n > len(devices):
        raise ValueError(f'--devices={n} but this backend has {len(devices)} ({devices[0].platform}); on a CPU the '
                         f'count is simulated, so run it there (JAX_PLATFORMS=cpu)')
    devices = devices[:n] if n else devices
    if flags.FLAGS['mesh'].present:  # the same as --config.mesh.ici
        config.mesh.ici = _mesh_flag(_CONVERT_MESH.value)
    print(aot.format_report(aot.compile_train_step(config, devices)))
    rows = max(len(devices), config.train.batch // config.train.microbatches // len(devices) * len(devices))
    print(aot.format_decode_report(aot.compile_decode_step(config, devices, batch=min(rows, len(devices) * 8))))


def _build_index(config) -> None:
    del config  # flags only
    if not _DATA.value or not _RETRIEVER.value:
        raise app.UsageError('cm3jax build-index needs --data=DIR (prepared shards) and --retriever=DIR')
    from cm3jax.retrieval import build, load as retrieval_load
    retriever = retrieval_load.load_retriever(_RETRIEVER.value)
    summary = build.build_index(_DATA.value, retriever, build.BuildConfig(top_m=_TOP_M.value), queries=_QUERIES.value)
    print(json.dumps(summary, indent=1))


def _quickstart(config) -> None:
    if config.get('task') != 'quickstart':
        raise app.UsageError(f'cm3jax quickstart needs a quickstart config, e.g. --config=configs/quickstart.py; '
                             f'this config\'s task is {config.get("task")!r}')
    from cm3jax import quickstart
    quickstart.run(config)


def _eval(config) -> None:
    del config  # flags only; the run's own config.json is read from --workdir
    if not _SUITE.value:
        raise app.UsageError('cm3jax eval needs --suite=shapes|coco|folder (and --workdir=RUN or --images=DIR)')
    from cm3jax.eval import run
    from cm3jax.sample import decode
    try:
        world = json.loads(_WORLD.value)
    except ValueError:
        raise ValueError(f'--world={_WORLD.value!r} is not JSON; e.g. --world=\'{{"max_objects": 2}}\'') from None
    sample = decode.SampleConfig(cfg_scale=_CFG.value, mode=_MODE.value, temperature=_TEMPERATURE.value,
                                 top_p=_TOP_P.value, top_k=_TOP_K.value, cdk_k=_CDK_K.value, cdk_alpha=_CDK_ALPHA.value)
    run.run(run.EvalOptions(
        suite=_SUITE.value, workdir=_WORKDIR.value, out=_OUT.value, num=_NUM.value if flags.FLAGS['num'].present
        else None, seed=_SEED.value, extractor=_EXTRACTOR.value, inception=_INCEPTION.value, resize=_RESIZE.value,
        retriever=_RETRIEVER.value, images=_IMAGES.value, captions=_CAPTIONS.value, reference=_REFERENCE.value,
        karpathy=_KARPATHY.value, world=world, sample=sample))


def _show_config(config) -> None:
    """Validate what can be checked without building anything, then print."""
    task = config.get('task')
    if task == 'lm':
        from cm3jax.lm import config as lm_config
        lm_config.validate(config)
    elif task == 'vq':
        from cm3jax.vq.train import ema_settings, vq_config
        vq_config(config)
        ema_settings(config.quantizer)
    elif task == 'quickstart':
        from cm3jax import quickstart
        quickstart.world(config)
    elif task != 'prepare':
        from cm3jax import trainers
        trainers.task_of(config)  # an unknown task: the error lists them
    print(config)


COMMANDS = {'train': _trainer('train'), 'train-tokenizer': _trainer('train-tokenizer'),
            'train-retriever': _trainer('train-retriever'), 'prepare': _prepare, 'build-index': _build_index,
            'sample': _sample, 'quickstart': _quickstart, 'eval': _eval, 'config': _show_config,
            'convert': _convert, 'aot': _aot}
SUBCOMMANDS = {'convert': ('chameleon',)}  # `cm3jax convert chameleon`: the model family is a second word


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] in SUBCOMMANDS:
        if argv[2] not in SUBCOMMANDS[argv[1]]:
            raise app.UsageError(f'cm3jax {argv[1]} {argv[2]}: unknown; choose from {SUBCOMMANDS[argv[1]]}')
        argv = argv[:2]
    elif argv[1:2] == ['convert']:
        raise app.UsageError('usage: cm3jax convert chameleon --src=DIR --dst=DIR [--layout=hf|meta] [--to=hf]')
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f'usage: cm3jax {{{"|".join(COMMANDS)}}} --config=configs/lm.py:tiny '
                             f'[--config.model.num_layers=4 ...]; got {argv[1:]}')
    # absl shows INFO; JAX's backend probing ("Unable to initialize backend 'tpu'") is noise here
    logging.getLogger('jax').setLevel(logging.WARNING)
    logging.getLogger('absl').setLevel(logging.WARNING)  # orbax logs every save step by step at INFO
    try:
        COMMANDS[argv[1]](_CONFIG.value)
    except (Cm3jaxError, ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one line saying what to change
        if _VERBOSE.value or os.environ.get('CM3JAX_TRACEBACK'):
            raise
        _fail(argv[1], str(e))


def _fail(command: str, message: str) -> None:
    print(f'cm3jax {command}: error: {message}\n(run with --verbose to see where it was raised)', file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, plus one line for an unknown ``--config.FIELD`` (ml_collections raises a
    bare KeyError, which absl would show as a chained traceback) and for a preset that refuses
    its argument (``configs/lm.py:nosuch``)."""
    verbose = '--verbose' in argv or os.environ.get('CM3JAX_TRACEBACK')
    try:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            # a preset's own error (an unknown preset, a missing file) comes wrapped with the
            # loader's traceback: say its last line, which is the preset's message
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            if verbose or 'Error whilst parsing config file' not in str(e):
                return app.parse_flags_with_usage(argv)
            spec = next((a for a in argv if a.startswith('--config=')), '--config')
            _fail(argv[1] if len(argv) > 1 else '', f'{spec}: {lines[-1].partition(": ")[2] or lines[-1]}')
    except (KeyError, AttributeError) as e:
        if verbose:
            raise
        fields = [a[len('--config.'):].partition('=')[0] for a in argv if a.startswith('--config.')]
        _fail(argv[1] if len(argv) > 1 else '', unknown_field(_load_config(argv), fields) or str(e))


def _load_config(argv: list[str]):
    """The config ``--config=FILE[:ARG]`` names (or the default), without its overrides."""
    from ml_collections.config_flags import config_flags as cf
    spec = next((a[len('--config='):] for a in argv if a.startswith('--config=')), DEFAULT_CONFIG)
    path, _, arg = spec.partition(':')
    module = cf._LoadConfigModule('cm3jax_config', path)  # the loader the flag itself uses
    return module.get_config(arg) if arg else module.get_config()


def unknown_field(config, fields: list[str]) -> str | None:
    """What to say about the first of ``fields`` (dotted paths) that ``config`` lacks: the field
    and the three closest known paths (among its siblings when its parent exists); None when
    it lacks none."""
    known = _paths(config)
    for field in fields:
        if field in known or any(k.startswith(field + '.') for k in known):
            continue
        parent = field.rpartition('.')[0]
        siblings = [k for k in known if k.rpartition('.')[0] == parent] or known
        close = difflib.get_close_matches(field, siblings, n=3, cutoff=0.0)  # the best three, however far
        hint = f'; did you mean {", ".join(close[:3])}?' if close else ''
        return (f'--config.{field}: the config has no field {field!r}{hint} (`cm3jax config '
                f'--config=...` prints every field)')
    return None


def _paths(config, prefix: str = '') -> list[str]:
    out = []
    for key, value in config.items():
        path = f'{prefix}{key}'
        out.append(path)
        if hasattr(value, 'items'):
            out += _paths(value, path + '.')
    return out


def resolve_config_flag(argv: list[str], cwd: str | None = None) -> list[str]:
    """``--config=configs/X.py[:ARG]`` -> the installed preset file when ``configs/X.py`` is not
    under ``cwd`` (so commands copied from the docs work from any directory)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == '--config' and i + 1 < len(argv):  # the two-word form
            out += [arg, _resolve(argv[i + 1], cwd)]
            i += 2
            continue
        out.append('--config=' + _resolve(arg[len('--config='):], cwd) if arg.startswith('--config=') else arg)
        i += 1
    return out


def _resolve(spec: str, cwd: str | None) -> str:
    path, sep, preset = spec.partition(':')
    local = pathlib.Path(cwd or os.getcwd()) / path
    parts = pathlib.PurePath(path).parts
    if local.exists() or len(parts) != 2 or parts[0] != 'configs' or not (PRESETS / parts[1]).exists():
        return spec
    return f'{PRESETS / parts[1]}{sep}{preset}'


def default_config(argv: list[str]) -> list[str]:
    """``argv`` with its --config made explicit: `cm3jax quickstart` without one runs
    configs/quickstart.py, every other command configs/lm.py:tiny (the flag is parsed, and its
    overrides applied, only when it is on the command line)."""
    given = any(a == '--config' or a.startswith('--config=') for a in argv)
    if given or len(argv) < 2:
        return argv
    default = f'{PRESETS / "quickstart.py"}' if argv[1] == 'quickstart' else DEFAULT_CONFIG
    return [argv[0], argv[1], f'--config={default}', *argv[2:]]


def run() -> None:
    """Console-script entry point."""
    argv = default_config(resolve_config_flag(sys.argv))
    _ARGV[:] = argv
    app.run(main, argv=argv, flags_parser=_parse_flags)
