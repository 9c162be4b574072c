"""Decoding: one prefill, then a `lax.while_loop` over a preallocated KV cache.

Guidance streams are rows of one batch, stream-major: rows ``[s * B, (s + 1) * B)`` are
stream ``s`` (0 = conditional, 1 = unconditional, 2 = image-only for three-stream editing).
Each step runs one forward pass over all of them, combines the streams into one distribution
per sample (`logits.cfg` / `logits.cfg3`), picks one token per sample and feeds it to every
stream of that sample.

Each sample row is a small state machine, so one batch may hold rows mid-text and mid-image:

- text: image codes are masked out; a ``<break>`` (``vocab.break_``, Chameleon's
  begin-of-image ``<racm3:break>``) opens an image span;
- image: only image codes, exactly ``image_tokens`` of them; then the row stops
  (``stop_after_image``) or the image's end (``vocab.end_image``: CM3leon's ``<break>``,
  Chameleon's ``<eoss>``) is forced and the row is back in text;
- done: after ``<eos>`` (or one of ``stop_tokens``, e.g. ``<eoss>`` closing a CM3 infill), an
  image with ``stop_after_image``, or ``max_new`` tokens.

The loop exits early when every row is done. Prompts may be left- or right-padded (segment
id 0 on padding): positions restart at each row's first real token, and the first new token
follows each row's last real one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.model import transformer
from cm3jax.sample import logits as lp
from cm3jax.vocab import Vocab

MODES = ('sample', 'cdk', 'mixed')
CDK_EXPERTS = ('conditional', 'guided')


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How one token is chosen from the guided distribution.

    temperature (0 = greedy), top_k (0 = off), top_p (1 = off): applied in that order.
    cfg_scale: text guidance (with 2 or 3 streams); image_cfg_scale: the image-only stream's
      scale (3 streams). mode: 'sample' | 'cdk' | 'mixed' (the first ``cdk_fraction`` of the
      samples use CD-K, the rest plain sampling: the paper's best setting before re-ranking).
    cdk_k, cdk_alpha: V_head = {t : p_exp(t) >= alpha * k-th largest p_exp}; the amateur is the
      unconditional stream (or a second model, `decode`).
    cdk_expert: 'conditional' (the paper's: the conditional stream alone) or 'guided' (the
      CFG-mixed distribution).
    repetition_penalty: `logits.repetition_penalty` on text tokens (not image codes), over
      every id of the prompt and of what was generated; 1 = off (Chameleon's text preset: 1.2).
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    image_cfg_scale: float = 1.0
    mode: str = 'sample'
    cdk_k: int = 8
    cdk_alpha: float = 0.5
    cdk_fraction: float = 0.5
    cdk_expert: str = 'conditional'
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.repetition_penalty <= 0:
            raise ValueError(f'repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)')
        if self.cdk_expert not in CDK_EXPERTS:
            raise ValueError(f'cdk_expert={self.cdk_expert!r}; choose from {CDK_EXPERTS}')
        if self.mode not in MODES:
            raise ValueError(f'sample mode {self.mode!r}; choose from {MODES}')
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f'need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got {self.temperature}, '
                             f'{self.top_p}, {self.top_k}')
        if self.cdk_k < 1 or not 0 < self.cdk_alpha <= 1 or not 0 <= self.cdk_fraction <= 1:
            raise ValueError(f'need cdk_k >= 1, 0 < cdk_alpha <= 1, 0 <= cdk_fraction <= 1; got {self.cdk_k}, '
                             f'{self.cdk_alpha}, {self.cdk_fraction}')


@flax.struct.dataclass
class DecodeState:
    """The `decode` loop's carry, one pytree (S = guidance streams, B = samples, V = vocab).

    step: tokens generated so far; cache / last: the model's KV cache over all S * B rows and its
    latest logits Float[S * B, V]; small_cache / small_last: the amateur model's (None without
    one); tokens: Int32[B, max_new], ``<pad>`` where nothing was generated; done: Bool[B];
    remaining: Int32[B], image codes the row still owes; pending: Bool[B], a finished image
    awaiting its closing ``vocab.end_image``; lengths: Int32[B], tokens generated per row;
    seen: Bool[B, V], the ids in each row so far (None without a repetition penalty); key: the RNG.
    """
    step: jax.Array
    cache: Any
    last: jax.Array
    small_cache: Any
    small_last: Any
    tokens: jax.Array
    done: jax.Array
    remaining: jax.Array
    pending: jax.Array
    lengths: jax.Array
    seen: Any
    key: jax.Array


def initial_image_state(prompts: np.ndarray, segment_ids: np.ndarray, vocab: Vocab,
                        image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(remaining Int32[B], pending_break Bool[B]) for the conditional prompts [B, T]: how many
    image codes the row still owes when the prompt ends inside an image (or right after a
    text ``<break>``), and whether a finished image must be closed by ``vocab.end_image``."""
    remaining, pending = np.zeros(len(prompts), np.int32), np.zeros(len(prompts), bool)
    for b, (row, seg) in enumerate(zip(prompts, segment_ids)):
        row = row[seg > 0]
        image = np.asarray(vocab.is_image(row), bool)
        other = np.flatnonzero(~image)
        codes = len(row) - (other[-1] + 1 if len(other) else 0)  # trailing image codes
        if codes > image_tokens:
            raise ValueError(f'prompt row {b} ends in an image span of {codes} codes, more than the '
                             f'{image_tokens} an image has')
        if codes:
            remaining[b] = image_tokens - codes
        elif len(row) and row[-1] == vocab.break_ and not (len(row) > 1 and image[-2]
                                                             and vocab.end_image == vocab.break_):
            remaining[b] = image_tokens  # text, then <break> (or any begin-of-image): an image is due
        pending[b] = codes > 0 and remaining[b] == 0
    return remaining, pending


