"""The shared loop: determinism, resume equivalence, checkpoints, bad input."""

from __future__ import annotations

import pickle

import pytest
import torch

from metagate.callbacks import EpochFn
from metagate.data import get_task
from metagate.data.task import Split, Task, build_task
from metagate.errors import CheckpointError, ConfigError, InputError
from metagate.gates import GateOutput
from metagate.gates.fixed import CEGate, FixedGate
from metagate.gates.hard import HardGate
from metagate.io import atomic_save
from metagate.teachers.bank import TeacherBank
from metagate.trainer import TrainConfig, Trainer, seed_everything


def _trainer(task, bank, gate=None, epochs=3, seed=0, run_dir=None, identity=None):
    seed_everything(seed)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed, device="cpu", progress=False)
    return Trainer(task, task.make_student(), gate or FixedGate(alpha=0.5, tau=4.0), bank, cfg, run_dir=run_dir,
                   identity=identity or {"gate": "fixed"})


def test_same_seed_same_result(digits_noisy, digits_bank):
    bank, _ = digits_bank
    a = _trainer(digits_noisy, bank, HardGate(hard_tau=1.5)).fit()
    b = _trainer(digits_noisy, bank, HardGate(hard_tau=1.5)).fit()
    assert a == b
    c = _trainer(digits_noisy, bank, HardGate(hard_tau=1.5), seed=1).fit()
    assert c["test/nll"] != a["test/nll"]


def test_resume_reaches_same_final_metrics(digits_noisy, digits_bank, tmp_path):
    bank, _ = digits_bank
    full = _trainer(digits_noisy, bank, epochs=4)
    m_full = full.fit()

    class Interrupt(Exception):
        pass

    def stop_after_two(tr, record):
        if tr.epoch == 2:
            raise Interrupt

    part = _trainer(digits_noisy, bank, epochs=4, run_dir=tmp_path)
    with pytest.raises(Interrupt):
        part.fit([EpochFn(stop_after_two)])
    torch.manual_seed(999)  # the resumed process starts from a different RNG state
    resumed = _trainer(digits_noisy, bank, epochs=4, seed=0, run_dir=tmp_path)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.epoch == 2
    m_res = resumed.fit()
    assert m_res == m_full
    for (k, v), v2 in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(v, v2), k


