"""FID feature extraction speed: cm3jax's Flax Inception-v3 against torch-fidelity's
`FeatureExtractorInceptionV3` on the same random weights (saved to a temporary file in the
pytorch-fid layout; nothing downloads), both with the TF1 resize from the same uint8 images.
The two are checked to agree on the features first. Prints one JSON line: cm3jax images/s, the
torch baseline and their ratio.

    python benchmarks/fid_throughput.py [--batch 16 --side 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.vq_throughput import best_rate  # noqa: E402  (one timing rule for the benchmarks)
from cm3jax.eval import inception  # noqa: E402
from tests.helpers import torch_fidelity_inception  # noqa: E402


def random_state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))

    def fill(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:3]))).astype(np.float32)
        if name in ('bias', 'mean'):
            return np.zeros(leaf.shape, np.float32)
        return np.ones(leaf.shape, np.float32)
    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    state = {k: torch.tensor(v) for k, v in inception.to_state_dict(variables).items()}
    for k in [k for k in state if k.endswith('running_var')]:
        state[k.replace('running_var', 'num_batches_tracked')] = torch.tensor(0)
    state['fc.weight'], state['fc.bias'] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--side', type=int, default=64, help='input image side (both resize to 299)')
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / inception.FILE
        torch.save(random_state(), path)
        theirs = torch_fidelity_inception().FeatureExtractorInceptionV3('inception-v3-compat', ['2048'],
                                                               feature_extractor_weights_path=str(path))
        ours = inception.load_inception(path, resize='tf1', batch=args.batch)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.side, args.side, 3), np.uint8)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        want = theirs(pixels)[0].numpy()
    got = ours(images)
    error = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))

    def run_theirs():
        with torch.inference_mode():
            theirs(pixels)

    rate = best_rate(lambda: ours(images), args.batch, args.repeats)
    baseline = best_rate(run_theirs, args.batch, args.repeats)
    print(json.dumps({'benchmark': 'fid_throughput', 'images_per_s': round(rate, 2),
                      'baseline': f'torch-fidelity FeatureExtractorInceptionV3 (torch {torch.__version__}, '
                                  f'{torch.get_num_threads()} threads)',
                      'baseline_images_per_s': round(baseline, 2), 'ratio': round(rate / baseline, 2),
                      'batch': args.batch, 'side': args.side, 'resize': 'tf1', 'features': 2048,
                      'max_relative_feature_difference': error, 'device': str(jax.devices()[0])}))


if __name__ == '__main__':
    main()
