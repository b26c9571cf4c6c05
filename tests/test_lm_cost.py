"""scripts/lm_cost.py: its hand-written transformers KD loss is metagate's fixed loss on the same batch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import hf_models  # noqa: F401  (sets HF_HUB_OFFLINE before transformers is imported)
import pytest
import torch

from metagate.data import get_task
from metagate.teachers.sparse_seq import sparse_seq_bank

pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "lm_cost.py"
    spec = importlib.util.spec_from_file_location("lm_cost", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Sharp(torch.nn.Module):
    """A teacher whose logits are another's times ``scale`` (a random model is near uniform: peaked, its top-k
    and its tail both carry mass)."""

    def __init__(self, inner: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask) * self.scale


def test_the_hand_written_loss_is_metagates_fixed_loss_step_after_step():
    lc = _script()
    task = get_task("lm", lm_documents=12, lm_doc_tokens=80, lm_seq_len=16)
    torch.manual_seed(1)
    teachers = [_Sharp(s.factory().eval(), 8.0) for s in task.teacher_specs]
    bank = sparse_seq_bank(teachers, [s.name for s in task.teacher_specs], task.train.x, 8)
    tail = -torch.expm1(torch.logsumexp(bank.sparse.logprobs.double(), -1))
    assert 0.05 < float(tail.mean()) < 0.95  # both parts of the rebuilt teacher matter
    alpha, tau = 0.3, 2.0
    tr = lc.core_trainer(task, bank, seed=0, batch_size=4, lr=1e-3, steps=3, alpha=alpha, tau=tau)
    torch.manual_seed(0)
    loop = lc.HandLoop(task.make_student(), bank, task.num_classes, 1e-3, 3, alpha, tau)
    assert all(torch.equal(p, q) for p, q in zip(tr.student.model.parameters(), loop.model.parameters()))
    for b in lc.batches(tr, 3):
        with torch.no_grad():
            hand = float(loop.loss(b.x, b.y, b.ids))
            logits = loop.model(input_ids=b.x, attention_mask=(b.x != 0).long()).logits
            ce = float(torch.nn.functional.cross_entropy(logits[b.y != 0], b.y[b.y != 0]))
        core = float(tr.train_step(b).loss)
        assert hand == pytest.approx(core, abs=1e-6)
        assert abs(hand - alpha * ce) > 0.1  # the KD part is not negligible
        assert loop.step(b.x, b.y, b.ids) == pytest.approx(hand, abs=1e-6)  # the same update keeps them together
