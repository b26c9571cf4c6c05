"""A task's pretrained teachers (lm ``--lm-teacher smollm2``) get ``select_acc`` and ``test_acc`` as the trained
teachers do, measured once and cached beside the bank (metagate.teachers.pretrained). SmolLM2 stands in here as
small modules put under the tiny-random lm task's ``info["pretrained_teachers"]``."""

from __future__ import annotations

import dataclasses
import json
import re

import hf_models  # noqa: F401  (sets HF_HUB_OFFLINE before transformers is imported)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagate.teachers.pretrained as pretrained
from metagate.compare.outputs import teachers_table
from metagate.errors import StaleCacheError
from metagate.gates.baselines import BestTeacherGate
from metagate.run import DistillConfig, load_task
from metagate.seq_metrics import language_metrics
from metagate.teachers.build import load_teachers
from metagate.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"lm_documents": 12, "lm_doc_tokens": 80, "lm_seq_len": 16}


class Peek(nn.Module):
    """A "pretrained" teacher that reads the next input token (input t + 1 is target t on a clean split): right
    on every real token but a chunk's last, where it guesses the chunk's first input token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = x if x is not None else input_ids
        return self.scale * F.one_hot(torch.roll(ids, -1, dims=1), self.vocab).float()


def hand_accuracy(split) -> float:
    """Peek's token accuracy on ``split``, counted token by token."""
    right = total = 0
    for xs, ys in zip(split.x.tolist(), split.y.tolist()):
        for t, y in enumerate(ys):
            if y != 0:
                total += 1
                right += xs[(t + 1) % len(xs)] == y
    return right / total


@pytest.fixture
def measured(monkeypatch):
    """Counts the measurements (each pretrained teacher's two accuracies) that actually run."""
    calls = {"n": 0}
    real = pretrained.measure

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrained, "measure", counted)
    return calls


def _setup(tmp_path, topk=16, teachers=1):
    cfg = DistillConfig(task="lm", task_options={**SMALL, **({"topk": topk} if topk else {})}, teachers=teachers,
                        cache_dir=str(tmp_path), train=TrainConfig(epochs=1, progress=False))
    task = load_task(cfg)
    torch.manual_seed(0)
    peek, rand = Peek(task.num_classes), task.make_student("gpt2-tiny").eval()  # rand: a random tiny GPT-2
    task.info["pretrained_teachers"] = [("peek", lambda: peek), ("rand", lambda: rand)]
    return cfg, task, peek, rand


def test_pretrained_teachers_get_token_accuracies_read_from_the_cache_then(tmp_path, measured):
    cfg, task, peek, rand = _setup(tmp_path)
    bank, stats = load_teachers(cfg, task, progress=False)
    assert bank.names == ["gpt2-128", "peek", "rand"] and measured["n"] == 1
    by = {s["name"]: s for s in stats}
    assert by["peek"]["kind"] == by["rand"]["kind"] == "pretrained"
    for split, key in ((task.select, "select_acc"), (task.test, "test_acc")):
        want = hand_accuracy(split)
        assert 0.8 < want < 1.0  # a chunk's last token is missed
        assert by["peek"][key] == pytest.approx(want, abs=1e-12)
        # the accuracy the shared loop's evaluate gives a model (a trained teacher's select_acc / test_acc)
        assert by["peek"][key] == pytest.approx(language_metrics(peek, split)["acc"], abs=1e-12)
        assert by["rand"][key] == pytest.approx(language_metrics(rand, split)["acc"], abs=1e-12)
        assert by["rand"][key] < 0.05  # a random model over 384 tokens
    assert by["peek"]["tau"] > 0 and by["rand"]["tau"] > 0  # the fit still runs on every module teacher
    path = tmp_path / task.key / "pretrained-gpt2-128+peek+rand-top16.json"
    blob = json.loads(path.read_text())
    assert blob["stats"] == {n: {k: by[n][k] for k in ("select_acc", "test_acc")} for n in ("peek", "rand")}
    # the second load reads the file: nothing measured, the same stats
    again, stats2 = load_teachers(cfg, task, progress=False)
    assert measured["n"] == 1 and stats2 == stats
    # --rebuild-cache measures again (the same numbers)
    _, stats3 = load_teachers(dataclasses.replace(cfg, rebuild_cache=True), task, progress=False)
    assert measured["n"] == 2 and stats3 == stats
    # the compare's teacher table shows them
    table = teachers_table({0: stats})
    assert re.search(rf"\| peek \| {100 * by['peek']['select_acc']:.2f} \| {100 * by['peek']['test_acc']:.2f} \|",
                     table)


def test_best_teacher_picks_the_pretrained_teacher_with_the_best_select_accuracy(tmp_path, measured):
    cfg, task, _, _ = _setup(tmp_path)
    _, stats = load_teachers(cfg, task, progress=False)
    by = {s["name"]: s["select_acc"] for s in stats}
    assert by["peek"] > by["gpt2-128"] > by["rand"]  # the trained teacher: about 0.1 on this tiny corpus
    assert BestTeacherGate.choose(stats) == {"best_teacher": "peek"}
    # without peek the trained teacher has the best select accuracy
    assert BestTeacherGate.choose([s for s in stats if s["name"] != "peek"]) == {"best_teacher": "gpt2-128"}


def test_changed_splits_or_weights_make_the_stats_stale(tmp_path, measured):
    cfg, task, peek, rand = _setup(tmp_path, topk=None, teachers=0)  # a dense bank: the weights are the identity
    bank, _ = load_teachers(cfg, task, progress=False)
    path = tmp_path / task.key / "pretrained-peek+rand.json"
    written = path.read_bytes()
    y = task.select.y.clone()
    y[0, 0] = 7 if int(y[0, 0]) != 7 else 8  # one select target changed
    moved = dataclasses.replace(task, select=dataclasses.replace(task.select, y=y))
    named = f"stale pretrained teacher stats cache {re.escape(str(path))}"
    with pytest.raises(StaleCacheError, match=f"{named}.*select and test splits"):
        load_teachers(cfg, moved, progress=False)
    assert measured["n"] == 1 and path.read_bytes() == written  # nothing measured, nothing overwritten
    # other weights (the same predictions): stale too
    with torch.no_grad():
        peek.scale += 1.0
    with pytest.raises(StaleCacheError, match=f"{named}.*teachers \\(names and weights\\)"):
        pretrained.pretrained_stats(task, bank, [peek, rand], ["peek", "rand"], tmp_path)
    with torch.no_grad():
        peek.scale -= 1.0
    assert pretrained.pretrained_stats(task, bank, [peek, rand], ["peek", "rand"], tmp_path) == \
        json.loads(written)["stats"]
    assert measured["n"] == 1
    # an edited value is a damaged file, named
    blob = json.loads(written)
    blob["stats"]["peek"]["select_acc"] = 1.0
    path.write_text(json.dumps(blob))
    with pytest.raises(StaleCacheError, match=f"damaged pretrained teacher stats cache {re.escape(str(path))}: its "
                                              "checksum"):
        load_teachers(cfg, task, progress=False)
    assert measured["n"] == 1
