"""Text-to-image decoding speed with guidance: cm3jax's sampler vs transformers' Chameleon.

One tiny random Chameleon-shaped LM (about 20M params, GQA, SwiGLU, QK-norm, RoPE) is built in
transformers, converted with `cm3jax.convert.chameleon` (so both sides hold the same weights)
and asked for one image's worth of codes (default 256) for ``batch`` samples under
classifier-free guidance: 2 * batch rows (conditional prompts, then unconditional ones), one
token per sample per step, fed back to both of its streams. Timed on the same CPU in one run:

- cm3jax: `cm3jax.sample.decode.make_decoder` (prefill + `lax.while_loop` over the KV cache);
  its lower+compile time is reported separately;
- transformers: ``ChameleonForConditionalGeneration``'s decoder with its KV cache in a plain
  torch loop under ``inference_mode``, doing the same guidance, image-code mask and top-p
  selection in torch per step (logits from ``lm_head`` on the last hidden state: HF's
  ``forward`` overwrites image-code logits with the dtype minimum);
- no cache: cm3jax recomputing the full forward pass over a fixed buffer of prompt + new slots
  every step, in a jitted ``lax.fori_loop``. Its per-step cost does not depend on the step, so
  it runs only ``--no_cache_new`` steps and its rate is scaled from those.

A greedy run of ``--check`` tokens checks that cm3jax and transformers pick the same tokens.
Prints one JSON line.

    python benchmarks/decode_speed.py [--layers 6 --d_model 512 --batch 8 --new 256 --repeats 3]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from cm3jax import parallel  # noqa: E402
from cm3jax.lm import config as lm_config  # noqa: E402
from cm3jax.convert import chameleon as convert  # noqa: E402
from cm3jax.model import transformer  # noqa: E402
from cm3jax.sample import decode as dec, logits as lp  # noqa: E402
from cm3jax.vocab import Vocab  # noqa: E402
from configs import lm  # noqa: E402


# ---- the model, on both sides -----------------------------------------------------------------

def hf_model(vocab: Vocab, args) -> transformers.ChameleonForConditionalGeneration:
    """A random HF Chameleon over ``vocab``'s ids, image codes named IMGIMG<code>Z as in
    Chameleon's tokenizer (digits as letters A-J); norms perturbed so they are not the identity."""
    code_name = lambda c: 'IMGIMG' + ''.join(chr(65 + int(d)) for d in str(c)) + 'Z'
    vocab_map = {f't{i}': i for i in range(vocab.size) if not vocab.is_image(i)}
    vocab_map |= {code_name(c): int(vocab.image_ids(c)) for c in range(vocab.num_image_codes)}
    vq = dict(embed_dim=16, num_embeddings=vocab.num_image_codes, latent_channels=16, resolution=32,
              in_channels=3, base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1,
              attn_resolutions=[], double_latent=False)  # unused by the LM; tiny so it builds fast
    config = transformers.ChameleonConfig(
        vocab_size=vocab.size, hidden_size=args.d_model, intermediate_size=args.mlp_dim,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(512, args.prompt + args.new), vq_config=vq, vocabulary_map=vocab_map,
        pad_token_id=vocab.pad, bos_token_id=vocab.bos, eos_token_id=vocab.eos)
    torch.manual_seed(0)
    model = transformers.ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name and 'vqmodel' not in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def cm3jax_model(hf) -> tuple[transformer.Transformer, dict]:
    config = lm.get_config('tiny,chameleon')
    config.model.update(convert.model_fields_from_hf_config(hf.config))
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = lm_config.transformer_config(config, mesh, parallel.rules_from_config(config))
    weights = {k: v.float().numpy() for k, v in hf.state_dict().items() if not k.startswith('model.vqmodel.')}
    return transformer.Transformer(cfg), jax.device_put(convert.from_hf(weights, cfg))


def prompts(vocab: Vocab, batch: int, length: int) -> np.ndarray:
    """Int32[2 * batch, length]: conditional rows ``<bos> text... <break>``, then unconditional
    rows with the text replaced by ``<mask>`` (same length, so no padding on either side)."""
    text = vocab.text_ranges[0][0] + np.random.default_rng(0).integers(0, vocab.num_text, (batch, length - 2))
    cond = np.concatenate([np.full((batch, 1), vocab.bos), text, np.full((batch, 1), vocab.break_)], axis=1)
    uncond = cond.copy()
    uncond[:, 1:-1] = vocab.mask
    return np.concatenate([cond, uncond]).astype(np.int32)


# ---- transformers: a plain torch loop over its KV cache ----------------------------------------

