"""Meta gate: hypergradient backends agree, the virtual step is side-effect free, gradients stay apart."""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import pytest
import torch
from torch import nn

from metagate.data.task import Batch, Split
from metagate.errors import ConfigError
from metagate.gates.meta import MetaGate
from metagate.gates.meta.analytic import LinearLookahead, linear_hypergrad, plain_mlp_layers
from metagate.gates.meta.lookahead import (
    closed_form_val_logits,
    forward_features,
    frozen_buffers,
    func_lookahead_loss,
    higher_lookahead_loss,
    kd_logit_gradients,
    logit_gradients,
    resolve_names,
)
from metagate.gates.meta.params import WeightNet, WeightTable, normalize_weights
from metagate.gates.meta.sampler import ValSampler
from metagate.losses import unit_losses
from metagate.models import MLP
from metagate.teachers.bank import TeacherBank
from metagate.trainer import TrainConfig, Trainer

N, M, D, C, K = 12, 9, 5, 4, 2


def _problem(batch_norm: bool, seed: int = 0, hidden: tuple[int, ...] = (7,)):
    """A float64 MLP student, a training batch with teachers, a validation batch and weights."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(D, hidden, C, batch_norm=batch_norm).double().train()
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    t = 2 * torch.randn(N, K, C, generator=g, dtype=torch.float64)
    xv = torch.randn(M, D, generator=g, dtype=torch.float64)
    yv = torch.randint(0, C, (M,), generator=g)
    w = (0.2 + torch.rand(N, 1 + K, generator=g, dtype=torch.float64)).requires_grad_(True)
    loss_fn = partial(_losses, t=t, y=y)
    return model, x, xv, yv, w, loss_fn


def _losses(z, t, y):
    return unit_losses(z, t, y, 2.0)


def _grad(val, w):
    return torch.autograd.grad(val, w)[0]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("batch_norm", [False, True])
def test_func_matches_higher(batch_norm):
    model, x, xv, yv, w, loss_fn = _problem(batch_norm)
    before = _state(model)
    vf = func_lookahead_loss(model, w, loss_fn, x, xv, yv, lr=0.3)
    gf = _grad(vf, w)
    _assert_state_equal(model, before)
    vh = higher_lookahead_loss(model, w, loss_fn, x, xv, yv, lr=0.3)
    gh = _grad(vh, w)
    _assert_state_equal(model, before)  # parameters and BN running stats untouched
    torch.testing.assert_close(vf, vh, atol=1e-10, rtol=0)
    torch.testing.assert_close(gf, gh, atol=1e-5, rtol=0)
    assert gf.abs().max() > 1e-4  # not trivially zero
    # reusing the real forward's logits gives the same hypergradient
    model_r = copy.deepcopy(model)
    logits = model_r(x)
    gr = _grad(func_lookahead_loss(model_r, w, loss_fn, x, xv, yv, 0.3, train_logits=logits), w)
    torch.testing.assert_close(gr, gf, atol=1e-12, rtol=0)


def test_func_subset_matches_higher_subset():
    model, x, xv, yv, w, loss_fn = _problem(True)
    names = resolve_names(model, "last")
    assert names == ["head.weight", "head.bias"]
    gf = _grad(func_lookahead_loss(model, w, loss_fn, x, xv, yv, 0.3, names), w)
    gh = _grad(higher_lookahead_loss(model, w, loss_fn, x, xv, yv, 0.3, names), w)
    torch.testing.assert_close(gf, gh, atol=1e-5, rtol=0)


def test_func_matches_central_finite_differences():
    model, x, xv, yv, w, loss_fn = _problem(False, seed=3, hidden=(3,))
    g = _grad(func_lookahead_loss(model, w, loss_fn, x, xv, yv, lr=0.5), w)
    eps = 1e-6
    fd = torch.zeros_like(w)
    for i in range(N):
        for j in range(1 + K):
            e = torch.zeros_like(w)
            e[i, j] = eps
            lp = func_lookahead_loss(model, (w + e).detach(), loss_fn, x, xv, yv, 0.5).item()
            lm = func_lookahead_loss(model, (w - e).detach(), loss_fn, x, xv, yv, 0.5).item()
            fd[i, j] = (lp - lm) / (2 * eps)
    torch.testing.assert_close(g, fd, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_closed_form_equals_func_on_last_layer(batch_norm):
    model, x, xv, yv, w, loss_fn = _problem(batch_norm, seed=1)
    lr = 0.4
    vf = func_lookahead_loss(model, w, loss_fn, x, xv, yv, lr, names=resolve_names(model, "last"))
    with frozen_buffers(model):
        h, z = forward_features(model, x)
        with torch.no_grad():
            hv, zv = forward_features(model, xv)
    g = logit_gradients(z, loss_fn)
    zv2 = closed_form_val_logits(w, g, h.detach(), hv, zv, lr, 1.0 / N)
    vc = torch.nn.functional.cross_entropy(zv2, yv)
    torch.testing.assert_close(vc, vf, atol=1e-10, rtol=0)
    torch.testing.assert_close(_grad(vc, w), _grad(vf, w), atol=1e-10, rtol=0)


def test_analytic_logit_gradients_match_autograd():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(N, C, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(N, K, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    auto = logit_gradients(z, lambda zz: unit_losses(zz, t, y, 3.0))
    torch.testing.assert_close(kd_logit_gradients(z, t, y, 3.0), auto, atol=1e-12, rtol=0)


def test_params_and_normalisation():
    init = torch.tensor([0.1, 0.9, 0.9])
    for tr in ("clamp", "sigmoid", "softmax"):
        tab = WeightTable(5, init, tr)
        torch.testing.assert_close(tab(torch.tensor([0, 3])), init.expand(2, 3))
    tab = WeightTable(3, init, "clamp")
    with torch.no_grad():
        tab.raw.fill_(5.0)
    tab.project()
    assert tab.raw.max() < 2.0
    net = WeightNet(11, init, "all")
    out = net(torch.rand(4, 2, 11))
    torch.testing.assert_close(out, init.expand(4, 3), atol=0.05, rtol=0)
    w = torch.rand(6, 3) + 0.1
    torch.testing.assert_close(normalize_weights(w, "column", init).mean(0), init)
    torch.testing.assert_close(normalize_weights(w, "unit", init).sum(1), torch.full((6,), 1.9))
    with pytest.raises(ConfigError):
        WeightTable(3, torch.tensor([0.1, 2.5]), "clamp")
    with pytest.raises(ConfigError):
        MetaGate(meta_schedule="amal", meta_backend="func")


# -- the gate inside the shared trainer ---------------------------------------------------------
def _trainer(task, gate, arch="mlp-bn", dtype=torch.float32, k=2, seed=0):
    if dtype != torch.float32:
        task = dataclasses.replace(task, **{s: Split(getattr(task, s).x.to(dtype), getattr(task, s).y)
                                            for s in ("train", "meta", "select", "test")})
    torch.manual_seed(seed)
    bank = TeacherBank(3 * torch.randn(len(task.train), k, task.num_classes), [f"t{j}" for j in range(k)])
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, device="cpu", progress=False, seed=seed)
    student = task.make_student(arch).to(dtype)
    return Trainer(task, student, gate, bank, cfg)


def _batch(trainer, n=32):
    ids = torch.arange(n) * 7 % len(trainer.task.train)
    return Batch(trainer.train_x[ids], trainer.train_y[ids], ids)


@pytest.mark.parametrize("backend,lookahead", [("func", "all"), ("func", "last"), ("higher", "all"),
                                               ("closed-form", "last")])
def test_meta_step_is_side_effect_free_and_grads_stay_apart(digits_noisy, backend, lookahead):
    gate = MetaGate(meta_backend=backend, meta_lookahead=lookahead)
    tr = _trainer(digits_noisy, gate)
    batch = _batch(tr)
    before = _state(tr.student)
    table0 = gate.param.raw.detach().clone()
    logits = tr.student(batch.x)  # the real forward (moves BN stats once, as the real step does)
    after_forward = _state(tr.student)
    assert any(not torch.equal(before[k], after_forward[k]) for k in before)  # BN stats moved by the forward
    view = tr.make_view(batch, logits)
    gate.meta_step(view, batch.x, tr.lr)
    _assert_state_equal(tr.student, after_forward)  # the virtual step moved nothing
    assert all(p.grad is None for p in tr.student.parameters())  # meta step never writes student .grad
    assert not torch.equal(gate.param.raw, table0)  # the table learned
    assert gate.last_hypergrad_norm > 0
    # the real step never gives the gate a gradient
    tr.train_step(batch)
    assert all(p.grad is None for p in gate.parameters())
    assert all(p.grad is not None for p in tr.student.parameters())


def test_gate_backends_agree_inside_trainer(digits_noisy):
    """One meta update of the table through func(last), higher(last-equivalent) and closed-form."""
    tables = {}
    for name, kw in {"func": {"meta_backend": "func", "meta_lookahead": "last"},
                     "higher": {"meta_backend": "higher", "meta_lookahead": "last"},
                     "closed": {"meta_backend": "closed-form"},
                     "func-noreuse": {"meta_backend": "func", "meta_lookahead": "last", "meta_no_reuse": True}}.items():
        gate = MetaGate(meta_lr=1e3, **kw)
        tr = _trainer(digits_noisy, gate, arch="mlp", dtype=torch.float64)
        batch = _batch(tr)
        with frozen_buffers(tr.student):
            view = tr.make_view(batch, tr.student(batch.x))
            gate.meta_step(view, batch.x, tr.lr)
        tables[name] = gate.param.raw.detach()
    for name in ("higher", "closed", "func-noreuse"):
        torch.testing.assert_close(tables[name], tables["func"], atol=1e-5, rtol=0)


def test_net_and_split_and_amal_pass(digits_noisy):
    gate = MetaGate(meta_param="net", meta_columns="split", meta_normalize="column", meta_init_label=0.1,
                    meta_init_teacher=0.9)  # AMAL's rows
    tr = _trainer(digits_noisy, gate, k=3)
    w0 = [p.detach().clone() for p in gate.parameters()]
    res = tr.train_step(_batch(tr))
    assert res.weights.shape == (32, 4)
    torch.testing.assert_close(res.weights[:, 1], res.weights[:, 3])  # split: teachers share a weight
    torch.testing.assert_close(res.weights.mean(0), torch.tensor([0.1, 0.9, 0.9, 0.9]))
    assert any(not torch.equal(a, b) for a, b in zip(w0, gate.parameters()))

    gate = MetaGate(meta_param="table", meta_columns="label", meta_init_label=0.2, meta_init_teacher=0.4)
    tr = _trainer(digits_noisy, gate, k=3)
    tr.train_step(_batch(tr))
    res = tr.train_step(_batch(tr))
    assert gate.param.raw.shape == (len(digits_noisy.train), 1)
    torch.testing.assert_close(res.weights[:, 1:], torch.full((32, 3), 0.4))  # teachers held
    assert (res.weights[:, 0] != 0.2).all()  # the label weight learned

    gate = MetaGate(meta_schedule="amal", meta_val_batch=64)
    tr = _trainer(digits_noisy, gate, arch="mlp-bn")
    before = _state(tr.student)
    gate.amal_pass(tr)
    _assert_state_equal(tr.student, before)
    assert tr.student.training
    n, bs = len(digits_noisy.train), 32
    assert gate.updates == 5 * -(-n // (3 * bs))  # 5 iterations per group of 3 batches
    assert (gate.param.raw.detach() != torch.tensor([0.1, 0.9, 0.9])).any(1).float().mean() > 0.9


def test_meta_distill_cli_end_to_end(tmp_path, capsys):
    from metagate.cli import main

    rc = main(["distill", "--task", "digits", "--noise", "0.4", "--teachers", "1", "--gate", "meta",
               "--meta-lookahead", "last", "--epochs", "2", "--device", "cpu", "--no-progress",
               "--logdir", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test/acc" in out and "diag/auroc_teacher_share" in out
    assert (tmp_path / "run" / "metrics.json").is_file()
    # the route, once as TensorBoard text and in the run's hparams
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("meta/route")
    assert len(texts) == 1
    assert tensor_util.make_ndarray(texts[0].tensor_proto).item().decode().startswith("linear: plain ReLU MLP")
    assert json.loads((tmp_path / "run" / "hparams.json").read_text())["hparams"]["meta_route"] == "linear"
    help_text = _help()
    for flag in ("--meta-param", "--meta-backend", "--meta-every", "--meta-lr", "--meta-schedule"):
        assert flag in help_text


def _help() -> str:
    from metagate.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sub.choices["distill"].format_help()


def test_nn_module_without_feature_protocol_is_refused(digits_noisy):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, x):
            return self.lin(x.flatten(1))

    gate = MetaGate(meta_backend="closed-form")
    bank = TeacherBank(torch.randn(len(digits_noisy.train), 1, 10), ["t"])
    with pytest.raises(ConfigError, match="feature"):
        Trainer(digits_noisy, Plain(), gate, bank, TrainConfig(device="cpu", progress=False))


# -- fast paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_norm", [False, True])
def test_closed_form_by_hand_and_jvp_match_func(batch_norm):
    """The hand-derived closed form and the forward-mode look-ahead equal func's autograd hypergradient."""
    from metagate.gates.meta.lookahead import jvp_lookahead_hypergrad

    model, x, xv, yv, w, loss_fn = _problem(batch_norm, seed=2)
    t, y = loss_fn.keywords["t"], loss_fn.keywords["y"]
    lr = 0.3
    gf = _grad(func_lookahead_loss(model, w, loss_fn, x, xv, yv, lr), w)
    z = model(x)
    g = kd_logit_gradients(z, t, y, 2.0)
    before = _state(model)
    for logits in (z, None):
        val, dw = jvp_lookahead_hypergrad(model, w, g, x, xv, yv, lr, scale=1.0 / N, train_logits=logits)
        torch.testing.assert_close(dw, gf, atol=1e-12, rtol=0)
    _assert_state_equal(model, before)
    assert all(p.grad is None for p in model.parameters())
    z.sum().backward()  # the real forward's graph was kept for the real step
    # the closed form by hand == autograd through closed_form_val_logits == func on the last layer
    with frozen_buffers(model):
        h, z = forward_features(model, x)
        with torch.no_grad():
            hv, zv = forward_features(model, xv)
    gl = kd_logit_gradients(z, t, y, 2.0)
    scale = torch.rand(N, dtype=torch.float64)
    auto = torch.nn.functional.cross_entropy(closed_form_val_logits(w, gl, h.detach(), hv, zv, lr, scale), yv)
    with torch.no_grad():
        la = LinearLookahead([model.head], [h.detach()], hv, [(True, True)])
        val, dw = linear_hypergrad(la, w, gl, yv, lr, scale)
    torch.testing.assert_close(val, auto.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(dw, _grad(auto, w), atol=1e-12, rtol=0)
    vf = func_lookahead_loss(model, w, loss_fn, x, xv, yv, lr, names=resolve_names(model, "last"))
    with torch.no_grad():
        val, dw = linear_hypergrad(la, w, gl, yv, lr, 1.0 / N)
    torch.testing.assert_close(val, vf.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(dw, _grad(vf, w), atol=1e-10, rtol=0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_difference_product_matches_forward_mode(batch_norm):
    """``product="difference"`` (two plain forwards) approximates the forward-mode hypergradient: to 1e-6 in
    float64 with a small step; the student is untouched and the random stream of both forwards is the same."""
    from metagate.gates.meta.lookahead import jvp_lookahead_hypergrad

    model, x, xv, yv, w, loss_fn = _problem(batch_norm, seed=3)
    t, y = loss_fn.keywords["t"], loss_fn.keywords["y"]
    g = kd_logit_gradients(model(x).detach(), t, y, 2.0)
    before = _state(model)
    _, exact = jvp_lookahead_hypergrad(model, w, g, x, xv, yv, 0.3, scale=1.0 / N)
    val, diff = jvp_lookahead_hypergrad(model, w, g, x, xv, yv, 0.3, scale=1.0 / N, product="difference", step=1e-6)
    assert exact.abs().max() > 1e-6
    torch.testing.assert_close(diff, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))
    _assert_state_equal(model, before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kw", [{"meta_backend": "func", "meta_lookahead": "all"}, {"meta_backend": "func", "meta_lookahead": "last"},
                                {"meta_backend": "closed-form"}, {"meta_backend": "func", "meta_lookahead": "body.1"},
                                {"meta_backend": "func", "meta_lookahead": "all", "meta_param": "net", "meta_normalize": "column",
                                 "meta_lr": 1e-3},  # Adam: a larger step magnifies float32 teacher probabilities
                                {"meta_backend": "closed-form", "meta_transform": "sigmoid", "meta_inner_iters": 2}])
@pytest.mark.parametrize("arch", ["mlp", "mlp-bn"])
def test_fast_gate_paths_match_reference_update(digits_noisy, kw, arch):
    """One meta update + real step of the gate (fast paths) equals the reference autograd path."""
    def run(reference):
        gate = MetaGate(**{"meta_lr": 1e3, **kw})
        tr = _trainer(digits_noisy, gate, arch=arch, dtype=torch.float64)
        tr.unit_weights = tr.unit_weights.double()  # the trainer's record is float32
        batch = _batch(tr)
        assert reference or gate.route == ("jvp-by-hand" if arch == "mlp-bn" and kw.get("meta_lookahead") in
                                           ("all", "body.1") else "linear")
        if reference:  # plain func look-ahead of the pure function over the same parameters
            gate.use_route("autograd")
            assert gate.route == "autograd"
        tr.train_step(batch)
        return [p.detach().clone() for p in gate.param.parameters()], _state(tr.student)

    raw_f, st_f = run(False)
    raw_r, st_r = run(True)
    for a, b in zip(raw_f, raw_r):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for k in st_r:
        torch.testing.assert_close(st_f[k], st_r[k], atol=1e-6, rtol=0)


def test_channels_last_val_batch_is_the_same_batch(digits_noisy):
    from metagate.layout import channels_last

    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    assert torch.equal(channels_last(x), x) and channels_last(x).stride()[1] == 1
    x3 = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    assert torch.equal(channels_last(x3), x3)
    # a conv student's validation batches: the same values as a flat student's, channels-last
    images = Split(torch.randn(40, 3, 6, 6), torch.arange(40) % 4)
    flat, conv = (ValSampler(images, 8, 0, torch.device("cpu"), torch.float32, conv=c) for c in (False, True))
    for _ in range(6):
        (xf, yf), (xc, yc) = flat.next(), conv.next()
        assert torch.equal(xf, xc) and torch.equal(yf, yc)
        assert xc.stride()[1] == 1 and xf.is_contiguous()


@pytest.mark.parametrize("hidden", [(), (7,), (7, 6), (3, 4, 5)])
@pytest.mark.parametrize("d_in", [5, 40])
def test_linear_lookahead_matches_func_on_plain_mlps(hidden, d_in):
    """The hand-written look-ahead over any subset of a plain ReLU MLP's layers equals func (float64); with a
    wide input layer it takes the data-kernel route."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = MLP(d_in, hidden, C).double()
    layers = plain_mlp_layers(model)
    assert layers is not None and layers[-1] is model.head
    x = 3 + torch.randn(N, d_in, generator=g, dtype=torch.float64)  # off-centre, as raw pixels
    xv = 3 + torch.randn(M, d_in, generator=g, dtype=torch.float64)
    y, yv = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (M,), generator=g)
    t = 2 * torch.randn(N, K, C, generator=g, dtype=torch.float64)
    w = (0.2 + torch.rand(N, 1 + K, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask = (torch.rand(N, generator=g) > 0.2).double()
    acts, a = [], x
    for i, lin in enumerate(layers):  # each layer's training input
        acts.append(a)
        a = lin(a) if i + 1 == len(layers) else torch.relu(lin(a))
    gl = kd_logit_gradients(a, t, y, 2.0)
    prefixes = [n.rsplit(".", 1)[0] for n, _ in model.named_parameters()][::2]
    specs = ["all", "last", "head.weight", "head.bias", prefixes[0], f"{prefixes[0]}.bias",
             f"{prefixes[0]}.weight,head.bias", prefixes[len(prefixes) // 2]]
    for spec in specs:
        names = resolve_names(model, spec)
        vf = func_lookahead_loss(model, w, partial(_losses, t=t, y=y), x, xv, yv, 0.3, names, mask=mask)
        stepped = [(f"{p}.weight" in names, f"{p}.bias" in names) for p in prefixes]
        low = min(i for i, st in enumerate(stepped) if any(st))
        with torch.no_grad():
            xl = xv
            for lin in layers[:low]:
                xl = torch.relu(lin(xl))
            la = LinearLookahead(layers[low:], acts[low:], xl, stepped[low:])
            if d_in == 40 and low == 0 and stepped[0][0] and hidden[:1] in ((), (7,)):
                assert la.kernel  # the wide input layer (or a head on raw inputs) takes the data kernel
            val, dw = linear_hypergrad(la, w, gl, yv, 0.3, mask / mask.sum())
        torch.testing.assert_close(val, vf.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(dw, _grad(vf, w), atol=1e-12, rtol=0)


def test_plain_mlp_detection(digits_noisy):
    assert plain_mlp_layers(digits_noisy.make_student("mlp")) is not None
    for arch in ("mlp-bn", "cnn"):
        assert plain_mlp_layers(digits_noisy.make_student(arch)) is None

    class Scaled(MLP):
        def features(self, x):
            return 2 * super().features(x)

    assert plain_mlp_layers(Scaled(5, (4,), 3)) is None


@pytest.mark.parametrize("backend,lookahead", [("func", "all"), ("closed-form", "last")])
def test_linear_route_recomputes_inputs_for_foreign_logits(digits_noisy, backend, lookahead):
    """When the view's logits are not those of the last hooked forward, the train inputs are recomputed."""
    tables = []
    for foreign in (False, True):
        gate = MetaGate(meta_backend=backend, meta_lookahead=lookahead, meta_lr=1e3)
        tr = _trainer(digits_noisy, gate, arch="mlp", dtype=torch.float64)
        batch = _batch(tr)
        logits = tr.student(batch.x)
        if foreign:
            tr.student(batch.x[:5])  # another forward overwrites what the hooks kept
        gate.meta_step(tr.make_view(batch, logits), batch.x, tr.lr)
        tables.append(gate.param.raw.detach().clone())
    torch.testing.assert_close(tables[1], tables[0], atol=1e-12, rtol=0)


def test_table_sgd_rows_accumulates_repeated_ids():
    tab = WeightTable(6, torch.tensor([0.1, 0.9]), "clamp")
    ids = torch.tensor([1, 3, 1, 5])
    grad = torch.tensor([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0], [-3.0, 3.0]]) * 1e-3
    ref = tab.raw.detach().clone()
    ref.index_add_(0, ids, grad, alpha=-100.0)
    ref.clamp_(1e-7, 2.0 - 1e-7)
    rows = tab.sgd_rows(ids, grad, 100.0)
    torch.testing.assert_close(tab.raw.detach(), ref)
    torch.testing.assert_close(rows, ref[ids])


