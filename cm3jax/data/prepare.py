"""`cm3jax prepare`: documents -> ArrayRecord shards of joint-vocab ids, plus a manifest.

Offline and once per data set: images are VQ-encoded in batches on the local devices, text goes
through the BPE, and each document becomes one record (`documents.encode_record`: its segments
as ids, not yet laid out, so order and caption dropout are drawn fresh every epoch by the
pipeline). Shards are written to a temporary name and renamed when complete, and
``progress.json`` lists the finished ones, so an interrupted run picks up at the next shard.
``manifest.json``, written last, holds the counts, the vocab and the tokenizers' fingerprints;
the pipeline refuses shards prepared for another vocab. A document whose image is not the
tokenizer's size (a folder read with ``resize=none``) is skipped and counted with its id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cm3jax.data import documents
from cm3jax.errors import ConfigError
from cm3jax.vocab import Vocab
from cm3jax.vq import model as vq

log = logging.getLogger(__name__)
MANIFEST, PROGRESS = 'manifest.json', 'progress.json'


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    shard_size: int = 1024   # documents per shard
    batch: int = 64          # images per VQ-encode call (padded to a multiple of the local devices)
    progress: bool = True

    def __post_init__(self):
        if self.shard_size < 1 or self.batch < 1:
            raise ValueError(f'prepare.shard_size ({self.shard_size}) and prepare.batch ({self.batch}) must be >= 1')


def params_fingerprint(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:16]


class ImageEncoder:
    """uint8 images [N, R, R, C] -> codes Int32[N, r, r], in batches split over the local devices."""

    def __init__(self, params, cfg: vq.VQConfig, batch: int):
        devices = jax.local_devices()
        mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
        self.cfg, self.batch = cfg, -(-batch // len(devices)) * len(devices)
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
        self.params = jax.device_put(params, replicated)
        self.split = split
        model = vq.VQGAN(cfg)
        self._encode = jax.jit(
            lambda p, x: model.apply({'params': p}, x.astype(jnp.float32) / 127.5 - 1.0, method=vq.VQGAN.encode_codes),
            in_shardings=(replicated, split), out_shardings=split)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        vq._check_images(images, self.cfg)
        out = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            padded = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]), np.uint8)])
            codes = self._encode(self.params, jax.device_put(padded, self.split))
            out.append(np.asarray(jax.device_get(codes))[:len(chunk)])  # one program in flight (docs/stack_notes.md)
        return np.concatenate(out) if out else np.zeros((0, self.cfg.latent_resolution,) * 2, np.int32)


def _odd_shape(doc: documents.Document, want: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of ``doc``'s first image that the tokenizer does not take, else None."""
    return next((np.asarray(i).shape for i in doc.images if np.asarray(i).shape != want), None)


def _size_advice(doc: documents.Document, shape, want: tuple[int, ...]) -> str:
    return (f'the source gives images of shape {shape} ({doc.id or "the first document"}) but the VQ tokenizer '
            f'takes {want}: make the source draw {want[0]} px images (--config.source.cfg.canvas for shapes, '
            f'--config.source.size for digits, --config.source.resize for folders, tars and TFDS) or use a '
            f'tokenizer trained at that resolution')


def _records(docs: list[documents.Document], encoder: ImageEncoder, vocab: Vocab, text_tokenizer) -> list[bytes]:
    images = [s for d in docs for s in d.segments if not isinstance(s, str)]
    want = (encoder.cfg.resolution, encoder.cfg.resolution, encoder.cfg.in_channels)
    odd = next((d for d in docs if _odd_shape(d, want)), None)
    if odd is not None:
        raise ConfigError(_size_advice(odd, _odd_shape(odd, want), want))
    codes = iter(encoder(np.stack(images)) if images else [])
    out = []
    for d in docs:
        segments, is_image = [], []
        for s in d.segments:
            image = not isinstance(s, str)
            segments.append(documents.segment_ids(next(codes) if image else s, vocab, text_tokenizer))
            is_image.append(image)
        r = encoder.cfg.latent_resolution
        out.append(documents.encode_record(segments, is_image, d.id, (r, r), d.meta.get(documents.HEADER)))
    return out


