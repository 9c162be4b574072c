"""The CLIP retriever's `Task` for `cm3jax.train.run`.

Retrieval augmentation (docs/paper.md, "Retrieval augmentation") retrieves with a frozen CLIP;
this trains one (or fine-tunes converted weights, ``init_from``) on image-caption documents
from any source (``config.data.source``, a `cm3jax.data.sources.make_source` spec): symmetric
InfoNCE over the in-batch negatives of the global batch (`cm3jax.retrieval.clip.contrastive_loss`),
the pairs split over the mesh's batch axes and the parameters laid out by their logical axis
names. The eval hook measures text->image and image->text recall@1/@5 on fixed held-out sets,
at step 0 (the random encoder) and every ``eval_every`` steps.

The workdir gets ``tokenizer.json`` next to ``config.json`` and ``checkpoints/``, which is all
`cm3jax.retrieval.load.load_retriever` needs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import pathlib
import zlib
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cm3jax import params as params_lib, parallel
from cm3jax.data import batches as batches_lib
from cm3jax.data.sources import Skip, make_source
from cm3jax.data.worlds import shapes, shapes_judge, twins as twins_lib
from cm3jax.errors import ConfigError
from cm3jax.retrieval import clip, load
from cm3jax.text_tokenizer import TextTokenizer, train_bpe
from cm3jax.train import loop, metrics as metrics_lib
from cm3jax.train.run import Env, Task

log = logging.getLogger(__name__)

RECALL_AT = (1, 5)
# CLIP's biases, norm parameters, class token and temperature are not decayed (only matrices
# are, as in OpenAI's and OpenCLIP's recipes); scanned layers stack biases into matrices, so by name.
NO_DECAY = ('bias', 'scale', 'bq', 'bk', 'bv', 'bo', 'bi', 'cls_token', 'logit_scale')


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], 'key', None) not in NO_DECAY, params)


# ---- Data ------------------------------------------------------------------------------------

def pair_example(image_size: int, where: str):
    """``example`` for `cm3jax.data.batches`: a document's first image and first caption
    ({'images': UInt8[S, S, 3], 'captions': str, 'doc': the document}); documents lacking either
    are skipped and counted."""
    def example(doc):
        if not doc.texts or not doc.images:
            raise Skip('document without an image and a caption', str(doc.id))
        batches_lib.check_image(doc.images[0], image_size, where, 'model.image_size', doc.id)
        return {'images': doc.images[0], 'captions': doc.texts[0], 'doc': doc}
    return example


def twin_rng(seed: int, doc) -> np.random.Generator:
    """The generator of a document's twin: a pure function of (seed, document id), so a resumed
    run draws the same twins."""
    return np.random.default_rng([seed, zlib.crc32(str(doc.id).encode())])


def pair_collate(layout: load.TextLayout, twins: int = 0, world: shapes.ShapesConfig | None = None, seed: int = 0,
                 negatives: bool = False):
    """Examples -> {'images': UInt8[b, S, S, 3], 'ids': Int32[b, T], 'mask': Bool[b, T]}; captions
    longer than the text tower's context are truncated, with one warning. With ``twins`` > 0
    (Shapes documents, their ``world``), the first ``twins`` examples' hard negatives
    (`cm3jax.data.worlds.twins`) are appended as pairs of their own: b = examples + twins. With
    ``negatives`` (Shapes documents), each drawn example's binding negative
    (`twins.binding_negative`: its caption with two objects' shapes swapped) comes as
    'negative_ids', 'negative_mask' [b, T] and 'negative_valid' Bool[b] (False where there is none,
    and on twins)."""
    warned = []

    def collate(examples: Sequence[dict]) -> dict[str, np.ndarray]:
        examples = list(examples)
        drawn = len(examples)
        for e in examples[:twins]:
            image, text = twins_lib.twin_example(e['doc'], twin_rng(seed, e['doc']), world)
            examples.append({'images': image, 'captions': text})
        ids, mask, truncated = layout.encode([e['captions'] for e in examples])
        if truncated and not warned:
            warned.append(True)
            log.warning('captions longer than model.max_len=%d tokens are truncated (%d of %d in this batch)',
                        layout.max_len, truncated, len(examples))
        batch = {'images': np.stack([e['images'] for e in examples]), 'ids': ids, 'mask': mask}
        if negatives:
            texts = [twins_lib.binding_negative(shapes.Scene.from_dict(e['doc'].meta['scene']), e['captions'],
                                                twin_rng(seed + 1, e['doc']), world) for e in examples[:drawn]]
            texts += [None] * (len(examples) - drawn)
            batch['negative_ids'], batch['negative_mask'], _ = layout.encode([t or '' for t in texts])
            batch['negative_valid'] = np.array([t is not None for t in texts])
        return batch
    return collate


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A fixed held-out set: images UInt8[N, S, S, C], N captions, and relevant Bool[N, N]:
    ``relevant[i, j]`` when caption i describes image j as well as its own (always on the
    diagonal). Retrieving any relevant item counts: in Shapes, "a red circle" describes every
    scene holding just a red circle, and no encoder can tell which of them was drawn for it.
    Shapes sets also hold each pair's hard-negative twin (`cm3jax.data.worlds.twins`):
    twin_images UInt8[N, S, S, C] and twin_captions."""
    name: str
    images: np.ndarray
    captions: list[str]
    relevant: np.ndarray
    twin_images: np.ndarray | None = None
    twin_captions: list[str] | None = None


def relevance(captions: list[str], docs: list, world=None) -> np.ndarray:
    """Bool[N, N] for `EvalSet`: with a Shapes ``world`` (ShapesConfig), whether caption i
    describes scene j; otherwise whether the captions are the same text."""
    if world is None:
        return np.asarray(captions)[:, None] == np.asarray(captions)[None, :]
    specs = [shapes_judge.parse_caption(c, world) for c in captions]
    scenes = [shapes.Scene.from_dict(d.meta['scene']).objects for d in docs]
    out = np.array([[shapes_judge.describes(spec, objects) for objects in scenes] for spec in specs])
    if not out.diagonal().all():
        raise AssertionError('a Shapes caption does not describe its own scene: the judge\'s caption parser and '
                             'the world\'s captions disagree')
    return out


def eval_sets(config, image_size: int) -> list[EvalSet]:
    """``config.data.eval`` (name -> overrides of ``config.data.source``) -> the first
    ``data.eval_size`` pairs of each, the same on every process."""
    d = config.data
    out = []
    for name, overrides in sorted(d.eval.items()):
        source = make_source({**d.source.to_dict(), **overrides.to_dict()})
        pairs, docs = batches_lib.take(source, d.eval_size, pair_example(image_size, f'data.eval.{name}'),
                                       f'data.eval.{name}')
        captions = [p['captions'] for p in pairs]
        world = source.cfg if getattr(source, 'kind', '') == 'shapes' else None
        twins = [twins_lib.twin_example(doc, twin_rng(config.seed, doc), world) for doc in docs] if world else []
        out.append(EvalSet(name, np.stack([p['images'] for p in pairs]), captions, relevance(captions, docs, world),
                           np.stack([t[0] for t in twins]) if twins else None, [t[1] for t in twins] or None))
    return out


# ---- Eval -------------------------------------------------------------------------------------

def recall(text_emb: jax.Array, image_emb: jax.Array, relevant: jax.Array, ks=RECALL_AT) -> dict[str, jax.Array]:
    """Recall@k both ways, as ``t2i_r{k}`` (text -> image) and ``i2t_r{k}``: text_emb Float[N, P] (captions), image_emb Float[N, P], relevant
    Bool[N, N] (caption, image). A query scores at k when a relevant item ranks within the
    first k; ties count against it, so a collapsed encoder scores near 0, not 1."""
    sim = jnp.einsum('tp,ip->ti', text_emb, image_emb)

    def rate(sim, rel):
        best = jnp.max(jnp.where(rel, sim, -jnp.inf), axis=1, keepdims=True)
        ahead = jnp.sum(~rel & (sim >= best), axis=1)  # irrelevant items ranked at or above the best relevant
        return {k: jnp.mean(ahead < k) for k in ks}

    t2i, i2t = rate(sim, relevant), rate(sim.T, relevant.T)
    return {**{f't2i_r{k}': v for k, v in t2i.items()}, **{f'i2t_r{k}': v for k, v in i2t.items()}}


def twin_accuracy(text_emb, image_emb, twin_text_emb, twin_image_emb) -> dict[str, jax.Array]:
    """How often a pair beats its twin, all Float[N, P]: ``twin_t2i``, a caption scores its own
    image above the twin's image (what CLIP re-ranking of samples needs); ``twin_i2t``, an
    image scores its own caption above the twin's caption. Ties count as misses."""
    own = jnp.sum(text_emb * image_emb, axis=-1)
    return {'twin_t2i': jnp.mean(own > jnp.sum(text_emb * twin_image_emb, axis=-1)),
            'twin_i2t': jnp.mean(own > jnp.sum(twin_text_emb * image_emb, axis=-1))}


@functools.lru_cache(maxsize=8)
def _recall_fn(cfg: clip.ClipConfig, mesh, rules: tuple):
    """The jitted eval of one model on one mesh: eval sets of the same size share its compile
    (``rules`` only keys the cache; the caller traces under them)."""
    def fn(p, images, ids, mask, rel, *twins):
        text, image = clip.embed_text(p, cfg, ids, mask), clip.embed_image(p, cfg, images)
        out = recall(text, image, rel)
        if twins:
            out.update(twin_accuracy(text, image, clip.embed_text(p, cfg, twins[1], twins[2]),
                                     clip.embed_image(p, cfg, twins[0])))
        return out
    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


class RecallEval:
    """``evaluate(params) -> {metric: float}`` on one `EvalSet`, its arrays placed on the mesh once."""

    def __init__(self, cfg: clip.ClipConfig, layout: load.TextLayout, data: EvalSet, mesh, rules):
        shards = parallel.axis_size(mesh, rules, 'act_batch')
        if len(data.captions) % shards:
            raise ValueError(f'data.eval_size={len(data.captions)} must be a multiple of the {shards} batch shards')
        ids, mask, _ = layout.encode(data.captions)
        put = lambda x, names: jax.make_array_from_callback(  # noqa: E731 (every process holds the whole set)
            x.shape, parallel.logical_sharding(mesh, rules, names), lambda index: x[index])
        self.inputs = (put(data.images, ('act_batch',)), put(ids, ('act_batch',)), put(mask, ('act_batch',)),
                       put(data.relevant, (None, None)))
        if data.twin_images is not None:
            twin_ids, twin_mask, _ = layout.encode(data.twin_captions)
            self.inputs += (put(data.twin_images, ('act_batch',)), put(twin_ids, ('act_batch',)),
                            put(twin_mask, ('act_batch',)))
        self.mesh, self.rules, self.name = mesh, rules, data.name
        self.fn = _recall_fn(cfg, mesh, tuple(map(tuple, rules)))

    def __call__(self, params) -> dict[str, float]:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            out = self.fn(params, *self.inputs)
        return {k: float(np.asarray(v.addressable_data(0))) for k, v in out.items()}


def recall_hook(evals: list[RecallEval], writer: metrics_lib.MetricWriter, every: int) -> loop.Hook:
    def run(info: loop.StepInfo) -> None:
        writer.write(info.step, {f'eval/{e.name}/{k}': v for e in evals for k, v in e(info.state['params']).items()})
    return loop.Hook(run, every)


# ---- Train ------------------------------------------------------------------------------------

def make_loss_fn(cfg: clip.ClipConfig):
    """loss_fn(params, batch, rng) -> (loss_sum, stats) for `make_train_step`: the batch-mean
    InfoNCE weighted by the batch size, so microbatches average as the step expects."""
    def loss_fn(params, batch, rng):
        del rng  # deterministic: no dropout
        loss, metrics = clip.contrastive_loss(params, cfg, batch)
        b = jnp.float32(batch['ids'].shape[0])
        return loss * b, {k: (v * b, b) for k, v in metrics.items()}
    return loss_fn


def text_tokenizer(config, workdir: pathlib.Path) -> TextTokenizer:
    """The run's tokenizer: the workdir's own when resuming (it must stay the one the checkpoint
    was trained with), else ``tokenizer.file`` (default init_from/tokenizer.json for HF weights),
    else a BPE trained on the first ``tokenizer.train_documents`` captions of the source."""
    tc = config.tokenizer
    saved = workdir / 'tokenizer.json'
    given = tc.file or (str(pathlib.Path(config.init_from) / 'tokenizer.json')
                        if config.init_from and (pathlib.Path(config.init_from) / 'tokenizer.json').exists() else '')
    if saved.exists():
        tok = TextTokenizer.load(saved)
        if given and TextTokenizer.load(given).fingerprint() != tok.fingerprint():
            raise ValueError(f'tokenizer.file={given} differs from {saved}, which this workdir was trained with; '
                             f'use a new --workdir or drop tokenizer.file')
        return tok
    if given:
        return TextTokenizer.load(given)
    captions = [doc.texts[0] for doc in itertools.islice(make_source(config.data.source), tc.train_documents)
                if doc.texts]
    return train_bpe(captions, tc.vocab_size)


def init_from(env: Env, path: str, target, step: int | None = None):
    """Params to fine-tune from ``path``: HF CLIP weights or a train-retriever workdir (its
    checkpoint ``step``; None: the latest)."""
    path = pathlib.Path(path)
    raw = json.loads((path / 'config.json').read_text()) if (path / 'config.json').exists() else {}
    cfg = env.model.cfg
    if 'text_config' in raw or 'vision_config' in raw:
        from cm3jax.retrieval.hf_clip import load_pretrained
        hf_cfg, params = load_pretrained(path)
        if dataclasses.replace(hf_cfg, pooling='eos', eos_token_id=cfg.eos_token_id, dtype=cfg.dtype,
                               logit_scale_init=cfg.logit_scale_init) != cfg:
            raise ValueError(f'init_from={path} holds a CLIP of another shape than model: {hf_cfg} vs {cfg}; '
                             f'set the model fields to the checkpoint\'s')
        if step is not None:
            raise ConfigError(f'--step={step} names a checkpoint step, but init_from={path} holds HF CLIP weights')
        return params_lib.place(params, target, 'the converted CLIP weights')
    return params_lib.restore(path, target, step)




# ---- The task -----------------------------------------------------------------------------------

class Retriever(NamedTuple):
    """What `build` gives the rest of the task (``env.model``)."""
    cfg: clip.ClipConfig
    layout: load.TextLayout


def build(env: Env) -> Retriever:
    """The tokenizer (saved into the workdir for the loader) and the model config it implies."""
    config = env.config
    tok = text_tokenizer(config, env.workdir)
    layout = load.text_layout(tok, config.model.max_len)
    if jax.process_index() == 0 and not (env.workdir / 'tokenizer.json').exists():
        tok.save(env.workdir / 'tokenizer.json')
    cfg = load.clip_config(config.model, layout)
    env.say(f'retriever: {cfg.image_size}px images in patches of {cfg.patch_size}, {cfg.max_len}-token captions '
            f'over {layout.num_ids} ids; {cfg.projection_dim}-d embeddings')
    return Retriever(cfg, layout)


def init(env: Env, rng: jax.Array):
    return clip.init_variables(env.model.cfg, rng)['params']


def train_data(env: Env) -> batches_lib.SourceBatches:
    """This process's shard of ``data.source``, repeated, as image-caption batches; with
    ``data.twins`` a fraction of each batch is the hard-negative twins of the rest."""
    config = env.config
    source = make_source({**config.data.source.to_dict(), 'shard': (jax.process_index(), jax.process_count())})
    rows = config.train.batch // jax.process_count()
    twins = twin_rows(config, source, rows)
    negatives = bool(config.data.get('binding_negatives', False))
    if negatives and getattr(source, 'kind', '') != 'shapes':
        raise ConfigError(f'data.binding_negatives needs a Shapes source (the swaps are made from its scene graphs), '
                          f'not {source.describe()}; set data.binding_negatives=False')
    return batches_lib.SourceBatches(source, rows - twins, pair_example(env.model.cfg.image_size, 'data.source'),
                                     collate=pair_collate(env.model.layout, twins, getattr(source, 'cfg', None),
                                                          config.seed, negatives),
                                     shuffle_buffer=config.data.shuffle_buffer, seed=config.seed)


def twin_rows(config, source, rows: int) -> int:
    """How many of a process's ``rows`` are twins: ``data.twins`` of them, rounded; checked."""
    fraction = float(config.data.get('twins', 0.0))
    if not 0.0 <= fraction <= 0.5:
        raise ConfigError(f'data.twins={fraction}: the fraction of each batch that is hard-negative twins must be '
                          f'in [0, 0.5] (each twin belongs to one drawn pair)')
    if fraction and getattr(source, 'kind', '') != 'shapes':
        raise ConfigError(f'data.twins={fraction} needs a Shapes source (twins are drawn from its scene graphs), '
                          f'not {source.describe()}; set data.twins=0')
    return int(round(fraction * rows))


def loss(env: Env):
    return make_loss_fn(env.model.cfg)


def evals(env: Env, writer: metrics_lib.MetricWriter) -> list[loop.Hook]:
    every = env.config.train.eval_every
    if not every:
        return []
    sets = [RecallEval(env.model.cfg, env.model.layout, s, env.mesh, env.rules)
            for s in eval_sets(env.config, env.model.cfg.image_size)]
    return [recall_hook(sets, writer, every)] if sets else []


def summary(env: Env, scalars: dict) -> tuple[dict, str]:
    evals = {k: v for k, v in scalars.items() if k.startswith('eval/')}
    line = ', '.join(f'{k.removeprefix("eval/")} {v:.3f}' for k, v in evals.items() if k.endswith('_r1'))
    return {**evals, 'step': scalars['step']}, line or 'no eval'


def task(config) -> Task:
    """The retriever for `cm3jax.train.run.run` (``config.task == 'retriever'``; configs/clip.py)."""
    del config  # everything is read from env.config once the mesh exists
    return Task(name='retriever', build=build, init=init, train_data=train_data, loss=loss, evals=evals,
                eval_at_start=True, summary=summary, batch_axes=('act_batch',), decay_mask=decay_mask,
                init_from=init_from)
