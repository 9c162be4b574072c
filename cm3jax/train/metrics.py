"""Metric writers (TensorBoard via tensorboardX, and JSONL), model FLOPs, and MFU.

Only process 0 writes; the other processes get a writer that does nothing, so callers never
branch on the process index.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip, matched by substring of `device_kind` (first match wins,
# so the more specific names come first).
KNOWN_PEAK_FLOPS = (
    ('TPU v6', 918e12), ('TPU v5 lite', 197e12), ('TPU v5', 459e12), ('TPU v4', 275e12),
    ('H200', 989e12), ('H100', 989e12), ('A100', 312e12), ('L4', 121e12),
)


class MetricWriter:
    """Scalars to ``workdir/metrics.jsonl`` (one JSON object per write) and TensorBoard
    event files in ``workdir/tensorboard``. A no-op on processes other than 0."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = self._jsonl = None
        if self.enabled:
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / 'metrics.jsonl', 'a')
            from tensorboardX import SummaryWriter  # imported here: the tests of other modules need not load it
            self._tb = SummaryWriter(str(workdir / 'tensorboard'))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def write_text(self, step: int, name: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(name, text, int(step))

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """A uint8 [H, W, C] image to TensorBoard."""
        if self.enabled:
            self._tb.add_image(name, np.asarray(image), int(step), dataformats='HWC')
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def latest(workdir: str | pathlib.Path) -> dict[str, float]:
    """The most recent value of every scalar in ``workdir/metrics.jsonl`` (empty if none), so a
    finished run, rerun, still reports what it measured."""
    path = pathlib.Path(workdir) / 'metrics.jsonl'
    out: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill mid-write
                continue
            out.update({k: v for k, v in row.items() if k not in ('step', 'time')})
    return out


def transformer_flops_per_token(*, num_layers: int, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                                mlp_dim: int, gated_mlp: bool, vocab_size: int, seq_len: int,
                                causal: bool = True) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token of a decoder-only transformer.

    Matmuls cost 2 FLOPs per multiply-add: 6 * (matmul parameters) per token, with the output
    projection onto the (padded) vocab included and the embedding gather not. Attention adds
    QK^T and AV: 2 * 2 * seq_len * heads * head_dim per layer forward, halved when causal
    because a token attends on average to half the context (PaLM's appendix B counts it unhalved).
    """
    attn_params = d_model * head_dim * (2 * num_heads + 2 * num_kv_heads)  # q, o and k, v
    mlp_params = d_model * mlp_dim * (3 if gated_mlp else 2)
    matmul_params = num_layers * (attn_params + mlp_params) + d_model * vocab_size
    attention = num_layers * 4 * seq_len * num_heads * head_dim * (0.5 if causal else 1.0)
    return 6.0 * matmul_params + 3.0 * attention


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, seconds: float = 1.0, device=None) -> float:
    """FLOP/s of a jitted [n, n] x [n, n] matmul chain on one device, best of a few timed runs."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype) / math.sqrt(n), device)

    @jax.jit
    def chain(x):  # 8 dependent matmuls per call amortise the dispatch
        for _ in range(8):
            x = x @ a
        return x

    x = jax.block_until_ready(chain(a))
    best, spent = 0.0, 0.0
    while spent < seconds or best == 0.0:
        begin = time.perf_counter()
        x = jax.block_until_ready(chain(x))
        elapsed = time.perf_counter() - begin
        spent += elapsed
        best = max(best, 8 * 2 * n**3 / elapsed)
    return best


def peak_flops(configured: float = 0.0, dtype=jnp.float32) -> tuple[float, str]:
    """The job's peak FLOP/s, and where the figure came from.

    Accelerators: ``configured`` > 0 per device, else the dense bf16 datasheet peak of known
    chips, else a large matmul in ``dtype`` measured on one device; times the device count.
    CPU: simulated devices share their process's cores, so the unit is the process, not the
    device: ``configured`` or the measured matmul, times the process count (one process per
    host; local multi-process runs on one host overstate the peak).
    """
    devices = jax.devices()
    name = np.dtype(dtype).name
    if devices[0].platform == 'cpu':
        per_process, source = (configured, 'configured') if configured > 0 else \
            (measure_matmul_flops(dtype=dtype), f'measured {name} matmul')
        return per_process * jax.process_count(), f'{source}, per process x {jax.process_count()}'
    kind = devices[0].device_kind
    if configured > 0:
        return configured * len(devices), 'configured'
    for known, flops in KNOWN_PEAK_FLOPS:
        if known in kind:
            return flops * len(devices), f'datasheet ({kind})'
    return measure_matmul_flops(dtype=dtype) * len(devices), f'measured {name} matmul ({kind})'
