from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from unfreeze_hpo import faults

# The suite may inject faults (tests/test_faults.py); every Ray and subprocess it starts inherits
# this. No real run sets it, so a faults: block anywhere else is refused.
os.environ[faults.ENV] = "1"

# Property tests draw the same examples on every run (a failure reproduces; a pass is not luck)
# and are never failed by a busy machine's clock: no per-example deadline, no too-slow check.
settings.register_profile(
    "suite", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("suite")


@pytest.fixture(scope="module")
def ray_session(request: pytest.FixtureRequest) -> Iterator[None]:
    """An in-process Ray for one test module, on the machine's 2 cores.

    Workers cannot import test modules (pytest puts tests/ on the driver's path only), so the
    requesting module's functions are shipped by value.
    """
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(request.module)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
