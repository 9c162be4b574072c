"""Text-to-image, image-to-text and interleaved continuation on top of `decode` (docs/paper.md, "Tokenizers" and "Decoding").

    t2i prompt (conditional):   [retrieved docs, each ... <eos>] caption <break>   -> H*W codes
    t2i prompt (unconditional): [retrieved docs]               <mask>    <break>   -> CFG's stream
    i2t, CM3 infill form:       <mask:0> <break> [image] <mask:0>                  -> caption <eoss>
    i2t, continuation form:     [image] <break>                                    -> caption <eos>

A `Generator` holds what every call needs (model, params, vocab, text tokenizer, VQ tokenizer);
each function builds host-side prompts, left-pads them into one batch, runs one jitted
`decode` and turns ids back into images and text.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.data import documents, instructions as ins
from cm3jax.model import transformer
from cm3jax.sample import decode as dec
from cm3jax.vocab import Vocab
from cm3jax.vq import model as vq

# (images uint8 [N, R, R, C], prompt) -> Float[N] scores, higher is better (e.g. CLIP score)
ScoreFn = Callable[[np.ndarray, str], np.ndarray]


@dataclasses.dataclass
class Generator:
    """What every call needs. caption_dropout: whether the model was trained with
    ``data.caption_dropout`` (then the unconditional stream's caption is ``<mask>``, the token
    dropout put there; else ``<mask:0>``, which CM3 shows wherever a whole caption is masked)."""
    model: transformer.Transformer
    params: Any
    vocab: Vocab
    text_tokenizer: Any
    vq_params: Any
    vq_cfg: vq.VQConfig
    caption_dropout: bool = True

    @property
    def uncond_token(self) -> int:
        return self.vocab.require_mask() if self.caption_dropout else self.vocab.sentinel(0)

    @property
    def image_tokens(self) -> int:
        return self.vq_cfg.latent_resolution ** 2

    def text(self, s: str) -> np.ndarray:
        return self.text_tokenizer.encode_joint(s, self.vocab)


def read_image(path: str | pathlib.Path, resolution: int) -> np.ndarray:
    """An image file to caption -> uint8 [R, R, 3], refused with what to pass when it is missing,
    not RGB, or not the image tokenizer's ``resolution`` square (no silent resize: the caption
    would describe a picture the model never saw)."""
    from PIL import Image
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'--image={path}: no such file; pass a PNG or JPEG of {resolution}x{resolution} '
                                f'RGB pixels')
    try:
        with Image.open(path) as img:
            img.load()
            mode, size = img.mode, img.size
            pixels = np.asarray(img)
    except OSError as e:
        raise ValueError(f'--image={path} is not a readable image ({e}); pass a PNG or JPEG') from None
    if mode != 'RGB':
        raise ValueError(f'--image={path} is a {mode} image; pass an RGB one (e.g. PIL: '
                         f'Image.open(path).convert("RGB").save(new_path))')
    if size != (resolution, resolution):
        raise ValueError(f'--image={path} is {size[0]}x{size[1]}, but this model\'s image tokenizer takes '
                         f'{resolution}x{resolution}; resize or crop it to that first')
    return pixels


def left_pad(rows: Sequence[np.ndarray], pad: int, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged Int rows -> (tokens, segment_ids) Int32[N, T], left-padded (segment id 0 on padding)
    to the longest row, or to ``width`` when that is longer."""
    t = max(width, max(len(r) for r in rows))
    tokens, segs = np.full((len(rows), t), pad, np.int32), np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            tokens[i, t - len(r):], segs[i, t - len(r):] = r, 1
    return tokens, segs


