"""`cm3jax train-retriever`: the CLIP dual encoder trained with the shared train loop.

PAPER.md section 3 retrieves with a frozen CLIP; this trains one (or fine-tunes converted
weights) on image-caption documents: symmetric InfoNCE over the in-batch negatives of the global
batch (`cm3jax.retrieval.clip.contrastive_loss`), the pairs split over the mesh's batch axes and
the parameters laid out by their logical axis names. Checkpoints, resume, SIGTERM, metrics and
the progress bar are `cm3jax.train`'s. The eval hook measures text->image and image->text
recall@1/@5 on fixed held-out sets, at step 0 (the random encoder) and every ``eval_every`` steps.

The workdir gets ``config.json`` and ``tokenizer.json`` next to ``checkpoints/``, which is all
`cm3jax.retrieval.load.load_retriever` needs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cm3jax import parallel
from cm3jax.data.sources import make_source
from cm3jax.data.worlds import shapes_judge
from cm3jax.retrieval import clip, load
from cm3jax.text_tokenizer import TextTokenizer, train_bpe
from cm3jax.train import checkpoint, loop, metrics as metrics_lib, optim, state as state_lib, step as step_lib

log = logging.getLogger(__name__)

RECALL_AT = (1, 5)
# CLIP's biases, norm parameters, class token and temperature are not decayed (only matrices
# are, as in OpenAI's and OpenCLIP's recipes); scanned layers stack biases into matrices, so by name.
NO_DECAY = ('bias', 'scale', 'bq', 'bk', 'bv', 'bo', 'bi', 'cls_token', 'logit_scale')


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], 'key', None) not in NO_DECAY, params)


# ---- Data ------------------------------------------------------------------------------------

def _pair(doc, image_size: int, where: str):
    """A document's first image and first caption, or None when it lacks either."""
    texts, images = doc.texts, doc.images
    if not texts or not images:
        return None
    image = images[0]
    if image.shape[:2] != (image_size, image_size) or image.dtype != np.uint8:
        raise ValueError(f'{where}: document {doc.id!r} has a {image.dtype} image of shape {image.shape} but the '
                         f'model takes uint8 {image_size}x{image_size}; set model.image_size or the source\'s '
                         f'size (shapes: cfg.canvas, digits: size, folder/webdataset: resize)')
    return image, texts[0]


