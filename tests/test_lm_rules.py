"""The lm task's rule gates on the sparse bank, its default teacher count, and `metagate bench --task lm`
(tiny-random tokenizer, a few documents: seconds)."""

from __future__ import annotations

import math
from dataclasses import replace

import hf_models  # noqa: F401  (sets HF_HUB_OFFLINE before transformers is imported)
import pytest
import torch

from metagate.errors import ConfigError

SMALL = {"lm_documents": 12, "lm_doc_tokens": 80, "lm_seq_len": 16}


def _teachers(topk, cache, **extra):
    from metagate.cli_args import build_config
    from metagate.run import load_task
    from metagate.teachers.build import load_teachers

    gate = extra.pop("gate", "fixed")
    opts = {**SMALL, **({"topk": topk} if topk else {})}
    cfg = build_config({"task": "lm", "cache_dir": str(cache), "epochs": 1, "progress": False, **opts, **extra}, gate)
    task = load_task(cfg)
    return cfg, task, *load_teachers(cfg, task, progress=False)


def test_lm_trains_its_two_teachers_by_default_and_the_other_tasks_three(tmp_path):
    from metagate.data import get_task
    from metagate.run import DistillConfig
    from metagate.teachers.training import teacher_names

    cfg, task, bank, stats = _teachers(None, tmp_path)  # no --teachers: the task's own count
    assert cfg.teachers == 2 and bank.names == ["gpt2-128", "llama-96"] and len(stats) == 2
    for name in ("digits", "fashion", "g2p"):
        assert DistillConfig(task=name).teachers == 3
    assert DistillConfig(task="lm", teachers=1).teachers == 1
    with pytest.raises(ConfigError, match="task 'lm' defines 2 teachers, 3 requested"):
        teacher_names(get_task("lm", **SMALL), DistillConfig(task="lm", teachers=3).teachers)


def test_rule_gates_on_the_sparse_bank_agree_with_the_dense_bank(tmp_path):
    """The same teachers held dense and as a top-16 sparse bank: ca-mkd reads each teacher's probability of the
    label from the sparse bank's gold log-probability, so its rows equal the dense bank's on every token but a
    chunk's last (float16 storage apart); oracle-teachers reads the top-1 entries; label-filter's ensemble top
    from the top-k entries is the dense ensemble's argmax on nearly every token."""
    from metagate.gates.registry import get_gate_class
    from metagate.trainer import Trainer

    cfg, task, dense, _ = _teachers(None, tmp_path)
    _, _, sparse, _ = _teachers(16, tmp_path)
    real = task.train.mask.reshape(-1)
    last = torch.zeros_like(task.train.mask)
    last[torch.arange(len(task.train)), task.train.mask.sum(1) - 1] = True
    inner = real & ~last.reshape(-1)

    def table(bank, gate, **options):
        tr = Trainer(task, task.make_student(), get_gate_class(gate)(**options), bank, cfg.train)
        return tr.gate._table  # noqa: SLF001

    d, s = table(dense, "ca-mkd"), table(sparse, "ca-mkd")
    assert d.shape == s.shape == (real.numel(), 3)
    assert torch.allclose(d[inner], s[inner], atol=2e-3)
    assert float((d[inner, 1] - d[inner, 2]).abs().max()) > 0.05  # the rule does weigh the teachers apart
    d, s = table(dense, "oracle-teachers", alpha=0.5), table(sparse, "oracle-teachers", alpha=0.5)
    assert (d[real] == s[real]).all(1).float().mean() > 0.99
    d, s = table(dense, "label-filter", alpha=0.5), table(sparse, "label-filter", alpha=0.5)
    assert (d[real, 0] == s[real, 0]).float().mean() > 0.98
    assert 0.05 < float((s[real, 0] == 0).float().mean()) < 0.95  # both branches fire


def test_a_rule_gate_trains_from_the_sparse_bank(tmp_path):
    from metagate.run import run_distill

    cfg, *_ = _teachers(16, tmp_path, gate="ca-mkd")
    result = run_distill(replace(cfg, logdir=str(tmp_path / "run")))
    assert result["test/nll"] < math.log(384)


def test_bench_lm_uses_the_tasks_student_and_teachers(capsys):
    from metagate.cli import main

    assert main(["bench", "--task", "lm", "--lm-documents", "8", "--lm-doc-tokens", "48", "--lm-seq-len", "16",
                 "--steps", "1", "--repeats", "1", "--batch-size", "4", "--gates", "fixed", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    assert "task lm, K=2," in out
    assert "gpt2     hand-written KD" in out and "gpt2     trainer + fixed" in out
    # an option of another task is named
    assert main(["bench", "--task", "lm", "--subset", "30", "--steps", "1"]) == 2
    assert "--subset (an option of task g2p)" in capsys.readouterr().err