def test_val_batches_are_seeded_slices_of_a_shuffled_meta_split(digits_noisy):
    """Validation batches: slices of a once-shuffled copy of ``meta`` (never ``select``), no repeats
    within a pass, members mixing between passes, the same batches for the same seed."""
    def batches(seed, n):
        gate = MetaGate(meta_val_batch=16)
        _trainer(digits_noisy, gate, arch="mlp", seed=seed)
        return gate, [gate.sampler.next() for _ in range(n)]

    gate, got = batches(0, 60)
    meta = digits_noisy.meta
    assert sorted(gate.sampler.y.tolist()) == sorted(meta.y.tolist())
    rows = {tuple(r.tolist()): i for i, r in enumerate(meta.x.reshape(len(meta), -1))}
    ids = [[rows[tuple(r.tolist())] for r in xv.reshape(len(xv), -1)] for xv, _ in got]
    for (xv, yv), i in zip(got, ids):
        assert len(xv) == 16 and torch.equal(yv, meta.y[i])
    per_pass = (len(meta) - 15) // 16  # the fewest batches a pass can have
    first = [u for b in ids[:per_pass] for u in b]
    assert len(set(first)) == len(first)  # no repeats within a pass
    together = {frozenset(b) for b in ids}
    assert len(together) > per_pass + 1  # later passes regroup the units
    _, again = batches(0, 60)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, again))
    _, other = batches(1, 3)
    assert not torch.equal(other[0][0], got[0][0])