def batch_multiple() -> int:
    """How many ways the current mesh (``jax.set_mesh``) splits the batch under the current
    logical rules; 1 outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = dict(nn.get_logical_axis_rules()).get('act_batch') or ()
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def _run(gen: Generator, streams: list[list[np.ndarray]], sample: dec.SampleConfig, rng, max_new: int,
         stop_after_image: bool = False, stop_tokens: tuple[int, ...] = (), pad_to: int = 0) -> dict[str, np.ndarray]:
    """streams: per guidance stream, one prompt per sample (same count in each). The samples
    are padded with copies to a multiple of the mesh's batch split and the copies dropped;
    prompts are left-padded to the longest, or to ``pad_to`` (calls of one shape compile once)."""
    n = len(streams[0])
    extra = -n % batch_multiple()
    streams = [list(s) + [s[-1]] * extra for s in streams]
    tokens, segs = left_pad([r for stream in streams for r in stream], gen.vocab.pad, pad_to)
    dec.check_lengths(gen.model.cfg, tokens.shape[1], max_new)
    b = len(streams[0])
    remaining, pending = dec.initial_image_state(tokens[:b], segs[:b], gen.vocab, gen.image_tokens)
    fn = dec.make_decoder(gen.model, vocab=gen.vocab, image_tokens=gen.image_tokens, max_new=max_new, sample=sample,
                          stop_after_image=stop_after_image, stop_tokens=stop_tokens)
    out = jax.device_get(fn(gen.params, jnp.asarray(tokens), jnp.asarray(segs), rng, jnp.asarray(remaining),
                            jnp.asarray(pending)))
    return {k: v[:n] for k, v in out.items()}


def _check_num(num: int) -> None:
    if num < 1:
        raise ValueError(f'num={num}: ask for at least one sample per prompt')


def _guided(sample: dec.SampleConfig) -> bool:
    return sample.cfg_scale != 1.0 or sample.mode != 'sample'


def text_to_image(gen: Generator, prompts: Sequence[str], *, num: int = 1, sample: dec.SampleConfig = dec.SampleConfig(),
                  rng: jax.Array | None = None, retrieved: Sequence[Sequence[np.ndarray]] | None = None,
                  score_fn: ScoreFn | None = None, uncond_token: int | None = None,
                  pad_to: int = 0) -> dict[str, np.ndarray]:
    """``num`` images per prompt -> {'images': uint8 [P, num, R, R, C], 'codes': [P, num, h, w],
    'scores': [P, num] (when ``score_fn``; samples sorted best first)}.

    retrieved: per prompt, laid-out token documents (each ending in ``<eos>``) put before both
    streams' prompts (retrieval augmentation at inference). uncond_token: what replaces the
    caption in the unconditional stream; default `Generator.uncond_token`. A ``sample.mode`` of 'mixed' splits
    each prompt's samples between CD-K and plain sampling before re-ranking. pad_to: left-pad the
    prompts to this many tokens (0: the longest), so that calls over many batches compile once.
    """
    _check_num(num)
    if not prompts:
        raise ValueError('text_to_image needs at least one prompt')
    v = gen.vocab
    ctx = [np.concatenate([np.zeros(0, np.int32), *(retrieved[i] if retrieved else [])]) for i in range(len(prompts))]
    cond = [np.concatenate([c, gen.text(p), [v.break_]]).astype(np.int32) for c, p in zip(ctx, prompts)]
    blank = gen.uncond_token if uncond_token is None else uncond_token
    uncond = [np.concatenate([c, [blank, v.break_]]).astype(np.int32) for c in ctx]
    # samples of one prompt are spread over the batch so that 'mixed' gives each prompt both strategies
    order = [(n, p) for n in range(num) for p in range(len(prompts))]
    streams = [[cond[p] for n, p in order]] + ([[uncond[p] for n, p in order]] if _guided(sample) else [])
    out = _run(gen, streams, sample, rng if rng is not None else jax.random.key(0), gen.image_tokens,
               stop_after_image=True, pad_to=pad_to)
    r = gen.vq_cfg.latent_resolution
    codes = np.asarray(v.image_codes(out['tokens'][:, :gen.image_tokens])).reshape(num, len(prompts), r, r)
    codes = codes.transpose(1, 0, 2, 3)  # [P, num, r, r]
    images = np.asarray(vq.decode(gen.vq_params, jnp.asarray(codes.reshape(-1, r, r)), gen.vq_cfg))
    images = images.reshape(len(prompts), num, *images.shape[1:])
    result = {'images': images, 'codes': codes}
    if score_fn is not None:
        scores = np.stack([np.asarray(score_fn(images[i], p), np.float32) for i, p in enumerate(prompts)])
        best = np.argsort(-scores, axis=1, kind='stable')
        take = lambda x: np.take_along_axis(x, best.reshape(best.shape + (1,) * (x.ndim - 2)), axis=1)
        result = {'images': take(images), 'codes': take(codes), 'scores': np.take_along_axis(scores, best, 1)}
    return result


def image_to_text(gen: Generator, images: np.ndarray, *, form: str = 'infill', max_new: int = 32,
                  sample: dec.SampleConfig = dec.SampleConfig(temperature=0.0),
                  rng: jax.Array | None = None) -> list[str]:
    """Captions for uint8 images [B, R, R, C]: the CM3 infill form ``<mask:0> <break> [image]
    <mask:0>`` (ends at ``<eoss>``) or the continuation form ``[image] <break>`` (ends at ``<eos>``)."""
    if form not in ('infill', 'continue'):
        raise ValueError(f"image_to_text form={form!r}; choose 'infill' or 'continue'")
    if _guided(sample):
        raise ValueError('image_to_text decodes one stream: use cfg_scale=1 and mode="sample"')
    if not len(images):
        raise ValueError('image_to_text needs at least one image')
    v = gen.vocab
    codes = np.asarray(vq.encode(gen.vq_params, images, gen.vq_cfg)).reshape(len(images), -1)
    ids = np.asarray(v.image_ids(codes), np.int32)
    s0 = v.sentinel(0)
    prompts = [np.concatenate([[s0, v.break_], row, [s0]] if form == 'infill' else [row, [v.break_]]).astype(np.int32)
               for row in ids]
    out = _run(gen, [prompts], sample, rng if rng is not None else jax.random.key(0), max_new, stop_tokens=(v.eoss,))
    return [gen.text_tokenizer.decode_joint(row[:n][v.is_text(row[:n])], v) for row, n in zip(out['tokens'],
                                                                                          out['lengths'])]


def continue_document(gen: Generator, segments: Sequence[documents.Segment], *, max_new: int,
                      sample: dec.SampleConfig = dec.SampleConfig(), rng: jax.Array | None = None) -> list:
    """An interleaved continuation: the document so far (text and uint8 images) -> its next
    segments, decoded (str, or uint8 images), until ``<eos>`` or ``max_new`` tokens."""
    v = gen.vocab
    ids = [segment_ids(gen, s) for s in segments]
    is_image = [not isinstance(s, str) for s in segments]
    if not ids:
        raise ValueError('continue_document needs at least one segment to continue')
    prompt = documents.join(ids, is_image, v)
    out = _run(gen, [[prompt]], sample, rng if rng is not None else jax.random.key(0), max_new)
    return segments_of(gen, out['tokens'][0, :out['lengths'][0]])


def segments_of(gen: Generator, row: np.ndarray) -> list:
    """Generated ids Int[N] -> the segments they spell: str, or uint8 images decoded by the
    VQ-GAN (a whole image's codes between image marks); other ids are dropped."""
    v = gen.vocab
    parts, r = [], (gen.vq_cfg.latent_resolution if gen.vq_cfg else 0)
    for piece in np.split(row, np.flatnonzero(np.isin(row, (v.break_, v.end_image)))):
        piece = piece[~np.isin(piece, (v.break_, v.end_image, v.eos))]
        if not len(piece):
            continue
        if r and v.is_image(piece).all() and len(piece) == r * r:
            parts.append(np.asarray(vq.decode(gen.vq_params, jnp.asarray(v.image_codes(piece)).reshape(1, r, r),
                                              gen.vq_cfg))[0])
        else:
            parts.append(gen.text_tokenizer.decode_joint(piece, v, non_text='drop'))
    return parts


def image_nll(gen: Generator, captions: Sequence[str | None], images: np.ndarray, *, batch: int = 256) -> np.ndarray:
    """Mean NLL, in nats per image token, of each uint8 image [N, R, R, C] drawn after its
    caption (``caption <break>``, the conditional stream) or, where the caption is None, after
    the unconditional stream's prompt (``<mask> <break>``, what classifier-free guidance
    subtracts) -> Float64[N].

    Guidance needs both streams trained: with caption dropout the unconditional loss sits a
    little above the conditional one; without it the unconditional stream is never seen."""
    if len(captions) != len(images):
        raise ValueError(f'image_nll needs one caption (or None) per image; got {len(captions)} and {len(images)}')
    v = gen.vocab
    codes = np.asarray(vq.encode(gen.vq_params, images, gen.vq_cfg)).reshape(len(images), -1)
    targets = list(np.asarray(v.image_ids(codes), np.int32))
    prompts = [np.concatenate([[gen.uncond_token] if c is None else gen.text(c), [v.break_]]).astype(np.int32)
               for c in captions]
    return sequence_nll(gen, prompts, targets, batch=batch) / codes.shape[1]


def caption_nll(gen: Generator, images: np.ndarray, captions: Sequence[str], *, batch: int = 256) -> np.ndarray:
    """Total NLL, in nats, of each caption (and its ``<eos>``) written after its uint8 image
    [N, R, R, C] in the image-to-text order ``[image] <break> caption <eos>`` -> Float64[N]: the
    model's own judgement of how well an image fits a caption (re-ranking by it needs no CLIP).
    For the model's own samples use `caption_nll_codes` on the codes it drew: decoding and
    encoding again changes many codes, and the model reads those far worse (docs/quickstart.md)."""
    return caption_nll_codes(gen, np.asarray(vq.encode(gen.vq_params, images, gen.vq_cfg)), captions, batch=batch)


def caption_nll_codes(gen: Generator, codes: np.ndarray, captions: Sequence[str], *, batch: int = 256) -> np.ndarray:
    """`caption_nll` of images given as their VQ codes Int[N, h, w] (or [N, h*w]) -> Float64[N]."""
    if len(captions) != len(codes):
        raise ValueError(f'caption_nll needs one caption per image; got {len(captions)} and {len(codes)}')
    v = gen.vocab
    ids = np.asarray(v.image_ids(np.asarray(codes).reshape(len(codes), -1)), np.int32)
    prompts = [np.concatenate([row, [v.break_]]).astype(np.int32) for row in ids]
    targets = [np.concatenate([gen.text(c), [v.eos]]).astype(np.int32) for c in captions]
    return sequence_nll(gen, prompts, targets, batch=batch)


def sequence_nll(gen: Generator, prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray], *,
                 batch: int = 256) -> np.ndarray:
    """Total NLL, in nats, of each ``targets[i]`` (Int32[n_i]) after ``prompts[i]`` (Int32[m_i])
    -> Float64[N], by teacher forcing in left-padded chunks of ``batch`` rows."""
    v = gen.vocab
    rows = [np.concatenate([p, t[:-1]]).astype(np.int32) for p, t in zip(prompts, targets)]
    dec.check_lengths(gen.model.cfg, max(map(len, rows)), 1)
    n = max(map(len, targets))
    want = np.zeros((len(targets), n), np.int32)  # right-aligned: the rows are left-padded
    mask = np.zeros((len(targets), n), np.float32)
    for i, t in enumerate(targets):
        want[i, n - len(t):], mask[i, n - len(t):] = t, 1.0

    @jax.jit
    def nll(params, tokens, segs, want, mask):
        logits = gen.model.apply({'params': params}, tokens, segs)[:, -n:, :v.size].astype(jnp.float32)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), want[..., None], axis=-1)[..., 0]
        return -(picked * mask).sum(axis=1)

    out, split = [], batch_multiple()
    width = max(map(len, rows))  # one padded length for every chunk: one compile
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        extra = -len(chunk) % split  # the mesh splits the batch: pad with copies, drop them after
        tokens, segs = left_pad(chunk + chunk[-1:] * extra, v.pad, width)
        w, m = (np.concatenate([a, np.repeat(a[-1:], extra, 0)])
                for a in (want[start:start + batch], mask[start:start + batch]))
        out.append(np.asarray(jax.device_get(nll(gen.params, jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(w),
                                                 jnp.asarray(m))))[:len(chunk)])
    return np.concatenate(out).astype(np.float64)


