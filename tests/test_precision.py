"""Mixed precision of the student forward (``--precision``): bf16 autocast on CPU, fp16 refused without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from metagate.errors import ConfigError
from metagate.gates.fixed import FixedGate
from metagate.trainer import TrainConfig, Trainer, resolve_device, resolve_precision, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(task, bank, precision: str, device: str = "cpu") -> tuple[dict[str, float], Trainer]:
    seed_everything(0)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, device=device, precision=precision, progress=False)
    tr = Trainer(task, task.make_student(), FixedGate(alpha=0.5, tau=4.0), bank, cfg)
    return tr.fit(), tr


def test_bf16_autocast_on_cpu_trains_close_to_fp32(digits_noisy, digits_bank):
    bank, _ = digits_bank
    fp32, _ = _fit(digits_noisy, bank, "fp32")
    bf16, tr = _fit(digits_noisy, bank, "bf16")
    assert all(math.isfinite(v) for k, v in bf16.items() if k.startswith("test/"))
    assert bf16 != fp32  # the forward really ran in bf16
    assert abs(bf16["test/acc"] - fp32["test/acc"]) < 0.03, (bf16["test/acc"], fp32["test/acc"])
    assert abs(bf16["test/nll"] - fp32["test/nll"]) < 0.1
    assert next(tr.student.parameters()).dtype == torch.float32  # the weights stay fp32
    assert tr.scaler is None
    x = digits_noisy.train.x[:4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tr.student(x).dtype == torch.bfloat16


def test_fp16_without_cuda_is_a_clear_error(digits_noisy, digits_bank):
    with pytest.raises(ConfigError, match=r"--precision fp16 needs CUDA .* the device is cpu; on CPU use --precision "
                                          r"bf16 or fp32"):
        _fit(digits_noisy, digits_bank[0], "fp16")
    with pytest.raises(ConfigError, match=r"--precision must be one of fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"precision.*'fp8'"):
        TrainConfig(precision="fp8")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