def prepare(source: Iterable[documents.Document], out_dir: str | pathlib.Path, *, vocab: Vocab, text_tokenizer,
            vq_params, vq_cfg: vq.VQConfig, cfg: PrepareConfig = PrepareConfig(), extra: dict | None = None) -> dict:
    """Write ``source``'s documents to ``out_dir/shard-NNNNN.array_record`` and return the
    manifest (also written to ``out_dir/manifest.json``). Resumes an interrupted run in the
    same ``out_dir`` when the vocab and tokenizers are the same. ``extra`` adds entries to the
    manifest (`run` records where the tokenizers live, for `cm3jax sample`)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if vq_cfg.num_codes != vocab.num_image_codes:
        raise ValueError(f'the VQ tokenizer has {vq_cfg.num_codes} codes but vocab.num_image_codes is '
                         f'{vocab.num_image_codes}: make them equal')
    identity = {'vocab': vocab.to_dict(), 'vocab_fingerprint': vocab.fingerprint(),
                'text_tokenizer': text_tokenizer.fingerprint(), 'image_tokenizer': params_fingerprint(vq_params),
                'image_shape': [vq_cfg.latent_resolution] * 2, 'shard_size': cfg.shard_size}
    progress = _load_progress(out_dir, identity)
    done = progress['shards']
    consumed = sum(s.get('read', s['documents']) for s in done)
    if done:
        log.info('resuming: %d shards (%d documents) already written in %s', len(done), consumed, out_dir)
    encoder = ImageEncoder(vq_params, vq_cfg, cfg.batch)
    want = (vq_cfg.resolution, vq_cfg.resolution, vq_cfg.in_channels)
    right_size_seen = any(s['image_tokens'] for s in done)
    stream = itertools.islice(iter(source), consumed, None)
    try:
        total = len(source)
    except TypeError:  # an endless or unsized source
        total = None
    bar = tqdm(total=total, initial=consumed, unit='doc', desc='prepare', disable=not cfg.progress)
    while True:
        docs = list(itertools.islice(stream, cfg.shard_size))
        if not docs:
            break
        kept = [d for d in docs if d.segments]  # an empty document has nothing to learn from
        # an image of another size than the tokenizer's (a folder read at native size): that
        # document is skipped and counted with its id, unless no image has had the right size,
        # which is a config to change, not an odd file
        odd = [(d, _odd_shape(d, want)) for d in kept]
        kept = [d for d, shape in odd if shape is None]
        odd = [(d, shape) for d, shape in odd if shape is not None]
        right_size_seen = right_size_seen or any(d.images for d in kept)
        if odd and not right_size_seen:
            raise ConfigError(_size_advice(*odd[0], want))
        for d, shape in odd:
            log.warning('skipping document %s: its image has shape %s, the tokenizer takes %s', d.id, shape, want)
        records = _records(kept, encoder, vocab, text_tokenizer)
        name = f'shard-{len(done):05d}.array_record'
        tmp = out_dir / (name + '.tmp')
        writer = ArrayRecordWriter(str(tmp), 'group_size:1')
        tokens = image_tokens = 0
        for r in records:
            writer.write(r)
            segments, is_image, _ = documents.decode_record(r)
            tokens += sum(len(s) for s in segments)
            image_tokens += sum(len(s) for s, i in zip(segments, is_image) if i)
        writer.close()
        os.replace(tmp, out_dir / name)
        done.append({'path': name, 'documents': len(records), 'read': len(docs), 'tokens': tokens,
                     'image_tokens': image_tokens, 'odd_size': len(odd),
                     'odd_size_examples': [f'{d.id} {list(shape)}' for d, shape in odd[:3]]})
        _write_json(out_dir / PROGRESS, progress)
        bar.update(len(docs))
    bar.close()
    stats = getattr(source, 'stats', None)
    manifest = {**identity, 'shards': done, 'documents': sum(s['documents'] for s in done),
                'tokens': sum(s['tokens'] for s in done), 'image_tokens': sum(s['image_tokens'] for s in done),
                'skipped': dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None,
                'empty_documents_dropped': sum(s.get('read', s['documents']) - s['documents'] - s.get('odd_size', 0)
                                               for s in done),
                'odd_size_skipped': sum(s.get('odd_size', 0) for s in done),
                'odd_size_examples': [e for s in done for e in s.get('odd_size_examples', [])][:3],
                **(extra or {})}
    _write_json(out_dir / MANIFEST, manifest)
    report = stats.report() if hasattr(stats, 'report') else ''
    if manifest['odd_size_skipped']:
        report += (f' Skipped {manifest["odd_size_skipped"]} documents whose image is not the tokenizer\'s '
                   f'{want[0]}x{want[1]} ({", ".join(manifest["odd_size_examples"])}); set source.resize to '
                   f'resize them instead.')
    tqdm.write(f'prepared {manifest["documents"]} documents ({manifest["tokens"]:,} tokens) in {len(done)} shards '
               f'in {out_dir}. {report}'.strip())
    return manifest


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _load_progress(out_dir: pathlib.Path, identity: dict) -> dict:
    path = out_dir / PROGRESS
    if not path.exists():
        return {**identity, 'shards': []}
    progress = json.loads(path.read_text())
    for key in ('vocab_fingerprint', 'text_tokenizer', 'image_tokenizer', 'shard_size'):
        if progress.get(key) != identity[key]:
            raise ConfigError(f'{out_dir} holds shards prepared with another {key} ({progress.get(key)} vs '
                              f'{identity[key]}): use a new output directory, or the settings it was prepared with')
    for shard in progress['shards']:
        if not (out_dir / shard['path']).exists():
            raise FileNotFoundError(f'{out_dir / shard["path"]} is listed in {path} but missing: delete {path} '
                                    f'to start over')
    return progress


def load_tokenizers(data_dir: str | pathlib.Path) -> tuple[dict, Vocab, Any, Any, vq.VQConfig]:
    """(manifest, vocab, text tokenizer, VQ params, VQ config) that ``data_dir`` was prepared
    with, found through its manifest (``cm3jax prepare`` records where they live) and checked
    against the fingerprints it holds: a tokenizer that kept training after `prepare` would read
    the ids as something else."""
    from cm3jax import text_tokenizer as text_tok
    from cm3jax.vq import load as vq_load

    manifest = read_manifest(data_dir)
    for key in ('vq_workdir', 'text_tokenizer_path'):
        if key not in manifest:
            raise ValueError(f'{data_dir}/manifest.json does not say where its tokenizers are ({key}); '
                             f'it was not written by `cm3jax prepare`')
    vocab = Vocab.from_dict(manifest['vocab'])
    tok = text_tok.TextTokenizer.load(manifest['text_tokenizer_path'])
    vq_params, vq_cfg = vq_load.load_tokenizer(manifest['vq_workdir'])
    for name, have, want in (('text tokenizer', tok.fingerprint(), manifest['text_tokenizer']),
                             ('image tokenizer', params_fingerprint(vq_params), manifest['image_tokenizer'])):
        if have != want:
            raise ValueError(f'the {name} found through {data_dir}/manifest.json is not the one the data '
                             f'was prepared with (fingerprint {have} vs {want}); restore that version')
    return manifest, vocab, tok, vq_params, vq_cfg


def read_manifest(data_dir: str | pathlib.Path, vocab: Vocab | None = None) -> dict:
    """The manifest of prepared shards, checked against ``vocab`` when given."""
    path = pathlib.Path(data_dir) / MANIFEST
    if not path.exists():
        hint = ' (a partial run: rerun `cm3jax prepare` to finish it)' if (path.parent / PROGRESS).exists() else ''
        raise FileNotFoundError(f'{path} is missing{hint}; prepare the data with `cm3jax prepare` first')
    manifest = json.loads(path.read_text())
    if vocab is not None and manifest['vocab_fingerprint'] != vocab.fingerprint():
        raise ValueError(f'{data_dir} was prepared for another vocab ({Vocab.from_dict(manifest["vocab"])}) than '
                         f'the model\'s ({vocab}): prepare it again or set the vocab config to match')
    return manifest


def train_text_tokenizer(source, vocab_size: int, documents: int, path: str | pathlib.Path):
    """A byte-level BPE of ``vocab_size`` trained on the texts of ``source``'s first ``documents``
    documents, saved to ``path``: `prepare`'s first step when no tokenizer is given."""
    from cm3jax import text_tokenizer
    texts = (t for d in itertools.islice(iter(source), documents) for t in d.texts)
    tok = text_tokenizer.train_bpe(texts, vocab_size)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def _vocab(config, tok, vq_cfg) -> Vocab:
    """The joint vocab: CM3leon's (text, image codes, specials, sentinels), or with
    ``vocab.layout='chameleon'`` the Chameleon tokenizer's own ids (no mask, no sentinels)."""
    layout = config.vocab.get('layout', 'cm3leon')
    if layout == 'cm3leon':
        return Vocab.build(tok.num_text, vq_cfg.num_codes, config.vocab.num_sentinels)
    if layout != 'chameleon':
        raise ConfigError(f"vocab.layout={layout!r}; choose 'cm3leon' or 'chameleon'")
    if not config.text_tokenizer.path:
        raise ConfigError('vocab.layout=chameleon needs --config.text_tokenizer.path=DIR/tokenizer.json, the '
                          'tokenizer of the converted weights')
    vocab = Vocab.chameleon(vocabulary_map=tok.tokenizer.get_vocab(with_added_tokens=True))
    if vocab.num_image_codes != vq_cfg.num_codes:
        raise ConfigError(f'{config.text_tokenizer.path} has {vocab.num_image_codes} image codes but the image '
                          f'tokenizer in {config.vq_workdir} has {vq_cfg.num_codes}: use the converted DIR/vqgan')
    return vocab


