"""Shared test settings: one torch thread and one BLAS thread (the machine is shared; measured faster), fixed seeds."""

import pytest
import torch

try:  # scipy's 3x3 solves inside ASE's filters were ~10x slower threaded on the shared 2-core machine
    import scipy.linalg  # noqa: F401  (load scipy's own OpenBLAS first, so the limit reaches it too)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
except ImportError:  # pragma: no cover
    pass

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