# ---- instructions (`cm3jax.data.instructions` templates; docs/sft.md) ----------------------------

EDIT_SAMPLE = dec.SampleConfig(cfg_scale=7.5, image_cfg_scale=1.5)  # the paper's text and image guidance


def segment_ids(gen: Generator, seg) -> np.ndarray:
    """A text (str) or image (uint8 [R, R, C]) segment -> its joint-vocab ids Int32[n]."""
    if isinstance(seg, str):
        return gen.text(seg)
    image = np.asarray(seg)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f'an image segment must be uint8 [H, W, C], got {image.dtype} {image.shape}')
    vq._check_images(image[None], gen.vq_cfg)
    codes = np.asarray(vq.encode(gen.vq_params, image[None], gen.vq_cfg)).reshape(-1)
    return np.asarray(gen.vocab.image_ids(codes), np.int32)


def instruction_prompt(gen: Generator, tpl: ins.Template, masked: tuple[int, ...] = ()) -> np.ndarray:
    """The tokens a template is generated from: for an image output at its end, the segments
    before it and the ``<break>`` that opens it (Chameleon's layout: its begin-image mark); for
    an output before other segments (VQA's answer), CM3's infill form, ``... <mask:0> ...
    <mask:0>``. Segments in ``masked`` become ``<mask>`` (the unconditional streams of guidance),
    keeping their place and modality."""
    v = gen.vocab
    first = tpl.output.index(True)
    infill = any(not o for o in tpl.output[first:])
    segs = tpl.segments if infill else tpl.segments[:first]
    ids, is_image = [], []
    for k, seg in enumerate(segs):
        if k == first:  # infill: the answer's place
            ids.append(np.array([v.sentinel(0)], np.int32))
        elif k in masked:
            ids.append(np.array([v.require_mask()], np.int32))
        else:
            ids.append(segment_ids(gen, seg))
        is_image.append(seg is not None and not isinstance(seg, str))
    body = documents.join(ids, is_image, v)
    return np.concatenate([body, [v.sentinel(0) if infill else v.break_]]).astype(np.int32)


