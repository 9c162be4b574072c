"""Image-tokenizer encode speed: cm3jax `vq.encode` vs transformers' `ChameleonVQVAE.encode`.

The same tiny random Chameleon-shaped tokenizer (taming layout: channel multipliers
(1, 1, 2), attention at the lowest resolution) is built in PyTorch, converted with
`cm3jax.convert.vqgan`, checked to give the same codes, and timed on the same CPU in one run.
Prints one JSON line: cm3jax images/s, the PyTorch baseline and their ratio.

    python benchmarks/vq_throughput.py [--resolution 64 --base 64 --batch 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE  # noqa: E402

from cm3jax.convert import vqgan as convert  # noqa: E402
from cm3jax.vq import model as vq  # noqa: E402


def best_rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return images / min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--resolution', type=int, default=64)
    ap.add_argument('--base', type=int, default=64)
    ap.add_argument('--codes', type=int, default=1024)
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--repeats', type=int, default=5)
    args = ap.parse_args()

    latent = args.resolution // 4
    hf_cfg = transformers.ChameleonVQVAEConfig(
        embed_dim=32, num_embeddings=args.codes, latent_channels=32, resolution=args.resolution, in_channels=3,
        base_channels=args.base, channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[latent],
        double_latent=False)
    torch.manual_seed(0)
    hf = ChameleonVQVAE(hf_cfg).eval()
    cfg = convert.config_from_hf(hf_cfg)
    params = convert.from_torch(hf.state_dict(), cfg)

    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.resolution, args.resolution, 3), np.uint8)
    pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    encode = jax.jit(lambda p, x: vq.encode(p, x, cfg))
    ours = np.asarray(encode(params, images))
    with torch.inference_mode():
        theirs = hf.encode(pixels).image_tokens.numpy().reshape(ours.shape)
    agree = float((ours == theirs).mean())

    def run_ours():
        jax.block_until_ready(encode(params, images))

    def run_theirs():
        with torch.inference_mode():
            hf.encode(pixels)

    rate = best_rate(run_ours, args.batch, args.repeats)
    baseline = best_rate(run_theirs, args.batch, args.repeats)
    print(json.dumps({'benchmark': 'vq_throughput', 'images_per_s': round(rate, 1),
                      'baseline': f'transformers ChameleonVQVAE.encode (torch {torch.__version__}, '
                                  f'{torch.get_num_threads()} threads)',
                      'baseline_images_per_s': round(baseline, 1), 'ratio': round(rate / baseline, 2),
                      'codes_agree': agree, 'resolution': args.resolution, 'base_channels': args.base,
                      'batch': args.batch, 'device': jax.devices()[0].device_kind}))


if __name__ == '__main__':
    main()