@pytest.mark.parametrize("kw,arch", [({"meta_backend": "closed-form"}, "mlp"), ({"meta_backend": "func"}, "mlp-bn"),
                                     ({"meta_backend": "func", "meta_param": "net"}, "mlp")])
@pytest.mark.parametrize("masked", [False, True])
def test_gate_logit_gradient_equals_autograd_of_the_weighted_loss(digits_noisy, kw, arch, masked):
    """The logit gradient the gate hands the real step (from its look-ahead's per-column gradients) is the
    autograd gradient of the trainer's weighted loss at the returned weights (float64, with a padding mask)."""
    from metagate.losses import reduce_weighted

    gate = MetaGate(**kw)
    tr = _trainer(digits_noisy, gate, arch=arch, dtype=torch.float64)
    b = _batch(tr)
    mask = (torch.arange(32) % 5 != 0).to(torch.float64) if masked else None
    batch = Batch(b.x, b.y, b.ids, None if mask is None else mask.view(-1, 1))
    logits = tr.student(batch.x)
    view = tr.make_view(batch, logits)
    gate.before_step(type("Ctx", (), {"run": tr, "view": view, "batch": batch, "step": 0})())
    out = gate.weights(view)
    assert out.logit_grad is not None
    z = logits.detach().requires_grad_(True)
    loss = reduce_weighted(unit_losses(z, view.teacher_logits.to(z.dtype), view.labels, out.tau), out.weights.detach(),
                           None if mask is None else view.mask)
    ref = torch.autograd.grad(loss, z)[0]
    torch.testing.assert_close(out.logit_grad, ref, rtol=1e-10, atol=1e-12)
    # the trainer takes it: a batch without a look-ahead falls back to autograd (no stale gradient)
    assert gate._grads is None and gate.weights(tr.make_view(batch, tr.student(batch.x))).logit_grad is None


