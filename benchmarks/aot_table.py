"""The memory table of docs/scaling.md: `cm3jax.aot.compile_train_step` for each preset and
remat policy on 8 simulated CPU devices (FSDP 8) at 1 and 2 rows of 4096 tokens per device; one
JSON line per compile, then the markdown table.

From the two compiles, peak(rows) = fixed + rows * per_row. FSDP 64 and 256 are compiled at one
row per device when the process has that many (simulated) devices, their per-row cost taken from
FSDP 8; otherwise they are extrapolated (marked *): params, gradients and Adam's two moments
(4 float32 copies) shrink with the FSDP size and the rest is taken as fixed, which overstates
them (the optimizer's update temporaries shrink too).

    XLA_FLAGS=--xla_force_host_platform_device_count=256 JAX_PLATFORMS=cpu python benchmarks/aot_table.py \
        [--presets cm3leon_350m,cm3leon_760m,cm3leon_7b,chameleon_34b] [--remat none,full]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from cm3jax import aot  # noqa: E402
from configs import lm  # noqa: E402

GB = 1e9  # accelerator capacities are quoted in decimal GB
CAPACITIES = (16, 32, 80, 141)


def measure(preset: str, remat: str, rows: int, devices: int = 8) -> aot.Report:
    config = lm.get_config(preset)
    config.model.remat = remat
    config.train.batch = devices * rows
    return aot.compile_train_step(config, jax.devices()[:devices])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--presets', default='cm3leon_350m,cm3leon_760m,cm3leon_7b,chameleon_34b')
    p.add_argument('--remat', default='none,full')
    args = p.parse_args()
    lines = ['| preset | params | remat | FSDP | state GB/device | fixed GB | GB per row of 4096 | rows/device on '
             + ' / '.join(f'{c} GB' for c in CAPACITIES) + ' |', '|' + '---|' * 8]
    for preset in args.presets.split(','):
        for remat in args.remat.split(','):
            t = time.time()
            one, two = measure(preset, remat, 1), measure(preset, remat, 2)
            print(json.dumps({'preset': preset, 'remat': remat, 'seconds': round(time.time() - t, 1),
                              **{f'{k}_rows{n}': round(getattr(r, k) / GB, 3) for n, r in ((1, one), (2, two))
                                 for k in ('params', 'optimizer', 'temporaries', 'arguments', 'peak')}}), flush=True)
            per_row = two.peak - one.peak
            for fsdp in (8, 64, 256):
                measured = fsdp <= jax.device_count()
                if fsdp == 8:
                    fixed = one.peak - per_row
                elif measured:
                    at = measure(preset, remat, 1, fsdp)
                    print(json.dumps({'preset': preset, 'remat': remat, 'fsdp': fsdp,
                                      **{k: round(getattr(at, k) / GB, 3) for k in ('params', 'optimizer', 'temporaries',
                                                                                   'arguments', 'peak')}}), flush=True)
                    fixed = at.peak - per_row
                else:
                    fixed = one.peak - per_row - 4 * one.params * (1 - 8 / fsdp)  # params, grads, 2 moments
                fits = [max(0, int((c * GB - fixed) // per_row)) for c in CAPACITIES]
                state = (one.params + one.optimizer) * 8 / fsdp
                lines.append(f'| {preset} | {one.num_params / 1e9:.2f}B | {remat} | {fsdp}{"" if measured else "*"} | '
                             f'{state / GB:.2f} | {fixed / GB:.2f} | {per_row / GB:.2f} | '
                             f'{" / ".join(map(str, fits))} |')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