def run(config) -> dict:
    """`cm3jax prepare --config=configs/data.py:shapes --config.out=DIR --config.vq_workdir=DIR`:
    the source, the text tokenizer (``text_tokenizer.path``, else a BPE trained on the source's
    first ``text_tokenizer.train_documents`` documents and saved as ``out/tokenizer.json``), the
    image tokenizer of a `cm3jax train-tokenizer` workdir, and the joint vocab they make."""
    from cm3jax import text_tokenizer
    from cm3jax.data import sources
    from cm3jax.vq import load

    if not config.out:
        raise ValueError('cm3jax prepare needs --config.out=DIR (the shards and manifest go there)')
    if not config.vq_workdir:
        raise ValueError('cm3jax prepare needs --config.vq_workdir=DIR, a `cm3jax train-tokenizer` workdir '
                         '(images become its codes)')
    out = pathlib.Path(config.out)
    vq_params, vq_cfg = load.load_tokenizer(config.vq_workdir)
    tc = config.text_tokenizer
    saved = out / 'tokenizer.json'
    if tc.path:
        tok = text_tokenizer.TextTokenizer.load(tc.path)
    elif saved.exists():  # a resumed run keeps the BPE it trained
        tok = text_tokenizer.TextTokenizer.load(saved)
    else:
        tok = train_text_tokenizer(sources.make_source(config.source), tc.vocab_size, tc.train_documents, saved)
    vocab = _vocab(config, tok, vq_cfg)
    tqdm.write(f'vocab: {vocab.size} ids ({tok.num_text} text, {vocab.num_image_codes} image codes, '
               f'{len(vocab.special_ids)} specials); set model.vocab_size={vocab.size} to train on it')
    return prepare(sources.make_source(config.source), out, vocab=vocab, text_tokenizer=tok, vq_params=vq_params,
                   vq_cfg=vq_cfg, cfg=PrepareConfig(**config.prepare.to_dict()),
                   extra={'vq_workdir': str(pathlib.Path(config.vq_workdir).absolute()),
                          'text_tokenizer_path': str(pathlib.Path(tc.path or saved).absolute())})