# -- the route, chosen once at setup -------------------------------------------------------------
_SETUPS = {"func-all": {"meta_backend": "func"}, "func-last": {"meta_backend": "func", "meta_lookahead": "last"},
           "closed-form": {"meta_backend": "closed-form"}, "higher": {"meta_backend": "higher"},
           "no-reuse": {"meta_backend": "func", "meta_no_reuse": True},
           "difference": {"meta_backend": "func", "meta_product": "difference"}}
_ROUTES = {
    "mlp": {"func-all": "linear", "func-last": "linear", "closed-form": "linear", "higher": "higher",
            "no-reuse": "autograd", "difference": "linear"},
    "mlp-bn": {"func-all": "jvp-by-hand", "func-last": "linear", "closed-form": "linear", "higher": "higher",
               "no-reuse": "jvp-forward-mode", "difference": "jvp-difference"},
    "cnn": {"func-all": "jvp-by-hand", "func-last": "linear", "closed-form": "linear", "higher": "higher",
            "no-reuse": "jvp-forward-mode", "difference": "jvp-difference"},
}


@pytest.mark.parametrize("setup", list(_SETUPS))
@pytest.mark.parametrize("arch", list(_ROUTES))
def test_route_of_each_builtin_student_and_backend(digits_noisy, arch, setup):
    from metagate.gates.meta.routes import ROUTES, choose_route

    gate = MetaGate(**_SETUPS[setup])
    assert gate.route is None  # chosen at setup
    tr = _trainer(digits_noisy, gate, arch=arch)
    assert gate.route == _ROUTES[arch][setup] and gate.route in ROUTES
    assert gate.strategy.name == gate.route
    assert (gate.route, gate.route_reason) == choose_route(tr.student, gate.config, gate.names)
    assert gate.route_reason and gate.hparams()["meta_route"] == gate.route
    if gate.route == "linear" and arch == "mlp" and setup == "func-all":
        assert gate.route_reason.startswith("plain ReLU MLP") and "body.1, head" in gate.route_reason