def test_corrupt_checkpoint_is_reported_and_left_alone(digits_noisy, digits_bank, tmp_path):
    bank, _ = digits_bank
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x00not a checkpoint")
    tr = _trainer(digits_noisy, bank)
    with pytest.raises(CheckpointError, match="corrupt"):
        tr.load_checkpoint(path)
    assert path.read_bytes() == b"\x00not a checkpoint"
    # truncated real checkpoint
    tr.save_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        tr.load_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (print, ("executed!",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_loading_never_unpickles_code(digits_noisy, digits_bank, tmp_path):
    bank, _ = digits_bank
    path = tmp_path / "evil.pt"
    torch.save({"version": 1, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError):
        _trainer(digits_noisy, bank).load_checkpoint(path)
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CheckpointError):
        _trainer(digits_noisy, bank).load_checkpoint(path)


def test_incompatible_checkpoint(digits_noisy, digits_bank, tmp_path):
    bank, _ = digits_bank
    tr = _trainer(digits_noisy, bank, identity={"gate": "fixed"})
    tr.save_checkpoint(tmp_path / "c.pt")
    other = _trainer(digits_noisy, bank, HardGate(hard_tau=1.5), identity={"gate": "hard"})
    with pytest.raises(CheckpointError, match="incompatible.*gate"):
        other.load_checkpoint(tmp_path / "c.pt")
    cnn = Trainer(digits_noisy, digits_noisy.make_student("cnn"), FixedGate(), bank,
                  TrainConfig(batch_size=64, device="cpu", progress=False), identity={"gate": "fixed"})
    with pytest.raises(CheckpointError, match="does not fit"):
        cnn.load_checkpoint(tmp_path / "c.pt")


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - any pickling failure
        atomic_save({"a": lambda: 0}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left


def test_teacher_student_class_count_mismatch(digits_noisy):
    bank = TeacherBank(torch.zeros(len(digits_noisy.train), 2, 7), ["a", "b"])
    with pytest.raises(InputError, match="class-count mismatch: teachers output 7 classes"):
        _trainer(digits_noisy, bank)
    good = TeacherBank(torch.zeros(len(digits_noisy.train), 2, 10), ["a", "b"])
    from metagate.models import MLP

    with pytest.raises(InputError, match="student outputs 3 classes"):
        Trainer(digits_noisy, MLP(64, (8,), 3), FixedGate(), good, TrainConfig(device="cpu", progress=False))


def test_labels_out_of_range():
    x, y = torch.randn(40, 4), torch.arange(40) % 3
    y_bad = y.clone()
    y_bad[3] = 5
    with pytest.raises(InputError, match=r"labels out of range: found \[0, 5\] but the task has 3 classes"):
        build_task("toy", x, y_bad, x, y, 3, {}, [])


def test_empty_validation_split():
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    with pytest.raises(InputError, match="validation split is empty"):
        build_task("toy", x, y, x, y, 3, {}, [], val_fraction=0.01)
    task = build_task("toy", x, y, x, y, 3, {}, [], val_fraction=0.5)
    with pytest.raises(InputError, match="'meta' split is empty"):
        Task("toy", 3, task.train, Split(x[:0], y[:0]), task.select, task.test, task.corrupted,
             task.clean_train_labels, {}, [])


def test_nan_student_logits_named(digits_noisy, digits_bank):
    bank, _ = digits_bank
    tr = _trainer(digits_noisy, bank)
    batch = next(tr.epoch_batches(0))
    batch.x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="student logits contain"):
        tr.train_step(batch)


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_bad_decision_weights(digits_noisy, digits_bank, bad):
    bank, _ = digits_bank
    tr = _trainer(digits_noisy, bank)
    batch = next(tr.epoch_batches(0))
    w = torch.full((len(batch), 4), 0.25)
    w[0, 2] = bad
    with pytest.raises(InputError, match="gate weights"):
        tr.train_step(batch, GateOutput(w, 2.0))
    with pytest.raises(InputError, match="shape"):
        tr.train_step(batch, GateOutput(torch.ones(len(batch), 2), 2.0))


def test_unknown_task_and_gate():
    from metagate.run import DistillConfig

    with pytest.raises(ConfigError, match="unknown task 'mnist'"):
        get_task("mnist")
    with pytest.raises(ConfigError, match="unknown gate 'soft'"):
        DistillConfig(gate="soft")


def test_ce_gate_needs_no_teacher_and_kd_gates_do(digits_noisy):
    cfg = TrainConfig(epochs=1, device="cpu", progress=False)
    Trainer(digits_noisy, digits_noisy.make_student(), CEGate(), None, cfg).fit()
    with pytest.raises(ConfigError, match="needs teachers"):
        Trainer(digits_noisy, digits_noisy.make_student(), FixedGate(), None, cfg)


def test_fashion_missing_data_dir_message(tmp_path):
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        get_task("fashion", data_dir=str(tmp_path))


def test_distillation_beats_nothing_sanity(digits_noisy, digits_bank):
    """Weights used by the fixed gate are recorded per unit; diagnostics are well-formed."""
    bank, _ = digits_bank
    m = _trainer(digits_noisy, bank, FixedGate(alpha=0.3, tau=2.0), epochs=6).fit()
    assert m["gate/mean_w_label"] == pytest.approx(0.3)
    assert m["gate/teacher_share"] == pytest.approx(0.7)
    assert m["diag/auroc_teacher_share"] == pytest.approx(0.5)
    # equal teacher weights: KD on right teachers is the equal-split base rate, every teacher 1/3 everywhere
    assert m["diag/kd_on_right_teachers"] == pytest.approx(m["diag/kd_on_right_teachers_equal"])
    assert m["diag/teacher_choice_gain"] == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < m["diag/kd_on_right_teachers"] < 1.0  # digits CNN teachers are mostly right
    assert m["diag/kd_share_teacher0_right"] == pytest.approx(1 / 3) == m["diag/kd_share_teacher2_wrong"]
    assert m["test/acc"] > 0.7


def test_teacher_trust_golden_values():
    """Hand-computed: 3 units, 2 teachers; teacher 0 right on units 0 and 1, teacher 1 on units 1 and 2."""
    from metagate.diagnostics import teacher_right, teacher_trust, teacher_trust_figure

    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]],   # unit 0 (label 0): t0 right, t1 wrong
                           [[0.0, 5.0], [0.0, 5.0]],   # unit 1 (label 1): both right
                           [[5.0, 0.0], [0.0, 5.0]]])  # unit 2 (label 1): t0 wrong, t1 right
    right = teacher_right(logits, torch.tensor([0, 1, 1]))
    assert right.tolist() == [[True, False], [True, True], [False, True]]
    w = torch.tensor([[0.5, 0.4, 0.1],    # KD 0.5: 0.4 on the right teacher
                      [0.0, 0.5, 0.5],    # KD 1.0: all on right teachers
                      [0.2, 0.6, 0.2]])   # KD 0.8: 0.2 on the right teacher
    d = teacher_trust(w, right)
    assert d["diag/kd_on_right_teachers"] == pytest.approx((0.4 + 1.0 + 0.2) / 2.3)
    assert d["diag/kd_on_right_teachers_equal"] == pytest.approx((0.5 * 0.5 + 1.0 * 1.0 + 0.8 * 0.5) / 2.3)
    assert d["diag/teacher_choice_gain"] == pytest.approx((1.6 - 1.65) / 2.3)
    assert d["diag/kd_share_teacher0_right"] == pytest.approx((0.8 + 0.5) / 2)
    assert d["diag/kd_share_teacher0_wrong"] == pytest.approx(0.75)
    assert d["diag/kd_share_teacher1_right"] == pytest.approx((0.5 + 0.25) / 2)
    assert d["diag/kd_share_teacher1_wrong"] == pytest.approx(0.2)
    fig = teacher_trust_figure(w, right, ["a", "b"], title="x")
    assert len(fig.axes[0].patches) == 4
    # a unit with no KD weight (label only) counts in neither share
    d2 = teacher_trust(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), right[:2])
    assert d2["diag/kd_share_teacher0_right"] == pytest.approx(1.0) and "diag/kd_share_teacher0_wrong" not in d2