def decode(model: transformer.Transformer, params, prompts: jax.Array, segment_ids: jax.Array, rng: jax.Array, *,
           vocab: Vocab, image_tokens: int, max_new: int, sample: SampleConfig, remaining: jax.Array,
           pending_break: jax.Array, stop_after_image: bool = False,
           stop_tokens: tuple[int, ...] = (), amateur: transformer.Transformer | None = None,
           amateur_params=None) -> dict[str, jax.Array]:
    """Generate up to ``max_new`` tokens per sample.

    prompts, segment_ids: Int32[S * B, T], S guidance streams stream-major (module docstring);
    remaining, pending_break: [B] from `initial_image_state` of the conditional rows.
    amateur, amateur_params: a second (smaller) model sharing the vocab, run on the conditional
    prompts alongside, as CD-K's amateur in place of the unconditional stream.
    Returns {'tokens': Int32[B, max_new] (``<pad>`` after a row is done), 'lengths': Int32[B]
    (tokens generated, the stop token included), 'done': Bool[B] (False for rows cut by
    ``max_new``)}. Jit it (see `make_decoder`); it is pure.
    """
    rows, t = prompts.shape
    b = remaining.shape[0]
    streams = rows // b
    if streams * b != rows or streams not in (1, 2, 3):
        raise ValueError(f'{rows} prompt rows for {b} samples: give 1, 2 or 3 guidance streams of {b} rows each')
    if sample.mode != 'sample' and streams < 2 and amateur is None:
        raise ValueError(f"sample mode {sample.mode!r} needs an amateur: the unconditional stream or a second model")
    slots = t + max_new
    model, params = transformer.unrolled(model, params)  # once, not per step
    cache = transformer.init_cache(model.cfg, rows, slots)
    cache = jax.tree.map(nn.with_logical_constraint, cache, transformer.cache_axes(model.cfg),
                         is_leaf=lambda x: isinstance(x, tuple))
    logits, cache = transformer.prefill(model, params, cache, prompts, segment_ids)
    last_real = t - 1 - jnp.argmax((segment_ids > 0)[:, ::-1], axis=1)
    last = jnp.take_along_axis(logits, last_real[:, None, None], axis=1)[:, 0]
    small_cache, small_last = None, None
    if amateur is not None:
        amateur, amateur_params = transformer.unrolled(amateur, amateur_params)
        small_cache = transformer.init_cache(amateur.cfg, b, slots)
        small_logits, small_cache = transformer.prefill(amateur, amateur_params, small_cache, prompts[:b],
                                                        segment_ids[:b])
        small_last = jnp.take_along_axis(small_logits, last_real[:b, None, None], axis=1)[:, 0]

    v = logits.shape[-1]
    pad_to = lambda m: jnp.zeros(v, bool).at[:m.shape[0]].set(jnp.asarray(m[:v]))
    image_ok = pad_to(vocab.allowed('image'))
    text_ok = pad_to(vocab.allowed('text', 'special') & ~np.isin(np.arange(vocab.padded_size),
                                                                 [vocab.pad, vocab.bos]))
    end_ok = jnp.zeros(v, bool).at[vocab.end_image].set(True)
    cdk_rows = jnp.arange(b) < {'sample': 0, 'cdk': b, 'mixed': round(sample.cdk_fraction * b)}[sample.mode]

    penalise = sample.repetition_penalty != 1
    seen = None
    if penalise:  # the conditional rows' prompts (their padding excluded)
        seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], prompts[:b]].max(segment_ids[:b] > 0)

    def choose(last, small_last, remaining, pending, seen, key):
        s = last.reshape(streams, b, v)
        if penalise:  # on text steps only, as Meta's inference does
            text_step = ((remaining == 0) & ~pending)[:, None]
            s = jnp.where(text_step, lp.repetition_penalty(s, seen, sample.repetition_penalty), s)
        if streams == 1:
            guided = lp.log_probs(s[0])
        elif streams == 2:
            guided = lp.cfg(s[0], s[1], sample.cfg_scale)
        else:
            guided = lp.cfg3(s[0], s[2], s[1], sample.cfg_scale, sample.image_cfg_scale)
        allowed = jnp.where(pending[:, None], end_ok, jnp.where((remaining > 0)[:, None], image_ok, text_ok))
        plain_key, cdk_key = jax.random.split(key)
        guided = lp.mask(guided, allowed)
        token = lp.sample(plain_key, guided, sample.temperature, sample.top_k, sample.top_p)
        if sample.mode != 'sample':  # V_head is taken among the allowed ids, so it is never empty
            weak = s[1] if small_last is None else small_last[:, :v]
            expert = guided if sample.cdk_expert == 'guided' else lp.mask(lp.log_probs(s[0]), allowed)
            contrast = lp.cdk(expert, weak, sample.cdk_k, sample.cdk_alpha)
            token = jnp.where(cdk_rows, lp.sample(cdk_key, contrast, sample.temperature, 0, sample.top_p), token)
        return token

    def body(st: DecodeState) -> DecodeState:
        key, step_key = jax.random.split(st.key)
        token = jnp.where(st.done, vocab.pad, choose(st.last, st.small_last, st.remaining, st.pending, st.seen,
                                                      step_key))
        in_image = st.remaining > 0
        opens_image = (token == vocab.break_) & ~st.pending  # a forced CM3leon <break> closes an image instead
        remaining = jnp.where(st.done, st.remaining, jnp.where(in_image, st.remaining - 1,
                                                               jnp.where(opens_image, image_tokens, 0)))
        finished_image = in_image & (remaining == 0)
        pending = jnp.where(st.done, st.pending, finished_image & (not stop_after_image))
        done = st.done | jnp.isin(token, jnp.array((vocab.eos, *stop_tokens))) | (finished_image & stop_after_image)
        last, cache = transformer.decode_step(model, params, st.cache, jnp.tile(token, streams))
        small_last, small_cache = st.small_last, st.small_cache
        if amateur is not None:
            small_last, small_cache = transformer.decode_step(amateur, amateur_params, small_cache, token)
        return DecodeState(step=st.step + 1, cache=cache, last=last, small_cache=small_cache, small_last=small_last,
                           tokens=st.tokens.at[:, st.step].set(token), done=done, remaining=remaining,
                           pending=pending, lengths=st.lengths + (~st.done), key=key,
                           seen=None if st.seen is None else st.seen.at[jnp.arange(b), token].set(True))

    def more(st: DecodeState) -> jax.Array:
        return (st.step < max_new) & ~st.done.all()

    start = DecodeState(step=jnp.int32(0), cache=cache, last=last, small_cache=small_cache, small_last=small_last,
                        tokens=jnp.full((b, max_new), vocab.pad, jnp.int32), done=jnp.zeros(b, bool),
                        remaining=remaining.astype(jnp.int32), pending=pending_break.astype(bool),
                        lengths=jnp.zeros(b, jnp.int32), seen=seen, key=rng)
    end = jax.lax.while_loop(more, body, start)
    return {'tokens': end.tokens, 'lengths': end.lengths, 'done': end.done}