class _Plain(nn.Module):
    """A student that is no metagate model: a linear layer (and optionally batch norm) on flattened inputs."""

    def __init__(self, batch_norm: bool = False):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.bn = nn.BatchNorm1d(10) if batch_norm else nn.Identity()

    def forward(self, x):
        return self.bn(self.lin(x.flatten(1)))


@pytest.mark.parametrize("batch_norm,route", [(False, "autograd"), (True, "jvp-forward-mode")])
def test_custom_student_falls_back_with_the_reason_recorded(digits_noisy, batch_norm, route):
    """A plain nn.Module student takes the autograd route (forward-mode AD with batch norm), says why, and its
    update equals the ``higher`` reference's (float64; the bank's float32 teacher logits set the tolerance)."""
    tables = []
    for reference in (False, True):
        torch.manual_seed(0)
        gate = MetaGate(meta_lr=1e3)
        bank = TeacherBank(3 * torch.randn(len(digits_noisy.train), 2, 10), ["t0", "t1"])
        task = dataclasses.replace(digits_noisy, **{s: Split(getattr(digits_noisy, s).x.double(),
                                                             getattr(digits_noisy, s).y)
                                                    for s in ("train", "meta", "select", "test")})
        tr = Trainer(task, _Plain(batch_norm).double(), gate, bank,
                     TrainConfig(batch_size=32, lr=0.1, device="cpu", progress=False))
        tr.unit_weights = tr.unit_weights.double()
        assert gate.route == route
        assert "_Plain" in gate.route_reason and ("autograd" in gate.route_reason if route == "autograd"
                                                  else "not a metagate.models.MLP/CNN" in gate.route_reason)
        if reference:
            gate.use_route("higher")
            assert gate.route == "higher" and gate.route_reason == "chosen by use_route"
        table0 = gate.param.raw.detach().clone()
        tr.train_step(_batch(tr))
        assert not torch.equal(gate.param.raw, table0)  # the table learned
        tables.append(gate.param.raw.detach().clone())
    torch.testing.assert_close(tables[0], tables[1], atol=1e-6, rtol=0)


