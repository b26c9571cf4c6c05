"""Data parallelism through the Trainer's own accelerate integration: 2 CPU processes (gloo) with ``fixed``
give the loss per step and the parameters of one process on the same global batch (slow: three
interpreters import transformers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(HERE / "hf_ddp_run.py"), str(one), "4"], env=env, check=True,
                   capture_output=True, timeout=600)
    # torch's launcher (what `accelerate launch --multi_gpu` calls): `accelerate launch --cpu` starts one
    # process whatever --num_processes says (accelerate 1.16's simple launcher); use_cpu=True then picks gloo
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", str(HERE / "hf_ddp_run.py"), str(two), "2"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a["world"] == 1 and b["world"] == 2
    assert len(a["losses"]) == len(b["losses"]) == 4
    for x, y in zip(a["losses"], b["losses"]):
        assert y == pytest.approx(x, rel=1e-4)
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-4, atol=1e-5)