def torch_decoder(hf, vocab: Vocab, sample: dec.SampleConfig):
    """``run(tokens [2B, T], new) -> Int64[B, new]``: the decode loop a transformers user writes
    for CFG (``generate`` has no way to tie two rows into one guided sample), on the model's
    device."""
    device = next(hf.parameters()).device
    image_ok = torch.from_numpy(vocab.allowed('image')[:vocab.size]).to(device)
    # transformers 5 renamed past_key_values to cache (the old name is deprecated)
    cache_arg = 'cache' if 'cache' in inspect.signature(hf.model.forward).parameters else 'past_key_values'

    def choose(last: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cond, uncond = torch.log_softmax(last, -1).chunk(2)
        guided = uncond + sample.cfg_scale * (cond - uncond)
        guided = guided.masked_fill(~image_ok, -torch.inf)
        if sample.temperature == 0:
            return guided.argmax(-1)
        guided = guided / sample.temperature
        if sample.top_p < 1:  # the same nucleus rule as cm3jax.sample.logits.top_p
            ranked, _ = guided.sort(-1, descending=True)
            probs = ranked.softmax(-1)
            before = probs.cumsum(-1) - probs
            cutoff_index = ((before < sample.top_p).sum(-1, keepdim=True) - 1).clamp(min=0)
            guided = guided.masked_fill(guided < ranked.gather(-1, cutoff_index), -torch.inf)
        return torch.multinomial(guided.softmax(-1), 1, generator=generator)[:, 0]

    def run(tokens: np.ndarray, new: int) -> np.ndarray:
        generator = torch.Generator(device).manual_seed(0)
        out = []
        with torch.inference_mode():
            step = hf.model(input_ids=torch.from_numpy(tokens).long().to(device), use_cache=True)
            for i in range(new):
                token = choose(hf.lm_head(step.last_hidden_state[:, -1]), generator)
                out.append(token)
                if i + 1 < new:
                    step = hf.model(input_ids=token.repeat(2)[:, None], use_cache=True,
                                    **{cache_arg: getattr(step, cache_arg)})
        return torch.stack(out, 1).cpu().numpy()  # waits for the device

    return run


# ---- cm3jax without a cache ------------------------------------------------------------------

def no_cache_decoder(model: transformer.Transformer, vocab: Vocab, sample: dec.SampleConfig, slots: int, steps: int):
    """Jitted ``(params, tokens [2B, T], rng) -> Int32[B, steps]``: every step runs the whole
    model over all ``slots`` (later slots are empty segments), then the same guidance, mask and
    selection as the cached decoder."""
    image_ok = jnp.asarray(np.pad(vocab.allowed('image'), (0, model.cfg.padded_vocab_size - vocab.padded_size)))

    @jax.jit
    def run(params, tokens, rng):
        rows, t = tokens.shape
        b = rows // 2
        buf = jnp.zeros((rows, slots), jnp.int32).at[:, :t].set(tokens)

        def body(i, carry):
            buf, rng = carry
            rng, key = jax.random.split(rng)
            filled = t + i
            segments = jnp.broadcast_to((jnp.arange(slots) < filled).astype(jnp.int32), buf.shape)
            logits = model.apply({'params': params}, buf, segments)
            last = jax.lax.dynamic_index_in_dim(logits, filled - 1, axis=1, keepdims=False)
            guided = lp.mask(lp.cfg(last[:b], last[b:], sample.cfg_scale), image_ok)
            token = lp.sample(key, guided, sample.temperature, sample.top_k, sample.top_p)
            return buf.at[:, filled].set(jnp.tile(token, 2)), rng

        buf, _ = jax.lax.fori_loop(0, steps, body, (buf, rng))
        return buf[:b, t:t + steps]

    return run


# ---- timing ----------------------------------------------------------------------------------

def best_seconds(fns, repeats: int) -> list[float]:
    """The fastest of ``repeats`` runs of each fn, run in turn (a, b, a, b, ...) so that a change
    in the load of a shared machine hits both alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            begin = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - begin)
    return [min(t) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--layers', type=int, default=6)
    ap.add_argument('--d_model', type=int, default=512)
    ap.add_argument('--heads', type=int, default=8)
    ap.add_argument('--kv_heads', type=int, default=4)
    ap.add_argument('--mlp_dim', type=int, default=1408)
    ap.add_argument('--text_ids', type=int, default=1000)
    ap.add_argument('--image_codes', type=int, default=2048)
    ap.add_argument('--batch', type=int, default=8, help='samples; the model runs 2 * batch rows (CFG)')
    ap.add_argument('--prompt', type=int, default=16)
    ap.add_argument('--new', type=int, default=256, help='new tokens per sample (= image tokens)')
    ap.add_argument('--cfg_scale', type=float, default=3.0)
    ap.add_argument('--temperature', type=float, default=1.0)
    ap.add_argument('--top_p', type=float, default=0.9)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--check', type=int, default=16, help='greedy tokens compared between cm3jax and transformers')
    ap.add_argument('--no_cache_new', type=int, default=8, help='steps the no-cache baseline runs (rate is scaled)')
    ap.add_argument('--no_cache_repeats', type=int, default=1)
    args = ap.parse_args()

    load_start = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    # on a GPU machine both sides run on the GPU; on CPU both on the CPU
    torch_device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
    vocab = Vocab.build(num_text=args.text_ids, num_image_codes=args.image_codes)
    hf = hf_model(vocab, args)
    model, params = cm3jax_model(hf)
    hf = hf.to(torch_device)
    lm_params = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith('model.vqmodel.'))
    tokens = prompts(vocab, args.batch, args.prompt)
    segments = np.ones_like(tokens)
    remaining, pending = dec.initial_image_state(tokens[:args.batch], segments[:args.batch], vocab, args.new)
    assert (remaining == args.new).all()  # every row opens an image right away
    sample = dec.SampleConfig(cfg_scale=args.cfg_scale, temperature=args.temperature, top_p=args.top_p)
    greedy = dec.SampleConfig(cfg_scale=args.cfg_scale, temperature=0.0)
    inputs = (params, jnp.asarray(tokens), jnp.asarray(segments), jax.random.key(0), jnp.asarray(remaining),
              jnp.asarray(pending))

    def cm3jax_decoder(config, new):
        return dec.make_decoder(model, vocab=vocab, image_tokens=args.new, max_new=new, sample=config,
                                stop_after_image=True)

    # Same tokens: greedy, both sides (this also warms up torch).
    ours = np.asarray(cm3jax_decoder(greedy, args.check)(*inputs)['tokens'])
    theirs = torch_decoder(hf, vocab, greedy)(tokens, args.check)
    same_rows = float((ours == theirs).all(1).mean())
    same_positions = float((ours == theirs).mean())

    # (a) cm3jax, compiled ahead of time so compilation is timed on its own
    begin = time.perf_counter()
    compiled = cm3jax_decoder(sample, args.new).lower(*inputs).compile()
    compile_s = time.perf_counter() - begin
    result = jax.block_until_ready(compiled(*inputs))  # warm-up
    assert int(result['lengths'].min()) == args.new and bool(result['done'].all())
    assert vocab.is_image(np.asarray(result['tokens'])).all()

    # (b) transformers, KV cache, torch loop; timed in turn with (a)
    run_theirs = torch_decoder(hf, vocab, sample)
    assert vocab.is_image(run_theirs(tokens, args.new)).all()  # warm-up
    ours_s, theirs_s = best_seconds([lambda: jax.block_until_ready(compiled(*inputs)),
                                     lambda: run_theirs(tokens, args.new)], args.repeats)

    # (c) cm3jax without a cache, over the full prompt + new buffer, for fewer steps
    steps = min(args.no_cache_new, args.new)
    recompute = no_cache_decoder(model, vocab, sample, args.prompt + args.new, steps)
    no_cache_inputs = (params, jnp.asarray(tokens), jax.random.key(0))
    recompute = recompute.lower(*no_cache_inputs).compile()
    no_cache_s, = best_seconds([lambda: jax.block_until_ready(recompute(*no_cache_inputs))], args.no_cache_repeats)
    no_cache_s *= args.new / steps

    rate = lambda seconds: round(args.batch * args.new / seconds, 1)
    row_rate = lambda seconds: round(2 * args.batch * args.new / seconds, 1)
    print(json.dumps({
        'benchmark': 'decode_speed', 'tokens_per_s': rate(ours_s), 'row_tokens_per_s': row_rate(ours_s),
        'seconds': round(ours_s, 3), 'compile_s': round(compile_s, 2),
        'transformers_tokens_per_s': rate(theirs_s), 'transformers_row_tokens_per_s': row_rate(theirs_s),
        'transformers_seconds': round(theirs_s, 3),
        'no_cache_tokens_per_s': rate(no_cache_s), 'no_cache_row_tokens_per_s': row_rate(no_cache_s),
        'no_cache_seconds': round(no_cache_s, 3), 'no_cache_scaled_from_steps': steps,
        'ratio_vs_transformers': round(theirs_s / ours_s, 2), 'ratio_vs_no_cache': round(no_cache_s / ours_s, 2),
        'same_tokens': same_rows, 'same_token_positions': round(same_positions, 4), 'check_tokens': args.check,
        'baseline': f'transformers {transformers.__version__} ChameleonModel + lm_head, KV cache, torch loop '
                    f'(torch {torch.__version__} on {torch_device}, {torch.get_num_threads()} threads)',
        'params': lm_params, 'layers': args.layers, 'd_model': args.d_model, 'heads': args.heads,
        'kv_heads': args.kv_heads, 'mlp_dim': args.mlp_dim, 'vocab': vocab.size, 'batch': args.batch,
        'rows': 2 * args.batch, 'prompt': args.prompt, 'new': args.new, 'cfg_scale': args.cfg_scale,
        'temperature': args.temperature, 'top_p': args.top_p, 'repeats': args.repeats, 'cores': cores,
        'load_avg_1m': [round(load_start, 2), round(os.getloadavg()[0], 2)], 'device': jax.devices()[0].device_kind,
        'jax': jax.__version__}))


if __name__ == '__main__':
    main()