def test_use_route_refuses_routes_that_cannot_serve_the_student(digits_noisy):
    gate = MetaGate()
    _trainer(digits_noisy, gate, arch="cnn")
    with pytest.raises(ConfigError, match="unknown meta route 'fast'"):
        gate.use_route("fast")
    with pytest.raises(ConfigError, match="meta route 'linear' needs"):
        gate.use_route("linear")  # a CNN over all parameters
    assert gate.route == "jvp-by-hand"  # unchanged
    gate = MetaGate(meta_no_reuse=True)
    _trainer(digits_noisy, gate, arch="cnn")
    with pytest.raises(ConfigError, match="drop --meta-no-reuse"):
        gate.use_route("jvp-by-hand")
    gate = MetaGate()
    bank = TeacherBank(torch.randn(len(digits_noisy.train), 1, 10), ["t"])
    Trainer(digits_noisy, _Plain(batch_norm=True), gate, bank, TrainConfig(device="cpu", progress=False))
    with pytest.raises(ConfigError, match="meta route 'jvp-by-hand' needs"):
        gate.use_route("jvp-by-hand")  # no tangent rules for a foreign student
    gate.use_route("jvp-difference")
    assert gate.route == "jvp-difference" and gate.strategy.product == "difference"


def test_route_is_logged_once_as_text(digits_noisy):
    class Recorder:
        def __init__(self):
            self.texts, self.scalars = [], []

        def text(self, tag, value, step, description=None):
            self.texts.append((tag, value, step))
            assert description

        def scalar(self, tag, value, step):
            self.scalars.append(tag)

        def histogram(self, tag, values, step):
            pass

    gate = MetaGate()
    tr = _trainer(digits_noisy, gate, arch="mlp-bn")
    tr.train_step(_batch(tr))
    rec = Recorder()
    gate.log(rec, 1)
    gate.log(rec, 2)
    assert rec.texts == [("meta/route", f"jvp-by-hand: {gate.route_reason}", 1)]
    assert "meta/loss" in rec.scalars and "meta/updates" in rec.scalars


def test_val_sampler_state_round_trip_and_the_gate_checkpoint_keys(digits_noisy):
    """A sampler restored from its state serves the batches the original serves next (mid-pass and across a new
    pass); the gate's checkpoint keeps its keys (old checkpoints still resume)."""
    def sampler():
        return ValSampler(digits_noisy.meta, 16, 3, torch.device("cpu"), torch.float32, conv=False)

    a = sampler()
    for _ in range(5):
        a.next()
    state = a.state_dict(prefix="val_")
    assert set(state) == {"val_rng", "val_order", "val_pos"}
    ahead = [a.next() for _ in range(2 * len(digits_noisy.meta) // 16)]  # into the next pass
    b = sampler()
    b.load_state_dict(state, prefix="val_")
    for (xa, ya), (xb, yb) in zip(ahead, (b.next() for _ in ahead)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    gate = MetaGate()
    _trainer(digits_noisy, gate, arch="mlp")
    assert set(gate.state_dict()) == {"param", "optimizer", "updates", "last_pass_epoch", "val_rng", "val_order",
                                      "val_pos"}
