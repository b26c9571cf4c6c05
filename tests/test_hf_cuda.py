"""On a GPU (marked ``cuda``: deselected by default, skipped without CUDA; ``scripts/gpu_check.sh`` runs them)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gated_kd_on_cuda_equals_cpu():
    from metagate.losses import SparseTeacher, gated_kd

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 40, generator=g), torch.randn(2, 6, 40, generator=g)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[1, 3:] = -100
    lp, ids = torch.log_softmax(t, -1).topk(8, -1)
    cpu = gated_kd(s, [t, SparseTeacher(ids, lp)], labels, tau=2.0)
    gpu = gated_kd(s.cuda(), [t.cuda(), SparseTeacher(ids.cuda(), lp.cuda())], labels.cuda(), tau=2.0)
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-5)


@pytest.mark.parametrize("gate", ["fixed", "hard"])
def test_gated_kd_trainer_bf16_on_cuda(tmp_path, gate):
    from hf_models import tiny_gpt2, tiny_llama, token_sequences
    from transformers import TrainingArguments

    from metagate.hf import GatedKDTrainer
    from metagate.hf.trainer import causal_lm_collator

    seqs = [{"input_ids": s} for s in token_sequences(16, 50, seed=1)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                             learning_rate=5e-3, report_to=[], save_strategy="no", bf16=True, disable_tqdm=True)
    tr = GatedKDTrainer(model=tiny_gpt2(50, seed=3).train(), args=args, train_dataset=seqs,
                        data_collator=causal_lm_collator(), teachers=[tiny_gpt2(50, seed=1), tiny_llama(50, seed=2)],
                        gate=gate)
    tr.train()
    logs = [h for h in tr.state.log_history if "gate/label_share" in h]
    assert len(logs) == 2 and all(h["loss"] > 0 and h["train/ppl"] > 1 for h in logs)
    assert next(tr.model.parameters()).device.type == "cuda"
