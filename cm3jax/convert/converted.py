"""`cm3jax convert chameleon`: downloaded Chameleon / Anole weights -> one cm3jax directory, and
back to the HF layout.

    DIR/config.json        the cm3jax LM config (configs/lm.py:chameleon with the checkpoint's shape)
    DIR/vocab.json         `Vocab.chameleon(vocabulary_map=...)` of the tokenizer, as a dict
    DIR/tokenizer.json     the release's tokenizer, unchanged
    DIR/checkpoints/0/     an orbax checkpoint of ``{'params': ...}`` (what `cm3jax train` writes)
    DIR/vqgan/             the VQ-GAN as a `cm3jax train-tokenizer` workdir, when the release has
                           ``vqgan.ckpt`` + ``vqgan.yaml`` (images need it; text does not)
    DIR/hf_vqmodel.safetensors  an HF source's ``model.vqmodel.*`` tensors, for the way back

`cm3jax.sample.load.load_generator(DIR)` (through `cm3jax.sample.load.read_converted`),
``cm3jax sample --checkpoint=DIR`` and ``cm3jax train --init_from=DIR`` read it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from cm3jax import params as params_lib, parallel
from cm3jax.convert import chameleon, chameleon_files
from cm3jax.errors import ConfigError
from cm3jax.lm import config as lm_config
from cm3jax.model.transformer import Transformer
from cm3jax.sample.load import TOKENIZER_FILE, VOCAB_FILE, VQ_DIR, read_converted
from cm3jax.vocab import Vocab

HF_VQ_FILE = 'hf_vqmodel.safetensors'  # the HF source's VQ encoder, kept as is for `export_hf`


def lm_config_for(source_config, dtype: str = 'float32') -> ConfigDict:
    """configs/lm.py:chameleon with the model fields of a ChameleonConfig-like ``source_config``."""
    from configs import lm
    config = lm.get_config('chameleon')
    config.model.update(chameleon.model_fields_from_hf_config(source_config))
    config.model.param_dtype = dtype
    config.model.dtype = dtype
    config.mesh.ici = (1, -1, 1)  # what load_generator lays the params out on
    # Chameleon's objective is plain next-token prediction: its vocab has no <mask> or sentinels
    config.data.update(cm3_rate=0.0, cm3_max_spans=0, caption_dropout=0.0)
    return config


def _save_state(directory: pathlib.Path, tree) -> None:
    mgr = params_lib.manager(directory, create=True, enable_async_checkpointing=False)
    try:
        mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                            data=ocp.args.JsonSave({'processes': [None]})), force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()


def _convert_vqgan(ckpt: pathlib.Path, yaml_path: pathlib.Path, dst: pathlib.Path) -> dict:
    import yaml
    from cm3jax.convert import vqgan
    spec = yaml.safe_load(yaml_path.read_text())
    try:
        p = spec['model']['params']
        cfg = vqgan.config_from_taming(p['ddconfig'], p['n_embed'], p['embed_dim']).validate()
    except (KeyError, TypeError) as e:
        raise ValueError(f'{yaml_path} is not a taming VQ-GAN config (model.params.ddconfig / n_embed / embed_dim; '
                         f'{e!r} is missing)') from None
    vq_params = vqgan.from_torch(params_lib.load_state_dict(ckpt), cfg)
    (dst / VQ_DIR).mkdir(parents=True, exist_ok=True)
    (dst / VQ_DIR / 'config.json').write_text(json.dumps({'task': 'vq', 'model': dataclasses.asdict(cfg)}, indent=1))
    _save_state(dst / VQ_DIR / 'checkpoints', {'params': {'vq': jax.tree.map(np.asarray, vq_params)}})
    return dataclasses.asdict(cfg)


def convert(src: str | pathlib.Path, dst: str | pathlib.Path, layout: str = 'hf', dtype: str = 'float32',
            mesh: tuple[int, int, int] = (1, -1, 1), devices: int | None = None) -> dict:
    """Convert the checkpoint in ``src`` (``layout`` 'hf' or 'meta') into ``dst``; returns a
    summary. The language model streams tensor by tensor into ``dtype`` arrays.

    ``mesh``: the ('data', 'fsdp', 'tensor') shape the weights will run on, recorded as the
    directory's ``mesh.ici`` (what `cm3jax train --config=configs/lm.py:converted=DIR` uses) and
    checked against the model before anything is written: its heads must split over the tensor
    axis, and with ``devices`` (the target's device count) the shape must multiply out to it.
    The checkpoint holds whole arrays; restoring lays each out on whatever mesh reads it."""
    from cm3jax.text_tokenizer import TextTokenizer
    source = chameleon_files.read_source(src, layout)
    dst = pathlib.Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f'--dst={dst} is not empty; give a new directory')
    tok = TextTokenizer.load(source.tokenizer)
    vocab = Vocab.chameleon(vocabulary_map=tok.tokenizer.get_vocab(with_added_tokens=True))
    if vocab.size != source.config.vocab_size:
        raise ConfigError(f'{source.tokenizer} has {vocab.size} ids but the model has {source.config.vocab_size} '
                          f'(vocab_size): use the tokenizer released with these weights')
    config = lm_config_for(source.config, dtype)
    config.mesh.ici = tuple(int(n) for n in mesh)
    target = devices or math.prod(n for n in config.mesh.ici if n != -1)  # a -1 takes whatever is left
    lm_config.validate(config, num_devices=target)
    one = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])  # vocab padding as on any 1-way tensor axis
    cfg = lm_config.transformer_config(config, one, parallel.rules_from_config(config))
    params = chameleon.from_hf(source.state_dict, cfg)
    dst.mkdir(parents=True, exist_ok=True)
    summary = {'from': str(src), 'layout': layout, 'parameters': int(sum(x.size for x in jax.tree.leaves(params)))}
    if source.vqgan_ckpt is not None:
        summary['vqgan'] = _convert_vqgan(source.vqgan_ckpt, source.vqgan_yaml, dst)
    _save_state(dst / 'checkpoints', {'params': params})
    del params
    vq_tensors = {k: np.asarray(v) for k, v in source.state_dict.items() if k.startswith('model.vqmodel.')}
    if vq_tensors:
        from safetensors.numpy import save_file
        save_file(vq_tensors, str(dst / HF_VQ_FILE))
    if getattr(source.config, 'vq_config', None):
        summary['hf_vq_config'] = dict(source.config.vq_config)
    shutil.copyfile(source.tokenizer, dst / TOKENIZER_FILE)
    (dst / VOCAB_FILE).write_text(json.dumps(vocab.to_dict(), indent=1))
    record = config.to_dict()
    record['converted'] = summary
    (dst / 'config.json').write_text(json.dumps(record, indent=1, default=list))
    return summary


def export_hf(directory: str | pathlib.Path, dst: str | pathlib.Path, step: int | None = None) -> dict:
    """A converted directory (or a `cm3jax train` run fine-tuned from one) -> an HF folder that
    ``ChameleonForConditionalGeneration.from_pretrained`` loads: ``config.json``,
    ``model.safetensors`` (float32) and ``tokenizer.json``. The VQ encoder is an HF source's
    own tensors, or, from a Meta source, its VQ-GAN's encoder side with the ``vq_config`` it
    implies (transformers holds no decoder)."""
    from safetensors.numpy import save_file
    directory, dst = pathlib.Path(directory), pathlib.Path(dst)
    config, vocab, tok, vq_params, vq_cfg = read_converted(directory)
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = parallel.rules_from_config(config)
    cfg = lm_config.transformer_config(config, mesh, rules)
    target = params_lib.abstract(lambda rng: Transformer(cfg).init(rng, jnp.zeros((1, 8), jnp.int32))['params'],
                                 mesh, rules, jax.random.key(0))
    params = params_lib.restore(directory, target, step)
    state = chameleon.to_hf(params, cfg, config.model.vocab_size)
    del params
    hf_vq = None
    if (directory / HF_VQ_FILE).is_file():  # an HF source's own tensors, as they were
        from safetensors.numpy import load_file
        state.update(load_file(str(directory / HF_VQ_FILE)))
    elif vq_params is not None:  # a Meta source: its vqgan.ckpt's encoder side, in HF's (= taming's) names
        from cm3jax.convert import vqgan
        hf_vq = vqgan.hf_vq_config(vq_cfg)
        parts = ('encoder', 'quant_conv', 'post_quant_conv', 'quantize')
        state.update({f'model.vqmodel.{k}': v for k, v in vqgan.to_torch(vq_params, parts).items()})
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / 'model.safetensors'), metadata={'format': 'pt'})
    hf = hf_config_dict(config, vocab) | {'vocabulary_map': tok.tokenizer.get_vocab(with_added_tokens=True)}
    if config.get('converted', {}).get('hf_vq_config'):
        hf['vq_config'] = config.converted.hf_vq_config.to_dict()
    elif hf_vq is not None:
        hf['vq_config'] = hf_vq
    (dst / 'config.json').write_text(json.dumps(hf, indent=1))
    shutil.copyfile(directory / TOKENIZER_FILE, dst / TOKENIZER_FILE)
    return {'tensors': len(state), 'to': str(dst)}


def hf_config_dict(config, vocab: Vocab) -> dict:
    """The ``ChameleonConfig`` fields of a cm3jax Chameleon config (vocabulary_map from the tokenizer)."""
    m = config.model
    if m.norm_placement not in ('pre', 'swin'):
        raise ConfigError(f'model.norm_placement={m.norm_placement!r} has no HF Chameleon equivalent')
    return {'architectures': ['ChameleonForConditionalGeneration'], 'model_type': 'chameleon',
            'vocab_size': m.vocab_size, 'hidden_size': m.d_model, 'intermediate_size': m.mlp_dim,
            'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
            'num_key_value_heads': m.num_kv_heads, 'max_position_embeddings': m.max_len,
            'rope_theta': m.rope_theta, 'rms_norm_eps': m.norm_eps, 'swin_norm': m.norm_placement == 'swin',
            'tie_word_embeddings': bool(m.tie_embeddings), 'hidden_act': 'silu', 'attention_bias': False,
            'mlp_bias': False, 'bos_token_id': vocab.bos, 'eos_token_id': vocab.eos, 'pad_token_id': vocab.pad,
            'torch_dtype': 'float32'}
