"""Memory layouts and mode switches: same values, cheaper kernels."""

from __future__ import annotations

import torch
from torch import nn

from metagate.layout import for_model
from metagate.models import CNN, MLP
from metagate.modes import eval_mode, is_mode_free


def test_for_model_keeps_values_and_lays_out_images_for_convs():
    x = torch.randn(4, 1, 8, 8)
    cnn, mlp = CNN(1, 8, width=4, num_classes=10), MLP(64, (8,), 10)
    y = for_model(cnn, x)
    assert torch.equal(y, x) and y.stride()[1] == 1  # channels-last
    assert for_model(mlp, x) is x
    torch.testing.assert_close(cnn.eval()(y), cnn.eval()(x))


def test_mode_switch_is_skipped_only_when_it_cannot_matter():
    mlp, bn = MLP(6, (5,), 3), MLP(6, (5,), 3, batch_norm=True)
    assert is_mode_free(mlp) and not is_mode_free(bn)
    assert not is_mode_free(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)))
    bn.train()
    with eval_mode(bn) as m:
        assert not m.training
    assert bn.training
    mlp.train()
    with eval_mode(mlp):
        assert mlp.training  # not switched: same output either way
