"""Bring your own student, teachers and data: teacher files, module teachers, the Python API, task plugins."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import metagate
from metagate.data import TASKS
from metagate.errors import ConfigError, InputError, StaleCacheError
from metagate.run import DistillConfig, run_distill
from metagate.teachers.cache import default_cache_dir
from metagate.teachers.files import file_logits, read_teacher_file, topk_arrays, topk_log_probs
from metagate.teachers.training import load_or_train_teachers
from metagate.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"epochs": 2, "device": "cpu", "progress": False}


def _save(path, blob):
    """Write a teacher file in the format its suffix names."""
    if path.suffix == ".npy":
        np.save(path, blob)
    elif path.suffix == ".npz":
        np.savez(path, **blob)
    elif path.suffix == ".pt":
        torch.save(blob, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in blob.items()}, str(path))
    return path


# -- in-project vs module vs file teachers -----------------------------------------------------------------
def test_module_file_and_tensor_teachers_give_the_in_project_student(digits_noisy, digits_bank, tmp_path):
    task = digits_noisy
    bank, _ = digits_bank
    cfg = DistillConfig(task="digits", noise=0.4, teachers=3, gate="fixed", train=TrainConfig(**FAST),
                        logdir=str(tmp_path / "project"))
    want = {k: v for k, v in run_distill(cfg, task=task).items() if k != "teachers"}
    assert want["test/acc"] > 0.3  # chance is 0.1 (40% label noise, two epochs)

    mods, _, _ = load_or_train_teachers(task, 3, default_cache_dir())
    n = len(task.train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    t0, t1, t2 = (bank.logits[:, k].clone() for k in range(3))
    files = [
        _save(tmp_path / "t0.npy", t0.numpy()),
        _save(tmp_path / "t1.pt", {"logits": t1[perm], "ids": perm}),  # rows in another order, keyed by id
        _save(tmp_path / "t2.safetensors", {"logits": t2[perm], "ids": perm}),
    ]
    data = {"train": (task.train.x, task.train.y), "meta": (task.meta.x, task.meta.y),
            "select": (task.select.x, task.select.y), "test": (task.test.x, task.test.y),
            "corrupted": task.corrupted, "clean_labels": task.clean_train_labels}
    for teachers in (mods, files, [t0, t1.numpy(), t2], [mods[0], files[1], t2]):
        res = metagate.distill(task.students["mlp"], teachers, data["train"], gate="fixed", train_config=FAST,
                               **{k: v for k, v in data.items() if k != "train"}, cache_dir=default_cache_dir())
        assert res.metrics == want  # bit-identical: same logits, same student


def test_module_teacher_is_frozen_and_its_logits_cached_by_fingerprint(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    teacher = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    kw = {"val": (torch.randn(10, 5), torch.randint(0, 3, (10,))), "gate": "fixed", "train_config": FAST,
          "cache_dir": tmp_path, "teacher_names": ["net"]}
    res = metagate.distill(nn.Linear(5, 3), [teacher], (x, y), **kw)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        torch.testing.assert_close(res.trainer.bank.logits[:, 0], teacher(x), rtol=0, atol=0)  # eval: no dropout
    cached = list(tmp_path.glob("*/logits-net.pt"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    metagate.distill(nn.Linear(5, 3), [teacher], (x, y), **kw)
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not recomputed
    with torch.no_grad():
        teacher[0].bias.add_(0.1)
    with pytest.raises(StaleCacheError, match="stale teacher cache"):
        metagate.distill(nn.Linear(5, 3), [teacher], (x, y), **kw)


# -- top-k ------------------------------------------------------------------------------------------------
def test_topk_reconstruction_spreads_the_remainder_uniformly():
    lp = torch.tensor([[0.5, 0.3], [0.6, 0.2]]).log()
    idx = torch.tensor([[2, 0], [1, 3]])
    full = topk_log_probs(idx, lp, torch.tensor([0.2, 0.2]), num_classes=4).exp()
    torch.testing.assert_close(full, torch.tensor([[0.3, 0.1, 0.5, 0.1], [0.1, 0.6, 0.1, 0.2]]))
    # k = C - 1 reconstructs the distribution exactly; without a remainder it is 1 - top mass (which loses
    # the digits of a tiny tail to cancellation)
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 3
    a, want = topk_arrays(logits, 5), torch.log_softmax(logits, -1)
    torch.testing.assert_close(topk_log_probs(a["indices"], a["log_probs"], a["remainder"], 6), want, atol=2e-6,
                               rtol=0)
    torch.testing.assert_close(topk_log_probs(a["indices"], a["log_probs"], None, 6), want, atol=1e-3, rtol=0)


def test_topk_file_against_full_logits(digits_bank, tmp_path):
    """k = 5 of 10 classes on the digits teachers (top-5 mass 0.87): KL(full || rebuilt) is 0.011 at tau 1 and
    0.0025 at tau 4, far below dropping the remainder (the tail at the floor)."""
    bank, _ = digits_bank
    logits = bank.logits[:, 0]
    arrays = topk_arrays(logits, 5)
    path = _save(tmp_path / "top5.pt", {**arrays, "num_classes": torch.tensor(10)})
    rec = file_logits(path, torch.arange(len(logits)), 10)
    no_tail = torch.full_like(logits, -27.6).scatter(1, arrays["indices"], arrays["log_probs"])  # tail ~ 1e-12
    p = torch.log_softmax(logits.double(), -1)

    def kl(q: torch.Tensor, tau: float) -> float:
        pt, qt = torch.log_softmax(p / tau, -1), torch.log_softmax(q.double() / tau, -1)
        return float((pt.exp() * (pt - qt)).sum(-1).mean())

    assert kl(rec, 1.0) < 0.02 and kl(rec, 4.0) < 0.005, (kl(rec, 1.0), kl(rec, 4.0))
    assert kl(rec, 1.0) < 0.01 * kl(no_tail, 1.0)
    assert torch.equal(rec.argmax(-1), logits.argmax(-1))


# -- bad teacher files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("blob, pattern", [
    (np.zeros((9, 3), np.float32), r"bad\.npy has 9 rows but the training split has 10 units"),
    (np.zeros((10, 4), np.float32), r"bad\.npy has 4 classes but the task has 3"),
    (np.full((10, 3), np.nan, np.float32), r"bad\.npy: 'logits' holds 30 NaN/inf value\(s\) of 30, first in row 0"),
    (np.zeros((10, 2, 3), np.float32), r"bad\.npy is a per-token \[N, T, V\] file \(T = 2\) but the task has one "
                                       r"unit per example"),
    (np.zeros((10, 2, 3, 1), np.float32), r"bad\.npy: 'logits' must be \[N, C\] .* or \[N, T, V\] .*got shape "
                                          r"\(10, 2, 3, 1\)"),
    (np.zeros((10, 3), np.int64), r"bad\.npy: 'logits' must be floating point"),
])
def test_bad_npy_file_is_a_clear_error(tmp_path, blob, pattern):
    path = _save(tmp_path / "bad.npy", blob)
    with pytest.raises(InputError, match=pattern):
        file_logits(path, torch.arange(10), 3)


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_bad_keyed_file_is_a_clear_error(tmp_path, suffix):
    f = torch.zeros(10, 3)

    def err(blob, pattern, known=None):
        path = _save(tmp_path / f"bad{suffix}", blob if suffix != ".npz" else {k: v.numpy() for k, v in blob.items()})
        with pytest.raises(InputError, match=pattern):
            file_logits(path, torch.arange(10), 3, known)

    err({"logits": f, "ids": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 42])},
        r"bad\S+: 1 of its 10 unit id\(s\) are not in the data, first 42 \(the training split has 10 units")
    err({"logits": f, "ids": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 8])}, r"1 duplicate unit id\(s\) in 'ids', first 8")
    err({"logits": f[:9], "ids": torch.arange(9)}, r"bad\S+ covers 9 of the 10 training units; 1 missing, first id 9")
    err({"logits": f[:9]}, r"bad\S+ has 9 rows but the training split has 10 units")
    top = topk_arrays(torch.randn(10, 3), 3)
    err({**top, "num_classes": torch.tensor(3)}, r"bad\S+ stores the top 3 of 3 classes: top-k needs k < C")
    top = topk_arrays(torch.randn(10, 4), 2)
    err({**top, "num_classes": torch.tensor(4)}, r"bad\S+ has 4 classes but the task has 3")
    err({**top}, r"class index 3 in 'indices' is outside \[0, 3\)")
    top = topk_arrays(torch.randn(10, 3), 2)
    err({"indices": top["indices"], "log_probs": top["log_probs"], "remainder": top["remainder"] + 0.5},
        r"top-2 probabilities .* plus its remainder .* sum to")
    lp = top["log_probs"].clone()
    lp[4, 1] = float("-inf")
    err({"indices": top["indices"], "log_probs": lp}, r"'log_probs' holds 1 NaN/inf value\(s\) of 20, first in row 4")
    err({"logit": f}, r"unknown key\(s\) 'logit'")
    # rows for ids of other splits are ignored, not unknown
    ok = _save(tmp_path / f"ok{suffix}", {"logits": torch.arange(33.0).reshape(11, 3).numpy() if suffix == ".npz"
                                          else torch.arange(33.0).reshape(11, 3),
                                          "ids": (torch.arange(11) + 5).numpy() if suffix == ".npz"
                                          else torch.arange(11) + 5})
    got = file_logits(ok, torch.arange(10) + 6, 3, known_ids=torch.tensor([5]))
    torch.testing.assert_close(got, torch.arange(3.0, 33.0).reshape(10, 3))


def test_unsafe_or_unreadable_files_are_refused(tmp_path, monkeypatch):
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"obj\.npy is not a readable numpy file"):
        read_teacher_file(obj)
    with pytest.raises(InputError, match=r"unknown format '\.csv'"):
        read_teacher_file(_save(tmp_path / "x.npy", np.zeros((2, 2), np.float32)).rename(tmp_path / "x.csv"))
    st = _save(tmp_path / "t.safetensors", {"logits": torch.zeros(2, 2)})
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if the package were not installed
    with pytest.raises(InputError, match=r"t\.safetensors needs the safetensors package: pip install safetensors"):
        read_teacher_file(st)


# -- the Python API ---------------------------------------------------------------------------------------
class WineDataset(Dataset):
    """A user dataset with a (deterministic) transform: standardised features."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        self.x, self.y, self.mean, self.std = x, y, mean, std

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return torch.tensor((self.x[i] - self.mean) / self.std, dtype=torch.float32), int(self.y[i])


