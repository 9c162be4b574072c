"""Every test sees 8 simulated CPU devices, so sharded code runs on a (2, 2, 2) mesh."""

import os
import shutil
import sys
import tempfile

# Must precede the first jax import anywhere in the test session. Most tests are a few steps of a
# small program, and compiling it is most of their time: without LLVM's expensive passes a 2-step
# VQ-GAN run on the mesh took 16% less time on one core, and the long learning tests (VQ-GAN to
# 30 dB, the retriever's 800 steps) took the same.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                           ' --xla_llvm_disable_expensive_passes=true')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session, its xdist workers and the commands tests start:
# many tests compile the same programs (a trainer run three times to test resuming, say), and on
# two cores compiling is much of the suite's time. Programs are cached only when their compile
# takes over a second; a cached executable is the same program, so results do not change.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ  # named here, so removed at the end (below)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'cm3jax-test-cache-{os.environ.get("PYTEST_XDIST_TESTRUNUID", os.getpid())}'))



def _keep_to_own_cores():
    """Under `pytest -n N`, worker i (and the commands its tests start, which inherit this) runs on
    every N-th core from i. Each XLA process sizes its thread pool to the cores it may use; two
    pools contending for the same two cores spent about 8% more time in hand-offs than two pinned
    ones did on a 2-core machine, and the suite's time is all compute."""
    worker, count = os.environ.get('PYTEST_XDIST_WORKER', ''), os.environ.get('PYTEST_XDIST_WORKER_COUNT', '')
    if not (worker.startswith('gw') and count.isdigit()) or not hasattr(os, 'sched_setaffinity'):
        return
    cores = sorted(os.sched_getaffinity(0))
    mine = cores[int(worker[2:]) % len(cores)::int(count)]
    if mine and len(cores) >= int(count):
        os.sched_setaffinity(0, mine)


_keep_to_own_cores()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for `configs`

import pytest  # noqa: E402

# The three longest tests (about 5, 2.5 and 2.5 minutes on 2 cores) go first, in that order, so
# that under `pytest -n 2` the workers start them while the rest wait, instead of one of them
# starting last.
# (`make test` runs xdist with --dist loadgroup: a module whose tests share an expensive module
# fixture marks itself `pytest.mark.xdist_group`, so the fixture is built on one worker, once.
# Tests moved here must not share a module fixture: xdist built such a fixture once per test
# after the move.)
FIRST = ('test_the_quickstart_runs_every_stage', 'test_tiny_retriever_learns', 'test_tiny_tokenizer_reaches_30db')


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: next((i for i, name in enumerate(FIRST) if name in item.name), len(FIRST)))


def pytest_sessionfinish(session):
    # the controlling process (not an xdist worker, whose env already names the cache) removes the
    # cache it named: it lasts one run, and runs do not pile up in the temp dir
    if _OWN_CACHE and not hasattr(session.config, 'workerinput'):
        shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


@pytest.fixture(scope='session')
def repo():
    return REPO
