"""Chameleon's (and Anole's) prompt formats and guidance on top of `decode`, as Meta's inference
code builds them (docs/chameleon.md):

    text-to-image:  <s> caption <racm3:break>                    -> H*W codes, then <eoss>
    captioning:     <s> <racm3:break> codes <eoss> question [<reserved08706>]   -> text, </s>
    interleaved:    <s> text <racm3:break> codes <eoss> text ...  -> more of both

An image prompt is guided by three streams (`decode`'s order): the full prompt, the unconditional
``<s> <racm3:break>``, and the image-only one (the prompt with its text removed: only ``<s>``,
image codes and the begin/end-of-image tokens stay), combined by `logits.cfg3` with Chameleon's
text scale 3.0 and image scale 1.2 at temperature 0.7 and top-p 0.9 (`IMAGE`). Text is drawn at
temperature 0.7 and top-p 0.9 with Meta's repetition penalty of 1.2 on text tokens (`TEXT`).
Anole-7B uses the same formats; Chameleon-7B's released weights were
tuned not to draw images, so its images are noise.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.data import documents
from cm3jax.sample import decode as dec, generate
from cm3jax.vq import model as vq

IMAGE = dec.SampleConfig(temperature=0.7, top_p=0.9, cfg_scale=3.0, image_cfg_scale=1.2)
TEXT = dec.SampleConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
END_OF_TURN = '<reserved08706>'  # Meta's <END-OF-TURN> sentinel: closes a user turn in chat prompts


def _check(gen: generate.Generator) -> None:
    if gen.vocab.end_image == gen.vocab.break_:
        raise ValueError('cm3jax.sample.chameleon needs a Chameleon vocab (images closed by <eoss>); this is a '
                         'CM3leon layout: use cm3jax.sample.generate')


def _need_vq(gen: generate.Generator) -> None:
    if gen.vq_params is None:
        raise ValueError('this checkpoint has no image tokenizer: convert it with the release\'s vqgan.ckpt and '
                         'vqgan.yaml (cm3jax convert chameleon, docs/chameleon.md)')


def image_ids(gen: generate.Generator, image: np.ndarray) -> np.ndarray:
    """uint8 [R, R, 3] -> ``<racm3:break> codes <eoss>`` Int32[H*W + 2]."""
    _need_vq(gen)
    codes = np.asarray(vq.encode(gen.vq_params, np.asarray(image)[None], gen.vq_cfg)).reshape(-1)
    v = gen.vocab
    return np.concatenate([[v.break_], v.image_ids(codes), [v.end_image]]).astype(np.int32)


def document(gen: generate.Generator, segments: Sequence[str | np.ndarray]) -> np.ndarray:
    """``<s>`` and the segments (str, or uint8 images) in order, each image wrapped."""
    _check(gen)
    ids, is_image = [], []
    for s in segments:
        image = not isinstance(s, str)
        if image:
            _need_vq(gen)
            codes = np.asarray(vq.encode(gen.vq_params, np.asarray(s)[None], gen.vq_cfg)).reshape(-1)
            ids.append(np.asarray(gen.vocab.image_ids(codes), np.int32))
        else:
            ids.append(gen.text(s))
        is_image.append(image)
    body = documents.join(ids, is_image, gen.vocab) if ids else np.zeros(0, np.int32)
    return np.concatenate([[gen.vocab.bos], body]).astype(np.int32)


def guidance_streams(prompt: np.ndarray, vocab) -> list[np.ndarray]:
    """An image prompt ending in ``<racm3:break>`` -> [full, unconditional, image-only] (`decode`'s
    stream order): unconditional ``<s> <racm3:break>``; image-only keeps ``<s>``, the image codes
    and the begin/end-of-image tokens."""
    keep = np.asarray(vocab.is_image(prompt), bool) | np.isin(prompt, (vocab.bos, vocab.break_, vocab.end_image))
    return [prompt, np.array([vocab.bos, vocab.break_], np.int32), prompt[keep]]


def text_to_image(gen: generate.Generator, prompts: Sequence[str | Sequence], *, num: int = 1,
                  sample: dec.SampleConfig = IMAGE, rng: jax.Array | None = None) -> dict[str, np.ndarray]:
    """``num`` images per prompt -> {'images': uint8 [P, num, R, R, C], 'codes': [P, num, h, w]}.
    A prompt is a caption, or a list of segments (str and uint8 images: editing or
    image-conditioned prompts); ``<racm3:break>`` is put after it. Guidance: 3 streams (full /
    unconditional / image-only) unless ``sample.cfg_scale == 1``."""
    _check(gen)
    _need_vq(gen)
    if num < 1 or not prompts:
        raise ValueError('text_to_image needs at least one prompt and num >= 1')
    v = gen.vocab
    rows = [np.concatenate([document(gen, [p] if isinstance(p, str) else p), [v.break_]]).astype(np.int32)
            for p in prompts]
    order = [p for _ in range(num) for p in range(len(prompts))]
    per = [guidance_streams(rows[p], v) for p in order]
    guided = sample.cfg_scale != 1.0 or sample.image_cfg_scale != 1.0
    streams = [[s[i] for s in per] for i in range(3 if guided else 1)]
    out = generate._run(gen, streams, sample, rng if rng is not None else jax.random.key(0), gen.image_tokens,
                        stop_after_image=True)
    r = gen.vq_cfg.latent_resolution
    codes = np.asarray(v.image_codes(out['tokens'][:, :gen.image_tokens])).reshape(num, len(prompts), r, r)
    codes = codes.transpose(1, 0, 2, 3)
    images = np.asarray(vq.decode(gen.vq_params, jnp.asarray(codes.reshape(-1, r, r)), gen.vq_cfg))
    return {'images': images.reshape(len(prompts), num, *images.shape[1:]), 'codes': codes}


def caption_prompt(gen: generate.Generator, image: np.ndarray, question: str = '',
                   end_of_turn: bool = True) -> np.ndarray:
    """``<s> <racm3:break> codes <eoss> question [<reserved08706>]``: the end-of-turn token closes a
    chat turn (Chameleon's and Anole's chat-tuned weights answer after it)."""
    prompt = document(gen, [image] + ([question] if question else []))
    if end_of_turn:
        vocab_map = gen.text_tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        if END_OF_TURN not in vocab_map:
            raise ValueError(f'the tokenizer has no {END_OF_TURN} (end of turn); pass end_of_turn=False '
                             f'(cm3jax sample --noend_of_turn)')
        prompt = np.concatenate([prompt, [vocab_map[END_OF_TURN]]]).astype(np.int32)
    return prompt


def image_to_text(gen: generate.Generator, images: np.ndarray, *, question: str = '', max_new: int = 64,
                  sample: dec.SampleConfig = TEXT, end_of_turn: bool = True,
                  rng: jax.Array | None = None) -> list[str]:
    """Captions (or answers to ``question``) for uint8 images [B, R, R, C]; text only, ending at
    ``</s>`` (a ``<racm3:break>`` also ends it, as in Meta's text decoder)."""
    _check(gen)
    if not len(images):
        raise ValueError('image_to_text needs at least one image')
    prompts = [caption_prompt(gen, im, question, end_of_turn) for im in images]
    v = gen.vocab
    out = generate._run(gen, [prompts], sample, rng if rng is not None else jax.random.key(0), max_new,
                        stop_tokens=(v.break_,))
    return [gen.text_tokenizer.decode_joint(row[:n], v, non_text='drop') for row, n in zip(out['tokens'],
                                                                                     out['lengths'])]


def continue_document(gen: generate.Generator, segments: Sequence[str | np.ndarray], *, max_new: int,
                      sample: dec.SampleConfig = TEXT, rng: jax.Array | None = None) -> list:
    """Interleaved continuation: ``<s>`` and the document so far -> its next segments (str, or
    uint8 images decoded by the VQ-GAN), until ``</s>`` or ``max_new`` tokens. One stream: the
    images in it are not guided."""
    _check(gen)
    prompt = document(gen, segments)
    out = generate._run(gen, [[prompt]], sample, rng if rng is not None else jax.random.key(0), max_new)
    return generate.segments_of(gen, out['tokens'][0, :out['lengths'][0]])