@pytest.fixture(scope="module")
def wine():
    from sklearn.datasets import load_wine
    from sklearn.ensemble import RandomForestClassifier

    d = load_wine()
    p = np.random.default_rng(0).permutation(len(d.target))
    tr, va, te = p[:110], p[110:140], p[140:]
    mean, std = d.data[tr].mean(0), d.data[tr].std(0)
    rf = RandomForestClassifier(50, random_state=0).fit((d.data[tr] - mean) / std, d.target[tr])
    teacher = np.log(np.clip(rf.predict_proba((d.data[tr] - mean) / std), 1e-3, 1)).astype(np.float32)
    split = {k: WineDataset(d.data[i], d.target[i], mean, std) for k, i in (("train", tr), ("val", va), ("test", te))}
    return split, teacher


def wine_student() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("gate", ["ce", "fixed", "hard", "meta", "reinforce"])
def test_api_runs_every_gate_on_a_user_dataset(wine, tmp_path, gate):
    split, teacher = wine
    path = _save(tmp_path / "forest.npy", teacher)
    kw = {"val": split["val"], "test": split["test"], "gate": gate, "train_config": {**FAST, "epochs": 8,
                                                                                      "batch_size": 32}}
    res = metagate.distill(wine_student, [path], split["train"], **kw)
    assert res.metrics["test/acc"] > 0.8, res.metrics  # chance is 0.40
    assert isinstance(res.student, nn.Sequential) and not res.student.training
    assert res.teachers == [{"name": "forest", "kind": "file"}]
    assert metagate.distill(wine_student, [path], split["train"], **kw).metrics == res.metrics  # same seed


