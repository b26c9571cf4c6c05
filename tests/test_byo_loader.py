"""Bring your own data: training from a DataLoader over a user Dataset, online teachers, the dataset checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import metagate
from metagate.data.inputs import DatasetInputs, scan_dataset
from metagate.errors import InputError
from metagate.loader import LoaderTrainer
from metagate.teachers.sources import online

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"epochs": 3, "device": "cpu", "progress": False, "batch_size": 32}


class Wine(Dataset):
    """Wine read item by item, standardised in ``__getitem__`` (a transform); counts its reads."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray, ids=None,
                 noise: float = 0.0) -> None:
        self.x, self.y, self.mean, self.std, self.ids, self.noise = x, y, mean, std, ids, noise
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        x = torch.tensor((self.x[i] - self.mean) / self.std, dtype=torch.float32)
        if self.noise:
            x = x + self.noise * torch.randn(x.shape)
        item = (x, int(self.y[i]))
        return item if self.ids is None else (*item, int(self.ids[i]))


class RandomWine(Wine):
    random_transform = True


@pytest.fixture(scope="module")
def wine():
    from sklearn.datasets import load_wine

    d = load_wine()
    p = np.random.default_rng(0).permutation(len(d.target))
    idx = {"train": p[:110], "val": p[110:140], "test": p[140:]}
    mean, std = d.data[idx["train"]].mean(0), d.data[idx["train"]].std(0)
    return d.data, d.target, idx, mean, std


def make(wine, part, cls=Wine, **kw):
    x, y, idx, mean, std = wine
    return cls(x[idx[part]], y[idx[part]], mean, std, **kw)


def tensors(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])


def student() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))


def teacher_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))


@pytest.fixture(scope="module")
def trained_teacher(wine):
    """A small net fitted on the clean training labels (a user's pretrained module)."""
    net = teacher_net()
    x, y = tensors(make(wine, "train"))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def test_dataset_inputs_read_by_id_equal_the_stacked_tensor(wine):
    ds = make(wine, "train")
    x, y = tensors(ds)
    lazy = DatasetInputs(ds)
    ids = torch.tensor([5, 0, 109, 5])
    assert lazy.shape == x.shape and len(lazy) == 110
    assert torch.equal(lazy[ids], x[ids]) and torch.equal(lazy[3:7], x[3:7]) and torch.equal(lazy[2], x[2])
    assert torch.equal(lazy.index_select(0, ids), x[ids])
    assert torch.equal(scan_dataset(ds, "train")[0], y)


@pytest.mark.parametrize("gate", ["ce", "fixed", "hard", "meta", "reinforce", "temperature", "ctkd"])
def test_a_dataset_with_a_transform_trains_every_gate_from_a_loader(wine, trained_teacher, gate):
    train = make(wine, "train")
    res = metagate.distill(student, {"net": trained_teacher, "net2": online(trained_teacher)}, train,
                           val=make(wine, "val"), test=make(wine, "test"), gate=gate,
                           train_config={**FAST, "epochs": 6})
    assert isinstance(res.trainer, LoaderTrainer)
    assert isinstance(res.trainer.task.train.x, DatasetInputs)  # never materialised
    # the transform ran for every unit of every epoch (plus the label scan, the hash and the module teacher)
    assert train.reads >= 6 * len(train) + len(train)
    assert res.metrics["test/acc"] > 0.8, res.metrics  # chance 0.40
    assert np.isfinite(res.metrics["test/nll"])


@pytest.mark.parametrize("gate", ["fixed", "hard", "meta"])
def test_the_loader_path_gives_the_in_memory_student(wine, trained_teacher, gate):
    kw = {"val": make(wine, "val"), "test": make(wine, "test"), "gate": gate, "train_config": FAST}
    want = metagate.distill(student, [trained_teacher], tensors(make(wine, "train")), **kw).metrics
    got = metagate.distill(student, [trained_teacher], make(wine, "train"), **kw).metrics
    assert got == want


@pytest.mark.parametrize("gate", ["fixed", "hard", "meta"])
def test_an_online_teacher_gives_the_cached_teachers_result_on_fixed_inputs(wine, trained_teacher, gate):
    kw = {"val": make(wine, "val"), "test": make(wine, "test"), "gate": gate, "train_config": FAST}
    cached = metagate.distill(student, [trained_teacher], make(wine, "train"), **kw)
    live = metagate.distill(student, [online(trained_teacher)], make(wine, "train"), **kw)
    assert live.teachers[0]["kind"] == "online" and cached.teachers[0]["kind"] == "module"
    assert live.metrics.keys() == cached.metrics.keys()
    for k, v in cached.metrics.items():
        assert live.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_an_online_teacher_sees_each_steps_augmented_inputs(wine, trained_teacher):
    seen: list[torch.Tensor] = []
    hook = trained_teacher.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    try:
        train = make(wine, "train", RandomWine, noise=0.1)
        res = metagate.distill(student, [online(trained_teacher)], train, val=make(wine, "val"), gate="fixed",
                               train_config={**FAST, "epochs": 2})
    finally:
        hook.remove()
    setup = max(j for j, s in enumerate(seen) if s.shape[0] == 110)  # probes and the one pass over train, then steps
    steps = seen[setup + 1:]
    assert len(steps) == 2 * 4  # 110 units in batches of 32: 4 steps per epoch
    first, again = steps[0], steps[4]  # epoch 0 and epoch 1 batches; different augmentations of the inputs
    assert not torch.equal(first, again)
    assert np.isfinite(res.metrics["select/nll"])


