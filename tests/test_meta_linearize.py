"""The hand-written ``J v`` of a supported student's logits (:mod:`metagate.gates.meta.linearize`) equals forward-mode
AD, and the meta gate's forward-mode route that uses it equals the autograd reference path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from metagate.data.task import Batch, Split
from metagate.gates.meta import MetaGate
from metagate.gates.meta.linearize import Linearization, linear_chain
from metagate.gates.meta.lookahead import resolve_names
from metagate.models import CNN, MLP
from metagate.teachers.bank import TeacherBank
from metagate.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _forward_mode(model: nn.Module, x: torch.Tensor, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
    """``J v`` by autograd's forward mode (buffers cloned: the running statistics stay put)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad(), fwAD.dual_level():
        state = {**params, **{n: fwAD.make_dual(params[n], t) for n, t in tangents.items()},
                 **{n: b.clone() for n, b in model.named_buffers()}}
        return fwAD.unpack_dual(functional_call(model, state, (x,))).tangent


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "cnn8":
        return CNN(1, 8, 4, 5, 16)
    if kind == "cnn28":
        return CNN(1, 28, 3, 5, 16)
    if kind == "cnn8-plain-bn":  # batch norm without affine parameters, strided / dilated convs
        m = CNN(1, 8, 4, 5, 16)
        m.conv[0] = nn.Conv2d(1, 4, 3, padding=2, dilation=2, bias=False)
        m.conv[1] = nn.BatchNorm2d(4, affine=False)
        m.conv[4] = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        m.fc[1] = nn.Linear(8 * 2 * 2, 16)
        return m
    return MLP(12, (7, 6), 5, batch_norm=True)


CASES = [(kind, spec, "train") for kind in ("cnn8", "cnn28", "cnn8-plain-bn")
         for spec in ("all", "conv", "head", "fc.1.weight,conv.5", "conv.4.bias")] + \
    [("mlp-bn", spec, "train") for spec in ("all", "body.1", "body.4.bias,head.weight")] + \
    [(kind, "all", mode) for kind in ("cnn8", "cnn8-plain-bn", "mlp-bn") for mode in ("eval", "no-grad")] + \
    [("cnn8", "conv.4.bias", "eval")]


@pytest.mark.parametrize("kind,spec,mode", CASES)
def test_chain_jvp_equals_forward_mode(kind, spec, mode):
    """float64: the product by hand equals forward-mode AD to 1e-9 (relative) over any subset of moved parameters,
    with batch norm in train mode (batch statistics) or eval mode, from a forward whose graph holds the pooling's
    indices or one with nothing requiring grad (indices recomputed); nothing of the model changes."""
    model = _model(kind).double()
    moved = resolve_names(model, spec)
    model.train(mode != "eval")
    chain = linear_chain(model)
    assert chain is not None and Linearization.covers(chain, moved)
    lin = Linearization(chain, moved)
    g = torch.Generator().manual_seed(1)
    shape = (10, 12) if isinstance(model, MLP) else (10, 1, model.size, model.size)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "cnn8":
        x = x.flatten(1)  # the CNN's flat-input reshape
    if mode == "no-grad":  # nothing requires grad: autograd keeps no pooling indices
        model.requires_grad_(False)
    z = model(x)
    model.requires_grad_(True)
    before = _state(model)
    tangents = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()
                if n in moved}
    fn = lin.product(z)
    assert fn is not None
    for mod, (_, u, idx, _) in zip(lin.mods, lin.kept_for(z)):
        if isinstance(mod, nn.MaxPool2d):  # autograd's saved argmax is max_pool2d_with_indices'; none without a graph
            assert (idx is None) == (mode == "no-grad")
            if idx is not None:
                assert torch.equal(idx, torch.nn.functional.max_pool2d(u, mod.kernel_size, mod.stride,
                                                                       return_indices=True)[1])
    with torch.no_grad():
        jv = fn(tangents)
    lin.active = False  # the reference's forward keeps nothing
    ref = _forward_mode(model, x, tangents)
    if spec == "conv.4.bias" and mode != "eval":  # a bias under train-mode batch norm: J v = 0
        assert float(ref.abs().max()) < 1e-12 and float(jv.abs().max()) < 1e-12
    else:
        assert float(ref.abs().max()) > 1e-3
        assert _rel(jv, ref) <= 1e-9
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    lin.remove()


def test_product_refuses_activations_of_another_forward():
    """Kept activations of a later forward (the whole model or a part) are not used for earlier logits."""
    model = _model("cnn8").double()
    lin = Linearization(linear_chain(model), [n for n, _ in model.named_parameters()])
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    z = model(x)
    assert lin.product(z) is not None
    model.features(x[:3])  # a partial forward replaces all but the head's activations
    assert lin.product(z) is None
    z2 = model(x)
    assert lin.product(z) is None and lin.product(z2) is not None
    lin.active = False
    z3 = model(x)
    assert lin.product(z3) is None and lin.product(z2) is not None
    lin.active = True
    with torch.no_grad():  # evaluation's forwards keep nothing
        z4 = model(x)
    assert lin.product(z4) is None and lin.product(z2) is not None


