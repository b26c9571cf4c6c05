"""ForwardCapture: the activations of the real forward, handed out only for the logits that forward made."""

import torch
from torch import nn

from metagate.gates.meta.capture import ForwardCapture


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def test_keeps_the_inputs_of_the_forward_that_made_the_logits():
    net = _mlp()
    lins = [net[0], net[2], net[4]]
    cap = ForwardCapture(lins)
    x = torch.randn(7, 6)
    z = net(x)
    kept = cap.kept_for(z)
    assert kept is not None and [k.forward for k in kept] == [1, 1, 1]
    assert torch.equal(kept[0].input, x)
    with torch.no_grad():
        h = torch.relu(net[0](x))
    torch.testing.assert_close(kept[1].input, h)
    assert all(k.training for k in kept) and all(not k.input.requires_grad for k in kept)

    with torch.no_grad():  # evaluation's forwards are not kept: the training forward's stay valid
        net(torch.randn(50, 6))
    assert cap.kept_for(z) is not None

    z2 = net(torch.randn(7, 6))  # a later training forward replaces them
    assert cap.kept_for(z) is None and cap.kept_for(z2) is not None

    cap.active = False  # paused: a look-ahead's own forward keeps nothing
    net(torch.randn(7, 6))
    cap.active = True
    assert cap.kept_for(z2) is not None

    cap.remove()
    net(torch.randn(7, 6))
    assert cap.kept_for(z2) is not None  # no hooks left to replace anything


def test_partial_capture_is_refused():
    """A forward that stopped early (or ran only the upper modules) leaves entries of another forward."""
    net = _mlp()
    cap = ForwardCapture([net[0], net[2], net[4]])
    z = net(torch.randn(3, 6))
    net[4](torch.randn(3, 4))  # the head alone: its entry is of another forward now
    assert cap.kept_for(z) is None


def test_extra_keeps_what_the_function_returns():
    net = _mlp()
    cap = ForwardCapture([net[0], net[4]], extra=lambda m, out: out.detach() * 2)
    z = net(torch.randn(3, 6))
    kept = cap.kept_for(z)
    assert kept is not None
    torch.testing.assert_close(kept[1].extra, z.detach() * 2)


def test_meta_linear_route_reuses_the_real_forward(digits_noisy, digits_bank):
    """The hand-written look-ahead reads the training forward's activations (no second forward of the batch)."""
    from metagate.gates.meta import MetaGate
    from metagate.trainer import TrainConfig, Trainer

    task, bank = digits_noisy, digits_bank[0]
    gate = MetaGate(meta_param="net")
    tr = Trainer(task, task.make_student(), gate, bank, TrainConfig(epochs=1, batch_size=32, progress=False,
                                                                    device="cpu"))
    assert gate.route == "linear"
    capture = gate.strategy.capture
    calls = []
    orig = capture.kept_for

    def spy(logits):
        out = orig(logits)
        calls.append(out is not None)
        return out

    capture.kept_for = spy
    batch = next(iter(tr.epoch_batches(0)))
    tr.train_step(batch)
    assert calls == [True]


def test_a_sequence_output_flattened_to_token_units_is_recognised_and_not_held():
    """The trainer flattens a sequence model's ``[B, T, C]`` logits to ``[B*T, C]`` token units and drops the
    original: the capture still hands out that forward's activations for the flattened rows (not for a copy, nor
    for another forward's), and it holds no logits of its own once they are gone."""
    import gc
    import weakref

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    cap = ForwardCapture([net[0], net[2]])
    flat = net(torch.randn(2, 3, 6)).reshape(-1, 4)  # [B, T, C] -> [B*T, C]; the [B, T, C] tensor is dropped
    kept = cap.kept_for(flat)
    assert kept is not None and kept[0].input.shape == (2, 3, 6)
    assert cap.kept_for(flat.clone()) is None and cap.kept_for(flat[:4]) is None
    other = net(torch.randn(2, 3, 6)).reshape(-1, 4)
    assert cap.kept_for(flat) is None and cap.kept_for(other) is not None
    gone = weakref.ref(other._base)
    del other
    gc.collect()
    assert gone() is None  # the capture kept no reference to the logits