def test_a_cached_teacher_with_a_random_transform_is_refused(wine, trained_teacher):
    train = make(wine, "train", RandomWine, noise=0.1)
    for t, name in ((trained_teacher, "sequential0"), (np.zeros((110, 3), np.float32), "tensor0")):
        with pytest.raises(InputError, match=rf"train: the dataset marks its transform random \(random_transform="
                                             rf"True\), but teacher '{name}' is cached: .*augmentation changes the "
                                             r"inputs every epoch.*metagate.online\(module\)"):
            metagate.distill(student, [t], train, val=make(wine, "val"), gate="fixed", train_config=FAST)
    with pytest.raises(InputError, match=r"test: the dataset marks its transform random.*evaluation data"):
        metagate.distill(student, [online(trained_teacher)], train, val=make(wine, "val"),
                         test=make(wine, "test", RandomWine), gate="fixed", train_config=FAST)


def test_bad_datasets_are_clear_errors(wine, trained_teacher):
    x, y, idx, mean, std = wine
    tr = idx["train"]
    kw = {"val": make(wine, "val"), "gate": "fixed", "train_config": FAST}

    class Bare(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(13)

    with pytest.raises(InputError, match=r"train: dataset items must be \(x, y\) or \(x, y, id\) tuples, item 0 is "
                                         r"Tensor"):
        metagate.distill(student, [trained_teacher], Bare(), **kw)
    ids = np.arange(110) + 1000
    ids[9] = ids[4]
    with pytest.raises(InputError, match=r"train: 1 duplicate unit id\(s\), first 1004"):
        metagate.distill(student, [trained_teacher], Wine(x[tr], y[tr], mean, std, ids=ids), **kw)
    bad = y[tr].copy()
    bad[[6, 8]] = 3
    with pytest.raises(InputError, match=r"train: label 3 of unit id 1006 is outside the class range \[0, 3\)"):
        metagate.distill(student, [trained_teacher], Wine(x[tr], bad, mean, std, ids=np.arange(110) + 1000), **kw)
    with pytest.raises(InputError, match=r"the student outputs 4 classes but teacher 'sequential0' outputs 3"):
        metagate.distill(nn.Linear(13, 4), [trained_teacher], make(wine, "train"), **kw)
    with pytest.raises(InputError, match=r"meta has 30 of its 30 units identical to training units"):
        metagate.distill(student, [trained_teacher], make(wine, "train"), meta=_first(wine, 30),
                         select=make(wine, "val"), gate="fixed", train_config=FAST)


def _first(wine, n):
    x, y, idx, mean, std = wine
    tr = idx["train"][:n]
    return Wine(x[tr], y[tr], mean, std)


def test_a_loader_over_tensors_gathers_batches_and_gives_the_in_memory_student(wine, trained_teacher):
    kw = {"val": make(wine, "val"), "test": make(wine, "test"), "gate": "fixed", "train_config": FAST}
    data = tensors(make(wine, "train"))
    want = metagate.distill(student, [trained_teacher], data, **kw)
    got = metagate.distill(student, [trained_teacher], data, num_workers=0, **kw)
    assert isinstance(got.trainer, LoaderTrainer) and not isinstance(want.trainer, LoaderTrainer)
    assert got.metrics == want.metrics
    from metagate.loader import Gathered, WithIds

    batch = WithIds(torch.utils.data.TensorDataset(*data)).__getitems__([4, 1])
    assert isinstance(batch, Gathered) and torch.equal(batch[0], data[0][[4, 1]]) and batch[2].tolist() == [4, 1]


def test_bench_times_the_loader_path_against_the_in_memory_path(capsys):
    from metagate.cli import main

    assert main(["bench", "--loader", "--task", "digits", "--students", "mlp", "--gates", "fixed", "--steps", "2",
                 "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip() + "|" + " ".join(line.split()[2:-2]): line.split()[-1]
            for line in out.splitlines() if line.startswith("mlp")}
    assert rows["mlp|in-memory"] == "1.000x"
    assert set(rows) == {"mlp|in-memory", "mlp|loader (tensors)", "mlp|loader (items)"}
    assert all(float(v.rstrip("x")) > 0 for v in rows.values())