def test_unsupported_students_have_no_chain():
    cnn = _model("cnn8")
    cnn.fc.insert(2, nn.Dropout(0.1))
    assert linear_chain(cnn) is None
    relu_in_place = _model("cnn8")
    relu_in_place.conv[2] = nn.ReLU(inplace=True)
    assert linear_chain(relu_in_place) is None

    class Scaled(CNN):
        def features(self, x):
            return 2 * super().features(x)

    assert linear_chain(Scaled(1, 8, 4, 5, 16)) is None
    assert linear_chain(_model("mlp-bn")) is not None


# -- the gate --------------------------------------------------------------------------------------
def _trainer(task, gate, dropout=False):
    """A float64 trainer of a small CNN (with a dropout layer of p = 0: the same function, no tangent rule)."""
    task = dataclasses.replace(task, **{s: Split(getattr(task, s).x.double(), getattr(task, s).y)
                                        for s in ("train", "meta", "select", "test")})
    torch.manual_seed(0)
    bank = TeacherBank(3 * torch.randn(len(task.train), 2, task.num_classes), ["t0", "t1"])
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, device="cpu", progress=False, seed=0)
    student = CNN(1, 8, 4, task.num_classes, 16).double()
    if dropout:
        student.fc.insert(2, nn.Dropout(0.0))
    tr = Trainer(task, student, gate, bank, cfg)
    tr.unit_weights = tr.unit_weights.double()  # the trainer's record is float32
    return tr


def _batch(trainer, n=16):
    ids = torch.arange(n) * 7 % len(trainer.task.train)
    return Batch(trainer.train_x[ids], trainer.train_y[ids], ids)


@pytest.mark.parametrize("lookahead", ["all", "conv"])
@pytest.mark.parametrize("unsupported", [False, True])
def test_gate_product_by_hand_matches_reference_path(digits_noisy, lookahead, unsupported):
    """One meta update + real step with the product by hand equals ``--meta-no-reuse`` (forward-mode AD on a
    forward of its own) to 1e-6 in float64; a student with an unsupported module keeps forward mode."""
    used = []

    def run(reuse):
        gate = MetaGate(meta_lookahead=lookahead, meta_lr=1e3, meta_no_reuse=not reuse)
        tr = _trainer(digits_noisy, gate, dropout=unsupported)
        by_hand = reuse and not unsupported
        assert gate.route == ("jvp-by-hand" if by_hand else "jvp-forward-mode")
        lin = gate.strategy.linearization
        assert (lin is not None) == by_hand
        if lin is not None:
            product = lin.product
            lin.product = lambda z: used.append(product(z)) or used[-1]  # type: ignore[method-assign]
        table0 = gate.param.raw.detach().clone()
        tr.train_step(_batch(tr))
        assert not torch.equal(gate.param.raw, table0)  # the table learned
        return gate.param.raw.detach().clone(), _state(tr.student)

    raw_r, st_r = run(False)
    raw_f, st_f = run(True)
    assert used == [] if unsupported else (len(used) == 1 and used[0] is not None)
    torch.testing.assert_close(raw_f, raw_r, atol=1e-6, rtol=0)
    for k in st_r:
        torch.testing.assert_close(st_f[k], st_r[k], atol=1e-6, rtol=0)


def test_gate_falls_back_for_foreign_logits_and_leaves_student_untouched(digits_noisy):
    """Logits that are not the last hooked forward's take forward mode (same update); the meta step moves
    neither parameters nor batch-norm statistics and writes no student gradient."""
    tables = []
    for foreign in (False, True):
        gate = MetaGate(meta_lr=1e3)
        tr = _trainer(digits_noisy, gate)
        assert gate.route == "jvp-by-hand"
        batch = _batch(tr)
        logits = tr.student(batch.x)
        if foreign:
            tr.student(batch.x[:5])
            assert gate.strategy.linearization.product(logits) is None
        after_forward = _state(tr.student)
        gate.meta_step(tr.make_view(batch, logits), batch.x, tr.lr)
        for k, v in tr.student.state_dict().items():
            assert torch.equal(v, after_forward[k]), k
        assert all(p.grad is None for p in tr.student.parameters())
        tables.append(gate.param.raw.detach().clone())
        assert gate.last_hypergrad_norm > 0
    torch.testing.assert_close(tables[1], tables[0], atol=1e-10, rtol=0)