def _draw(gen: Generator, tpls: Sequence[ins.Template], streams: list[tuple[int, ...]], num: int,
          sample: dec.SampleConfig, rng) -> np.ndarray:
    """Each template's output image, ``num`` times -> uint8 [P, num, R, R, C]; ``streams``: the
    segments each guidance stream masks (stream-major: full, none, then image-only)."""
    _check_num(num)
    if not tpls:
        raise ValueError('nothing to generate: give at least one input')
    prompts = [[instruction_prompt(gen, t, m) for t in tpls] for m in streams]
    rows = [[p[i] for n in range(num) for i in range(len(tpls))] for p in prompts]
    out = _run(gen, rows, sample, rng if rng is not None else jax.random.key(0), gen.image_tokens,
               stop_after_image=True)
    r = gen.vq_cfg.latent_resolution
    codes = np.asarray(gen.vocab.image_codes(out['tokens'][:, :gen.image_tokens])).reshape(num, len(tpls), r, r)
    images = np.asarray(vq.decode(gen.vq_params, jnp.asarray(codes.transpose(1, 0, 2, 3).reshape(-1, r, r)),
                                  gen.vq_cfg))
    return images.reshape(len(tpls), num, *images.shape[1:])


def _streams(sample: dec.SampleConfig, conditions: tuple[int, ...], text: tuple[int, ...] = ()) -> list:
    """The masked segments of each stream: [full] alone; with guidance [full, none], or, where
    ``text`` names the text conditions, [full, none, image-only] (`logits.cfg3`: with an image
    scale of 1 it guides the text against the image-only stream)."""
    if not _guided(sample):
        return [()]
    if not conditions:
        raise ValueError('this task has no condition that training drops, so guidance has no unconditional '
                         'stream: use cfg_scale=1 and mode="sample"')
    return [(), conditions, text] if text else [(), conditions]