def test_api_refuses_bad_input(wine):
    split, teacher = wine
    tr, val = split["train"], split["val"]
    x, y = torch.stack([tr[i][0] for i in range(len(tr))]), torch.tensor([tr[i][1] for i in range(len(tr))])
    kw = {"val": val, "gate": "fixed", "train_config": FAST}
    with pytest.raises(InputError, match=r"the student outputs 4 classes but teacher 'tensor0' outputs 3"):
        metagate.distill(nn.Linear(13, 4), [teacher], tr, **kw)
    bad_y = y.clone()
    bad_y[[7, 9]] = 5
    with pytest.raises(InputError, match=r"train: label 5 of unit id 7 is outside the class range \[0, 3\) "
                                         r"\(2 such unit\(s\)\)"):
        metagate.distill(wine_student, [teacher], (x, bad_y), **kw)
    ids = torch.arange(len(y)) * 10
    ids[3] = ids[2]
    with pytest.raises(InputError, match=r"train: 1 duplicate unit id\(s\), first 20"):
        metagate.distill(wine_student, [teacher], (x, y, ids), **kw)
    with pytest.raises(InputError, match=r"meta has 5 of its 5 units identical to training units"):
        metagate.distill(wine_student, [teacher], (x, y), meta=(x[:5], y[:5]), select=val, gate="fixed")
    ids = torch.arange(len(y))
    with pytest.raises(InputError, match=r"select shares 1 unit\(s\) with train \(first id 3\)"):
        metagate.distill(wine_student, [teacher], (x, y, ids), meta=(x[:2] + 9, y[:2], torch.tensor([500, 501])),
                         select=(x[3:4] + 9, y[3:4], torch.tensor([3])), gate="fixed")
    with pytest.raises(ConfigError, match=r"give meta= and select=.*or val="):
        metagate.distill(wine_student, [teacher], tr, gate="fixed")
    with pytest.raises(ConfigError, match=r"gate 'fixed' needs teachers; pass teachers="):
        metagate.distill(wine_student, [], tr, **kw)
    with pytest.raises(InputError, match=r"teacher tensor 'tensor0' has 100 rows but the training split has 110"):
        metagate.distill(wine_student, [teacher[:100]], tr, **kw)


