"""A frozen CLIP retriever from a `cm3jax train-retriever` workdir or converted HF CLIP weights.

    r = load_retriever('/tmp/clip_tiny')              # config.json + tokenizer.json + checkpoints/
    r = load_retriever('/data/clip-vit-base-patch32')  # HF: config.json + model.safetensors + tokenizer.json
    t = r.embed_texts(['a red circle'])                # Float32[1, P], unit norm
    v = r.embed_images(images)                         # UInt8 [N, S, S, 3] -> Float32[N, P], unit norm
    s = r.score(images, captions)                      # CLIP score, Float32[N]

Images whose side is not ``cfg.image_size`` are resized (bicubic, antialiased; logged once per
size), because re-ranking and indexing see whatever the generator or the folder gives;
non-square images are refused, since the crop that makes them square is a choice the caller
must make. `TextLayout` (how a caption becomes the text tower's ids) and `clip_config` (a
config's ``model`` section plus the tokenizer -> `ClipConfig`) live here so that the trainer
and the loader build the same model from the same files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from cm3jax import params as params_lib, parallel
from cm3jax.retrieval import clip
from cm3jax.text_tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# OpenAI CLIP's tokenizer.json names its ends so; a tokenizer with them is used as CLIP used it.
CLIP_EOS, CLIP_BOS = '<|endoftext|>', '<|startoftext|>'
# Fields of ClipConfig that the tokenizer decides, never the config's model section.
DERIVED = ('vocab_size', 'eos_token_id', 'pooling')
_resized_sizes: set = set()  # image sizes already logged as resized


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """How captions become the text tower's input: ``[bos] + BPE ids + [eos]``, truncated to
    ``max_len`` (the eos kept) and right-padded with eos (masked out, and pooling takes the
    *first* eos). A tokenizer with OpenAI's ``<|endoftext|>`` (e.g. HF CLIP's tokenizer.json)
    uses its own ids; any other (a BPE trained on the captions) gets eos = ``num_text``, one
    id past its own, and no bos."""
    tokenizer: TextTokenizer
    max_len: int
    eos: int
    bos: int | None = None

    @property
    def num_ids(self) -> int:
        """Rows the token embedding needs (before padding)."""
        return max(self.tokenizer.num_text, self.eos + 1)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """texts -> (ids Int32[N, max_len], mask Bool[N, max_len], how many were truncated)."""
        room = self.max_len - 1 - (self.bos is not None)
        ids = np.full((len(texts), self.max_len), self.eos, np.int32)
        mask = np.zeros((len(texts), self.max_len), bool)
        truncated = 0
        for row, tokens in enumerate(self.tokenizer.encode_batch(list(texts))):
            truncated += len(tokens) > room
            seq = ([] if self.bos is None else [self.bos]) + tokens[:room].tolist() + [self.eos]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = True
        return ids, mask, truncated


def text_layout(tokenizer: TextTokenizer, max_len: int) -> TextLayout:
    """The `TextLayout` of ``tokenizer`` (see there) for a ``max_len``-token text tower."""
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    bos = None
    if CLIP_EOS in vocab:
        eos, bos = vocab[CLIP_EOS], vocab.get(CLIP_BOS)
    else:
        eos = tokenizer.num_text
    if max_len < 2 + (bos is not None):
        raise ValueError(f'model.max_len={max_len} leaves no room for text between the end tokens; raise it')
    return TextLayout(tokenizer, max_len, eos, bos)


def clip_config(model, layout: TextLayout) -> clip.ClipConfig:
    """``config.model`` (ClipConfig fields, plus ``vocab_multiple``) and the text layout -> ClipConfig.

    The vocabulary is the layout's ids rounded up to ``vocab_multiple``, a mesh-independent
    multiple so that the tensor axis can split the table and a checkpoint restores on any mesh."""
    model = dict(model.to_dict() if hasattr(model, 'to_dict') else model)
    given = sorted(set(DERIVED) & set(model))
    if given:
        raise ValueError(f'model.{given[0]} is set by the text tokenizer (its size and end token); remove it '
                         f'from the config')
    multiple = int(model.pop('vocab_multiple', 128))
    unknown = sorted(set(model) - set(clip.ClipConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f'model.{unknown[0]} is not a ClipConfig field; known: '
                         f'{sorted(clip.ClipConfig.__dataclass_fields__)}')
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
    if 'dtype' in fields:
        fields['dtype'] = jnp.dtype(fields['dtype'])
    vocab = -(-layout.num_ids // multiple) * multiple
    return clip.ClipConfig(**fields, vocab_size=vocab, eos_token_id=layout.eos, pooling='eos')


def param_target(cfg: clip.ClipConfig, mesh: jax.sharding.Mesh, rules: parallel.Rules):
    """The params as abstract arrays laid out on ``mesh`` by their logical axis names."""
    return params_lib.abstract(lambda rng: clip.init_variables(cfg, rng)['params'], mesh, rules, jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class Retriever:
    """A frozen CLIP: cfg, params (laid out on ``mesh``), the text layout, and batched embedding.

    Inputs run in chunks of ``batch_size`` rows (the last one padded) split over the mesh's
    batch axes, so every call reuses one compiled program per modality."""
    cfg: clip.ClipConfig
    params: Any
    text: TextLayout
    mesh: jax.sharding.Mesh
    rules: parallel.Rules
    batch_size: int = 256

    def _chunks(self, arrays: tuple[np.ndarray, ...], fn) -> np.ndarray:
        shards = parallel.axis_size(self.mesh, self.rules, 'act_batch')
        size = -(-self.batch_size // shards) * shards
        n, out = len(arrays[0]), []
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for start in range(0, n, size):
                rows = [a[start:start + size] for a in arrays]
                pad = size - len(rows[0])
                rows = [np.concatenate([r, np.repeat(r[-1:], pad, axis=0)]) if pad else r for r in rows]
                put = [jax.device_put(r, parallel.logical_sharding(self.mesh, self.rules, ('act_batch',)))
                       for r in rows]
                out.append(np.asarray(jax.device_get(fn(*put)))[:size - pad])
        return np.concatenate(out) if out else np.zeros((0, self.cfg.projection_dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """list[str] (N) -> Float32[N, P], unit norm. Texts longer than ``cfg.max_len`` tokens are
        truncated (as CLIP does), with a warning."""
        if isinstance(texts, str):
            raise TypeError('embed_texts takes a list of strings; wrap a single caption in a list')
        ids, mask, truncated = self.text.encode(texts)
        if truncated:
            log.warning('%d of %d texts are longer than the %d-token context and were truncated', truncated,
                        len(texts), self.cfg.max_len)
        return self._chunks((ids, mask), lambda i, m: clip.embed_text(self.params, self.cfg, i, m))

    def embed_images(self, images) -> np.ndarray:
        """UInt8 (or [0, 1] float) [N, H, H, C] -> Float32[N, P], unit norm; H != image_size is resized."""
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f'images have shape {images.shape}; expected [N, H, W, {self.cfg.image_channels}]')
        h, w, s = images.shape[1], images.shape[2], self.cfg.image_size
        if h != w:
            raise ValueError(f'images are {h}x{w}, not square; centre-crop (or pad) them to square first, '
                             f'then they are resized to {s}x{s}')
        if h != s and (h, s) not in _resized_sizes:
            _resized_sizes.add((h, s))
            log.warning('resizing %dx%d images to this CLIP\'s %dx%d (bicubic, antialiased)', h, h, s, s)
        return self._chunks((images,), lambda x: _embed_images(self.params, self.cfg, x))

    def score(self, images, texts: Sequence[str]) -> np.ndarray:
        """CLIP score of each (image, text) pair, ``100 * max(cos, 0)``: Float32[N]
        (`cm3jax.retrieval.clip.clip_score`)."""
        if len(images) != len(texts):
            raise ValueError(f'score pairs images with texts: got {len(images)} images and {len(texts)} texts')
        cos = np.sum(self.embed_images(images) * self.embed_texts(texts), axis=-1)
        return 100.0 * np.maximum(cos, 0.0)


@functools.partial(jax.jit, static_argnames='cfg')
def _embed_images(params, cfg: clip.ClipConfig, images: jax.Array) -> jax.Array:
    """`clip.embed_image` after resizing square images of another side to ``cfg.image_size``."""
    s = cfg.image_size
    if images.shape[1] != s:  # in [0, 1] float, which embed_image accepts as it does uint8
        x = images.astype(jnp.float32) / (255.0 if images.dtype == jnp.uint8 else 1.0)
        images = jnp.clip(jax.image.resize(x, (x.shape[0], s, s, x.shape[3]), 'bicubic', antialias=True), 0.0, 1.0)
    return clip.embed_image(params, cfg, images)


def _default_mesh() -> jax.sharding.Mesh:
    # data parallel over this process's devices: any width fits, and a frozen retriever is small
    return parallel.create_mesh((-1, 1, 1), devices=jax.local_devices())


def load_retriever(path: str | pathlib.Path, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
                   batch_size: int = 256) -> Retriever:
    """A `Retriever` from ``path``: a `cm3jax train-retriever` workdir (its latest checkpoint,
    or ``step``), or a directory of HF CLIP weights (``config.json``, ``model.safetensors`` or
    ``pytorch_model.bin``, and the ``tokenizer.json`` that came with them). Params are laid
    out on ``mesh`` (default: data parallel over this process's devices)."""
    path = pathlib.Path(path)
    config_file = path / 'config.json'
    if not config_file.exists():
        raise FileNotFoundError(f'{config_file} is missing: point at a `cm3jax train-retriever` workdir or a '
                                f'directory of HF CLIP weights')
    raw = json.loads(config_file.read_text())
    mesh = mesh or _default_mesh()
    tokenizer_file = path / 'tokenizer.json'
    if not tokenizer_file.exists():
        raise FileNotFoundError(f'{tokenizer_file} is missing: a retriever needs the text tokenizer it was trained '
                                f'with (for HF weights, copy the tokenizer.json that came with them)')
    tokenizer = TextTokenizer.load(tokenizer_file)
    if 'text_config' in raw or 'vision_config' in raw:  # transformers' CLIPConfig
        from cm3jax.retrieval.hf_clip import load_pretrained
        cfg, host_params = load_pretrained(path)
        layout = text_layout(tokenizer, cfg.max_len)
        if layout.num_ids > cfg.vocab_size:
            raise ValueError(f'{tokenizer_file} has {layout.num_ids} ids but the weights embed {cfg.vocab_size}; '
                             f'use the tokenizer.json released with these weights')
        rules = parallel.rules_from_config({})
        params = params_lib.place(host_params, param_target(cfg, mesh, rules), 'the converted CLIP weights')
        return Retriever(cfg, params, layout, mesh, rules, batch_size)
    if 'model' not in raw or 'tokenizer' not in raw:
        raise ValueError(f'{config_file} is neither a `cm3jax train-retriever` config (model + tokenizer '
                         f'sections) nor an HF CLIPConfig (text_config + vision_config)')
    config = ConfigDict(raw)
    layout = text_layout(tokenizer, config.model.max_len)
    cfg = clip_config(config.model, layout)
    rules = parallel.rules_from_config(config)
    params = params_lib.restore(path, param_target(cfg, mesh, rules), step)
    return Retriever(cfg, params, layout, mesh, rules, batch_size)