def edit(gen: Generator, images: np.ndarray, instructions: Sequence[str], *, num: int = 1,
         sample: dec.SampleConfig = EDIT_SAMPLE, rng: jax.Array | None = None) -> np.ndarray:
    """Text-guided editing: uint8 images [N, R, R, C] and one instruction each -> the edited
    images uint8 [N, num, R, R, C]. Three-stream guidance (full / image only / none) with
    ``sample.cfg_scale`` on the text and ``sample.image_cfg_scale`` on the image."""
    if len(images) != len(instructions):
        raise ValueError(f'edit needs one instruction per image; got {len(images)} images, {len(instructions)} '
                         f'instructions')
    tpls = [ins.edit(im, text) for im, text in zip(images, instructions)]
    return _draw(gen, tpls, _streams(sample, (1, 2), (2,)), num, sample, rng)


def structure(gen: Generator, edges: np.ndarray, captions: Sequence[str], *, num: int = 1,
              sample: dec.SampleConfig = dec.SampleConfig(), rng: jax.Array | None = None) -> np.ndarray:
    """Structure-guided generation: edge maps uint8 [N, R, R, C] and captions -> images
    [N, num, R, R, C]."""
    if len(edges) != len(captions):
        raise ValueError(f'structure needs one caption per edge map; got {len(edges)} and {len(captions)}')
    return _draw(gen, [ins.structure(e, c) for e, c in zip(edges, captions)], _streams(sample, (1, 2)), num,
                 sample, rng)