def test_compare_gates_shares_one_bank(wine, capsys):
    split, teacher = wine
    res = metagate.compare_gates(wine_student, {"forest": teacher}, split["train"], gates=["ce", "fixed"],
                                 seeds=[0, 1], val=split["val"], test=split["test"], train_config=FAST)
    assert [len(v) for v in res.values()] == [2, 2]
    assert res["fixed"][0] != res["fixed"][1]  # seeds differ
    out = capsys.readouterr().out
    assert "fixed" in out and "±" in out



# -- tasks as plugins -------------------------------------------------------------------------------------
PLUGIN = '''
from functools import partial

import torch

from metagate.data.task import TeacherSpec, build_task
from metagate.models import MLP


def build(noise=0.0, data_seed=0):
    """Three Gaussian blobs in 4-D (a user's task: only the keywords it takes are passed)."""
    g = torch.Generator().manual_seed(7)
    centers = torch.randn(3, 4, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 4, generator=g)
    students = {"mlp": partial(MLP, 4, (8,), 3)}
    teachers = [TeacherSpec("mlp16", partial(MLP, 4, (16,), 3), epochs=5, lr=1e-2, batch_size=32)]
    return build_task("blobs", x[:240], y[:240], x[240:], y[240:], 3, students, teachers, noise=noise,
                      data_seed=data_seed)


not_a_builder = 3
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module ``blobs_plugin`` on sys.path and a distribution that installs it as the entry point ``blobs``."""
    import importlib

    (tmp_path / "blobs_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "blobs_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: blobs-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[metagate.tasks]\nblobs = blobs_plugin:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("blobs_plugin", None)


def test_plugin_task_shows_in_help_and_runs(plugin, tmp_path, capsys):
    from metagate.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    builtin = " | ".join(sorted(TASKS))  # digits | fashion | ... then the installed plugins
    assert f"task: {builtin} | blobs (built-in and installed" in " ".join(capsys.readouterr().out.split())
    for name in ("blobs", "blobs_plugin:build"):
        logdir = tmp_path / name.replace(":", "_")
        rc = main(["distill", "--task", name, "--gate", "fixed", "--teachers", "1", "--epochs", "4", "--batch-size", "16", "--device",
                   "cpu", "--no-progress", "--logdir", str(logdir)])
        assert rc == 0
        out = capsys.readouterr().out
        assert "mlp16" in out
        metrics = __import__("json").loads((logdir / "metrics.json").read_text())
        assert metrics["test/acc"] > 0.9  # well-separated blobs


def test_bad_plugin_names_are_clear_errors(plugin):
    from metagate.data import get_task

    with pytest.raises(ConfigError, match=rf"unknown task 'nope'; choose from {', '.join(sorted(TASKS))}, blobs, or "
                                          r"name a builder"):
        get_task("nope")
    with pytest.raises(ConfigError, match=r"--task no_such_mod:build: cannot import module 'no_such_mod'"):
        get_task("no_such_mod:build")
    with pytest.raises(ConfigError, match=r"module 'blobs_plugin' has no attribute 'missing'"):
        get_task("blobs_plugin:missing")
    with pytest.raises(ConfigError, match=r"--task blobs_plugin:not_a_builder is a int, not a task builder"):
        get_task("blobs_plugin:not_a_builder")


def test_project_trained_teacher_in_a_mixed_bank_matches_the_cli_run(plugin, tmp_path):
    """A TeacherSpec given to the API is trained by the project exactly as ``metagate distill`` trains it."""
    from metagate.data import get_task

    task = get_task("blobs_plugin:build")
    cfg = DistillConfig(task="blobs_plugin:build", teachers=1, gate="fixed", cache_dir=str(tmp_path / "cli"),
                        train=TrainConfig(**FAST, batch_size=16), logdir=str(tmp_path / "run"))
    want = run_distill(cfg, task=task)
    (cached,) = (tmp_path / "cli").glob("*/logits-mlp16.pt")
    logits = torch.load(cached, weights_only=True)["logits"]
    data = {"meta": (task.meta.x, task.meta.y), "select": (task.select.x, task.select.y),
            "test": (task.test.x, task.test.y)}
    for teachers in ([task.teacher_specs[0]], [logits]):
        res = metagate.distill(task.students["mlp"], teachers, (task.train.x, task.train.y), gate="fixed",
                               train_config={**FAST, "batch_size": 16}, cache_dir=tmp_path / "api", **data)
        assert {k: v for k, v in res.metrics.items() if not k.startswith("diag/")} == \
            {k: v for k, v in want.items() if k != "teachers" and not k.startswith("diag/")}
    assert res.teachers == [{"name": "tensor0", "kind": "tensor"}]


# -- the DataLoader path --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["fixed", "meta"])
def test_loader_path_gives_the_in_memory_student(wine, gate):
    split, teacher = wine
    kw = {"val": split["val"], "test": split["test"], "gate": gate, "train_config": {**FAST, "batch_size": 32}}
    want = metagate.distill(wine_student, [teacher], split["train"], **kw).metrics
    for workers in (0, 1):
        res = metagate.distill(wine_student, [teacher], split["train"], num_workers=workers, **kw)
        assert res.metrics == want
