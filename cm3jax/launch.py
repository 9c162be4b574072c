"""Run N local processes as one multi-host JAX job on CPU, for tests and for users without a cluster.

    python -m cm3jax.launch --processes=2 --devices_per_process=4 -- \\
        cm3jax train --config=configs/lm.py:tiny --workdir=/tmp/run --config.mesh.dcn="(2,1,1)"

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which `cm3jax.parallel.maybe_initialize_distributed` reads, plus
``devices_per_process`` simulated CPU devices. Collectives go over gloo, as on a CPU cluster.
Output lines are prefixed with the process id; SIGTERM and SIGINT are forwarded to every process.
When one process fails the others are terminated, and the job exits with the failed process's
code (128 + N for a signal N); else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    import portpicker
    return portpicker.pick_unused_port()


def launch(command: list[str], processes: int, devices_per_process: int = 1, env: dict | None = None,
           prefix_output: bool = True) -> int:
    """Start ``processes`` copies of ``command`` and wait; returns the job's exit code."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f'need processes >= 1 and devices_per_process >= 1, got {processes}, {devices_per_process}')
    base = dict(os.environ if env is None else env)
    flags = [f for f in base.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
    base.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}', JAX_NUM_PROCESSES=str(processes),
                JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices_per_process), XLA_FLAGS=' '.join(flags))
    procs = [subprocess.Popen(command, env=dict(base, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1) for i in range(processes)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}

    def pump(i, proc):
        for line in proc.stdout:
            sys.stdout.write(f'[{i}] {line}' if prefix_output else line)
            sys.stdout.flush()

    pumps = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    failed = None
    while any(p.poll() is None for p in procs):
        failed = failed or next((p for p in procs if p.poll()), None)
        if failed:  # the others would wait in a collective for the dead one until they time out
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.1)
    for t in pumps:
        t.join()
    for s, handler in previous.items():
        signal.signal(s, handler)
    code = (failed or next((p for p in procs if p.returncode), procs[0])).returncode
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--processes', type=int, default=2)
    parser.add_argument('--devices_per_process', type=int, default=4)
    parser.add_argument('command', nargs=argparse.REMAINDER, help='the command each process runs, after --')
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('give the command to run after --')
    return launch(command, args.processes, args.devices_per_process)


if __name__ == '__main__':
    sys.exit(main())
