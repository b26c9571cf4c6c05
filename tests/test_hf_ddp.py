"""Data parallelism through the Trainer's own accelerate integration: 2 CPU processes (gloo) with ``fixed``
give the loss per step, the logged gate numbers and the parameters of one process on the same global batch; the
learned gates stay one gate on every process (slow: the interpreters import transformers)."""

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
    # the gate shares, token ECE and perplexity are summed over both processes' tokens: one process's numbers
    assert len(a["logs"]) == len(b["logs"]) == 4
    for x, y in zip(a["logs"], b["logs"]):
        assert x.keys() == y.keys() and {"train/ppl", "train/token_ece", "gate/teacher1_share"} <= x.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_learned_gates_are_one_gate_on_every_process(tmp_path):
    """meta (net), reinforce, temperature and ctkd on 2 gloo processes, each gate built per process from its own seed or
    theta: the gate starts from process 0's parameters, learns (it moves), and its updates average the
    processes' gradients, so both processes end with the same gate and the same student."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29518", str(HERE / "hf_ddp_run.py"), str(out), "2",
                        "meta,reinforce,ctkd,temperature"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for gate in ("meta", "reinforce", "ctkd", "temperature"):
        a, b = (torch.load(f"{out}.{gate}.rank{i}", weights_only=True) for i in (0, 1))
        assert a["world"] == b["world"] == 2 and (a["rank"], b["rank"]) == (0, 1)
        for x, y in zip(a["gate_before"], b["gate_before"]):
            assert torch.equal(x, y), gate  # process 0's start
        assert any(not torch.equal(x, y) for x, y in zip(a["gate_before"], a["gate_after"])), gate  # it learned
        for x, y in zip(a["gate_after"], b["gate_after"]):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
        for k in a["params"]:
            torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-6, atol=1e-7)
        if gate == "ctkd":  # process 1 was built with theta 1.1: the run starts from process 0's 1.0
            assert a["gate_before"][0].item() == b["gate_before"][0].item() == 1.0
        if gate == "meta":
            assert a["updates"] == b["updates"] == 4