def check_lengths(model_cfg: transformer.TransformerConfig, prompt_len: int, max_new: int) -> None:
    """A clear error before anything compiles when prompt + generation exceed the context."""
    if max_new < 1:
        raise ValueError(f'max_new={max_new}: ask for at least one new token')
    if prompt_len + max_new > model_cfg.max_len:
        raise ValueError(f'a prompt of {prompt_len} tokens plus {max_new} new ones exceeds the model\'s context '
                         f'of {model_cfg.max_len} (model.max_len): shorten the prompt or lower max_new')


def make_decoder(model: transformer.Transformer, *, vocab: Vocab, image_tokens: int, max_new: int,
                 sample: SampleConfig, stop_after_image: bool = False, stop_tokens: tuple[int, ...] = (),
                 amateur: transformer.Transformer | None = None):
    """``jax.jit`` of `decode` with everything static bound: ``fn(params, prompts, segment_ids,
    rng, remaining, pending_break, amateur_params=None)``. Call it under ``jax.set_mesh(mesh)``
    and the model's logical axis rules with sharded params to decode on a mesh (rows on the
    batch axes)."""
    fn = functools.partial(decode, model, vocab=vocab, image_tokens=image_tokens, max_new=max_new, sample=sample,
                           stop_after_image=stop_after_image, stop_tokens=tuple(stop_tokens), amateur=amateur)
    return jax.jit(lambda params, prompts, segment_ids, rng, remaining, pending, amateur_params=None: fn(
        params, prompts, segment_ids, rng, remaining=remaining, pending_break=pending,
        amateur_params=amateur_params), compiler_options=compiler_options())


def compiler_options() -> dict[str, str]:
    """XLA options for the decode program on the default backend.

    On CPU, YNNPACK's dot fusions are turned off for it: a decode step multiplies a few rows by
    every weight matrix, and at such shapes XLA's Eigen dots stream the weights about twice as
    fast (512x1408 at 16 rows: 0.35 vs 0.66 ms in a loop; YNNPACK wins from about 64 rows, as in
    training). The whole decode step gains about 12% (26 vs 29.5 ms in benchmarks/decode_speed).
    Other backends take XLA's defaults.
    """
    return {'xla_cpu_experimental_ynn_fusion_type': ''} if jax.default_backend() == 'cpu' else {}
