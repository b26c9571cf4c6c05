"""Shared fixtures: a per-session teacher cache and a small digits task."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never touch the user's cache; teachers are trained once per session."""
    os.environ["METAGATE_CACHE"] = str(tmp_path_factory.mktemp("metagate-cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids oversubscribing a shared CPU (steps get far slower otherwise).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_noisy():
    from metagate.data import get_task

    return get_task("digits", noise=0.4)


@pytest.fixture(scope="session")
def digits_bank(digits_noisy):
    """Three trained CNN teachers' cached logits on noisy digits (trained once per session).

    Computed on one thread, as the ``one_thread`` tests compute a module teacher's logits: a convolution's float
    sums depend on the thread count, and tests compare a run on these cached logits bit for bit with a run on
    logits the Python API computes from the same teachers."""
    from metagate.run import DistillConfig
    from metagate.teachers.build import load_teachers
    from metagate.trainer import TrainConfig

    cfg = DistillConfig(task="digits", noise=0.4, teachers=3, train=TrainConfig(device="cpu", progress=False))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bank, stats = load_teachers(cfg, digits_noisy, progress=False)
    finally:
        torch.set_num_threads(n)
    return bank, stats