def grounded(gen: Generator, captions: Sequence[str], objects: Sequence[Sequence[tuple[str, tuple]]], *,
             num: int = 1, sample: dec.SampleConfig = dec.SampleConfig(), rng: jax.Array | None = None) -> np.ndarray:
    """Spatially grounded generation: captions and, per caption, [(description, (x0, y0, x1, y1))]
    -> images [N, num, R, R, C] with each object in its box."""
    if len(captions) != len(objects):
        raise ValueError(f'grounded needs one object list per caption; got {len(captions)} and {len(objects)}')
    return _draw(gen, [ins.grounded(c, list(o)) for c, o in zip(captions, objects)], _streams(sample, ()), num,
                 sample, rng)


def write(gen: Generator, texts: Sequence[str], *, num: int = 1, sample: dec.SampleConfig = dec.SampleConfig(),
          rng: jax.Array | None = None) -> np.ndarray:
    """How-to-write: strings -> images [N, num, R, R, C] of them drawn."""
    return _draw(gen, [ins.write(t) for t in texts], _streams(sample, ()), num, sample, rng)


def answer(gen: Generator, images: np.ndarray, questions: Sequence[str], *, max_new: int = 8,
           rng: jax.Array | None = None) -> list[str]:
    """VQA: uint8 images [N, R, R, C] and a question each -> the answers, greedy, in the infill
    form of the template (``Question: q Answer: <mask:0>. <break> [image] <mask:0>``)."""
    if len(images) != len(questions):
        raise ValueError(f'answer needs one question per image; got {len(images)} and {len(questions)}')
    if not len(images):
        raise ValueError('answer needs at least one image')
    v = gen.vocab
    prompts = [instruction_prompt(gen, ins.vqa(im, q)) for im, q in zip(images, questions)]
    out = _run(gen, [prompts], dec.SampleConfig(temperature=0.0), rng if rng is not None else jax.random.key(0),
               max_new, stop_tokens=(v.eoss,))
    return [gen.text_tokenizer.decode_joint(row[:n][v.is_text(row[:n])], v).strip()
            for row, n in zip(out['tokens'], out['lengths'])]