class PairBatches:
    """This process's rows of global batch after global batch, a `cm3jax.train.loop.DataIterator`:
    {'images': UInt8[b, S, S, C], 'ids': Int32[b, T], 'mask': Bool[b, T]}.

    ``source`` (already this process's shard) repeats when it ends; documents without an image
    or a caption are skipped. An optional shuffle buffer mixes sources that come in file order.
    The state is the count of pairs taken; `set_state` replays the stream up to it, which is
    exact and, for Shapes, costs about 0.2 ms per pair taken."""

    def __init__(self, source, rows: int, layout: load.TextLayout, image_size: int, shuffle_buffer: int = 0,
                 seed: int = 0):
        self.source, self.rows, self.layout, self.image_size = source, rows, layout, image_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.set_state({'pairs': 0})

    def _stream(self):
        for epoch in itertools.count():
            found = False
            for doc in self.source:
                pair = _pair(doc, self.image_size, 'data.source')
                if pair is not None:
                    found = True
                    yield pair
            if not found:
                raise ValueError(f'data.source yielded no document with both an image and a caption '
                                 f'(epoch {epoch}: {self.source.report()})')

    def _shuffled(self):
        stream = self._stream()
        if not self.shuffle_buffer:
            yield from stream
            return
        rng, buffer = np.random.default_rng([self.seed, 7]), []
        for pair in stream:  # endless: a full buffer swaps a random entry out for each newcomer
            if len(buffer) < self.shuffle_buffer:
                buffer.append(pair)
                continue
            i = int(rng.integers(len(buffer)))
            yield buffer[i]
            buffer[i] = pair

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        images, captions = zip(*itertools.islice(self._pairs, self.rows))
        self.taken += self.rows
        ids, mask, truncated = self.layout.encode(captions)
        if truncated and not self._warned:
            self._warned = True
            log.warning('captions longer than model.max_len=%d tokens are truncated (%d of %d in this batch)',
                        self.layout.max_len, truncated, self.rows)
        return {'images': np.stack(images), 'ids': ids, 'mask': mask}

    def get_state(self) -> dict:
        return {'pairs': self.taken}

    def set_state(self, state: dict) -> None:
        self.taken, self._warned = int(state['pairs']), False
        self._pairs = self._shuffled()
        for _ in itertools.islice(self._pairs, self.taken):
            pass


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A fixed held-out set: images UInt8[N, S, S, C], N captions, and relevant Bool[N, N]:
    ``relevant[i, j]`` when caption i describes image j as well as its own (always on the
    diagonal). Retrieving any relevant item counts: in Shapes, "a red circle" describes every
    scene holding just a red circle, and no encoder can tell which of them was drawn for it."""
    name: str
    images: np.ndarray
    captions: list[str]
    relevant: np.ndarray


def _describes(spec: shapes_judge.CaptionSpec, objects: list[dict]) -> bool:
    """A Shapes caption (parsed) describes a scene's objects exactly: a template names every
    object, so the counts agree and some one-to-one assignment satisfies every phrase and the relation."""
    if len(spec.objects) != len(objects) or spec.count not in (None, len(objects)):
        return False
    for perm in itertools.permutations(objects):
        if not all(o.shape == d['shape'] and o.colour == d['colour'] and o.size in (None, d['size'])
                   for o, d in zip(spec.objects, perm)):
            continue
        if spec.relation is None:
            return True
        i, rel, j = spec.relation
        a, b = perm[i], perm[j]
        if {'left of': a['x'] < b['x'], 'right of': a['x'] > b['x'], 'above': a['y'] < b['y'],
                'below': a['y'] > b['y']}[rel]:
            return True
    return False


def relevance(captions: list[str], docs: list, world=None) -> np.ndarray:
    """Bool[N, N] for `EvalSet`: with a Shapes ``world`` (ShapesConfig), whether caption i
    describes scene j; otherwise whether the captions are the same text."""
    if world is None:
        return np.asarray(captions)[:, None] == np.asarray(captions)[None, :]
    specs = [shapes_judge.parse_caption(c, world) for c in captions]
    scenes = [d.meta['scene']['objects'] for d in docs]
    out = np.array([[_describes(spec, objects) for objects in scenes] for spec in specs])
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
        pairs, docs = [], []
        for doc in source:
            pair = _pair(doc, image_size, f'data.eval.{name}')
            if pair is not None:
                pairs.append(pair)
                docs.append(doc)
            if len(pairs) == d.eval_size:
                break
        if len(pairs) < d.eval_size:
            raise ValueError(f'data.eval.{name} holds {len(pairs)} image-caption pairs, fewer than '
                             f'data.eval_size={d.eval_size}; lower it')
        images, captions = zip(*pairs)
        world = source.cfg if getattr(source, 'kind', '') == 'shapes' else None
        out.append(EvalSet(name, np.stack(images), list(captions), relevance(list(captions), docs, world)))
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
        self.mesh, self.rules, self.name = mesh, rules, data.name
        fn = lambda p, images, ids, mask, rel: recall(  # noqa: E731
            clip.embed_text(p, cfg, ids, mask), clip.embed_image(p, cfg, images), rel)
        self.fn = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))

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


def _init_params(config, cfg: clip.ClipConfig, target):
    """Params to fine-tune from ``config.init_from``: HF CLIP weights or a train-retriever workdir."""
    path = pathlib.Path(config.init_from)
    raw = json.loads((path / 'config.json').read_text()) if (path / 'config.json').exists() else {}
    if 'text_config' in raw or 'vision_config' in raw:
        from cm3jax.convert.clip import load_pretrained
        hf_cfg, params = load_pretrained(path)
        if dataclasses.replace(hf_cfg, pooling='eos', eos_token_id=cfg.eos_token_id, dtype=cfg.dtype,
                               logit_scale_init=cfg.logit_scale_init) != cfg:
            raise ValueError(f'init_from={path} holds a CLIP of another shape than model: {hf_cfg} vs {cfg}; '
                             f'set the model fields to the checkpoint\'s')
        return load.place_params(params, target)
    return checkpoint.restore_params(path, target)


def train(config, workdir: str) -> dict[str, float]:
    """Train (or resume) the retriever in ``workdir``; returns the last eval metrics."""
    with loop.Preemption() as preemption:
        return _train(config, pathlib.Path(workdir).absolute(), preemption)


def _train(config, workdir: pathlib.Path, preemption) -> dict[str, float]:
    parallel.maybe_initialize_distributed()
    t = config.train

    # ---- Mesh: pairs split over the batch axes, parameters by their logical names ----
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config)
    shards = parallel.axis_size(mesh, rules, 'act_batch')
    if t.batch % (shards * t.microbatches) or t.batch % jax.process_count():
        raise ValueError(f'train.batch={t.batch} must be a multiple of the {shards} batch shards x '
                         f'train.microbatches={t.microbatches} and of the {jax.process_count()} processes')

    # ---- Text tokenizer and model config, written for the loader ----
    tok = text_tokenizer(config, workdir)
    layout = load.text_layout(tok, config.model.max_len)
    cfg = load.clip_config(config.model, layout)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
        if not (workdir / 'tokenizer.json').exists():
            tok.save(workdir / 'tokenizer.json')

    # ---- Data: this process's shard of the source; held-out sets whole on every process ----
    source = make_source({**config.data.source.to_dict(), 'shard': (jax.process_index(), jax.process_count())})
    data = PairBatches(source, t.batch // jax.process_count(), layout, cfg.image_size,
                       config.data.shuffle_buffer, config.seed)
    evals = [RecallEval(cfg, layout, s, mesh, rules) for s in eval_sets(config, cfg.image_size)] \
        if t.eval_every else []

    # ---- Optimizer and state: fresh, resumed, or fine-tuned from init_from ----
    optimizer = optim.make_optimizer(optim.OptimConfig.from_config(config.optim, t.steps), mask=decay_mask)
    init_fn = lambda rng: clip.init_variables(cfg, rng)['params']  # noqa: E731
    target = state_lib.abstract_state(init_fn, optimizer, mesh, rules, jax.random.key(config.seed))
    ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', every_steps=t.checkpoint_every,
                                   every_seconds=60 * t.checkpoint_minutes, keep=t.keep, use_async=t.async_checkpoint)
    state = ckpt.resume(target, data)
    if state is None and config.init_from:
        state = state_lib.fresh_optimizer(_init_params(config, cfg, target['params']), optimizer, target)
    elif state is None:
        state = state_lib.init_state(init_fn, optimizer, mesh, rules, jax.random.key(config.seed))

    # ---- Update step and hooks ----
    step = step_lib.make_train_step(make_loss_fn(cfg), optimizer, t.microbatches)
    batch_sharding = parallel.logical_sharding(mesh, rules, ('act_batch',))
    train_step = step_lib.jit_train_step(step, state_lib.shardings_of(target), batch_sharding)
    writer = metrics_lib.MetricWriter(workdir)
    hooks = [loop.metrics_hook(writer, t.log_every, tokens_per_step=t.batch)]  # "tokens": pairs here
    if evals:
        hooks.append(recall_hook(evals, writer, t.eval_every))
        if int(jax.device_get(state['step'])) == 0:  # the untrained encoder: the baseline of the curve
            hooks[-1].fn(loop.StepInfo(0, state, {}, 0.0))

    # ---- Train ----
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, _ = loop.train(state=state, train_step=train_step, data=_Global(data, mesh, rules), num_steps=t.steps,
                              rng=jax.random.key(config.seed + 1), hooks=hooks, checkpointer=ckpt,
                              progress=t.progress, desc='retriever', preemption=preemption)
    ckpt.close()
    writer.close()
    rows = _last_eval(workdir)
    summary = ', '.join(f'{k.removeprefix("eval/")} {v:.3f}' for k, v in rows.items() if k.endswith('_r1'))
    tqdm.write(f'retriever step {int(jax.device_get(state["step"]))}: {summary or "no eval"}; {workdir}')
    return rows


class _Global:
    """Host-local batches -> global arrays on the batch axes (keeps get_state / set_state)."""

    def __init__(self, local, mesh, rules):
        self.local, self.mesh, self.rules = local, mesh, rules

    def __next__(self):
        return parallel.global_batch(next(self.local), self.mesh, self.rules, ('act_batch',))

    def get_state(self):
        return self.local.get_state()

    def set_state(self, state):
        self.local.set_state(state)


def _last_eval(workdir: pathlib.Path) -> dict[str, float]:
    path = workdir / 'metrics.jsonl'
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    last = next((r for r in reversed(rows) if any(k.startswith('eval/') for k in r)), {})
    return {k: v for k, v in last.items() if k.startswith('eval/')}
