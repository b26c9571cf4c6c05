"""Unit features: the cached fast path equals the plain function; the fast policy head equals the module."""

from __future__ import annotations

import pytest
import torch


def _bank(n=200, k=3, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0, 30.0])
def test_teacher_feature_cache_matches_unit_features(scale):
    from metagate.features import FEATURE_HIGH, TeacherFeatureCache, unit_features

    logits, labels = _bank()
    cache = TeacherFeatureCache(logits, labels)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, logits.shape[0], (64,), generator=g)
    s = torch.randn(64, 10, generator=g, requires_grad=True) * scale
    ref = unit_features(s, logits[ids], labels[ids], 0.37).clamp(0, FEATURE_HIGH)
    got = cache.features(s, ids, 0.37)
    assert got.shape == ref.shape and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_cache_view_features_falls_back_without_ids():
    from metagate.features import TeacherFeatureCache, unit_features
    from metagate.gates.base import UnitView

    logits, labels = _bank(n=20)
    cache = TeacherFeatureCache(logits, labels)
    s = torch.randn(20, 10)
    ids = torch.arange(20)
    with_ids = UnitView(s, logits, labels, torch.ones(20), ids, (20, 1), 0.5)
    without = UnitView(s, logits, labels, torch.ones(20), None, (20, 1), 0.5)
    ref = unit_features(s, logits, labels, 0.5).clamp(0, 5)
    torch.testing.assert_close(cache.view_features(with_ids), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache.view_features(without), ref)


@pytest.mark.parametrize("mode", ["weights", "select"])
def test_frozen_head_matches_module_and_tracks_updates(mode):
    from metagate.policies import ReinforcePolicy
    from metagate.policies.core import FrozenLogitHead

    torch.manual_seed(0)
    pol = ReinforcePolicy(mode)
    with torch.no_grad():
        for p in pol.parameters():
            p.normal_(std=0.5)
    fast = FrozenLogitHead(pol.net)
    for k in (3, 5, 3):
        x = torch.rand(17, k, 11) * 2
        with torch.no_grad():
            torch.testing.assert_close(fast(x), pol.mean_logits(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a parameter update is picked up
        pol.net.head.weight.add_(1.0)
        x = torch.rand(17, 3, 11)
        torch.testing.assert_close(fast(x), pol.mean_logits(x), atol=1e-5, rtol=1e-5)


def test_frozen_head_follows_the_learners_optimizer_steps():
    """The gate's cached head is rebuilt after every REINFORCE update (a fused optimizer that skips the
    parameters' version counters would leave it stale: the gate would act with the initial policy)."""
    from metagate.policies import ReinforceLearner, ReinforcePolicy
    from metagate.policies.core import FrozenLogitHead

    torch.manual_seed(0)
    pol = ReinforcePolicy("weights", shared_log_std=-0.5)
    fast = FrozenLogitHead(pol.net)
    learner = ReinforceLearner(pol, lr=0.1, antithetic=True)
    x = torch.rand(32, 3, 11)
    before = fast(x).clone()
    for reward in (1.0, -1.0, 2.0, -2.0):
        learner.record(x, torch.rand(32, 3))
        learner.finish(reward)
    with torch.no_grad():
        now = pol.mean_logits(x)
    assert (now - before).abs().max() > 1e-4  # the policy moved
    torch.testing.assert_close(fast(x), now, atol=1e-5, rtol=1e-5)


def test_teacher_reliability_and_reliability_features_by_hand():
    """Two meta units per predicted class, three teachers, four classes: every number checked by hand."""
    import math

    from metagate.features import reliability_features, teacher_reliability

    big = 10.0
    # meta: labels [0, 0, 1, 2]; teacher 0 predicts [0, 0, 1, 1] (right, right, right, wrong: on class 1: 1 of 2)
    meta_pred = torch.tensor([[0, 2, 3], [0, 0, 3], [1, 1, 3], [1, 2, 3]])
    meta_y = torch.tensor([0, 0, 1, 2])
    lg = torch.nn.functional.one_hot(meta_pred, 4).float() * big
    rel = teacher_reliability(lg, meta_y, prior=1.0)
    # teacher 0: class 0 predicted 2x right 2 -> 3/4; class 1 predicted 2x right 1 -> 2/4; classes 2, 3 unseen -> 1/2
    torch.testing.assert_close(rel[0], torch.tensor([0.75, 0.5, 0.5, 0.5]))
    # teacher 1: class 2 predicted 2x (labels 0, 2): right 1 -> 1/2; class 0 once right -> 2/3; class 1 once right
    torch.testing.assert_close(rel[1], torch.tensor([2 / 3, 2 / 3, 0.5, 0.5]))
    # teacher 2: class 3 predicted 4x, never right -> 1/6
    torch.testing.assert_close(rel[2], torch.tensor([0.5, 0.5, 0.5, 1 / 6]))
    # one training unit: teachers predict 0, 0, 3 with probabilities p_k
    t = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]])
    f = reliability_features(t, rel)
    assert f.shape == (1, 3, 3)
    torch.testing.assert_close(f[0, :, 0], torch.tensor([0.75, 2 / 3, 1 / 6]))
    # majority of the others: teacher 0 -> {0, 3} tie -> class 0 (lowest): agrees; teacher 1 -> {0, 3} -> 0: agrees;
    # teacher 2 -> {0, 0} -> 0: disagrees
    torch.testing.assert_close(f[0, :, 1], torch.tensor([1.0, 1.0, 0.0]))
    p = torch.softmax(t[0], -1)
    for k in range(3):
        q = (p.sum(0) - p[k]) / 2
        kl = float((p[k] * (p[k].log() - q.log())).sum()) / math.log(4)
        assert abs(float(f[0, k, 2]) - kl) < 1e-6


def test_feature_cache_appends_static_features():
    from metagate.features import NUM_FEATURES, TeacherFeatureCache, unit_features

    g = torch.Generator().manual_seed(0)
    t, y, s = torch.randn(5, 2, 3, generator=g), torch.tensor([0, 1, 2, 0, 1]), torch.randn(5, 3, generator=g)
    extra = torch.rand(5, 2, 3, generator=g)
    cache = TeacherFeatureCache(t, y, extra)
    assert cache.num_features == NUM_FEATURES + 3
    ids = torch.tensor([4, 0, 2])
    f = cache.features(s[ids], ids, 0.25)
    torch.testing.assert_close(f[..., :NUM_FEATURES], unit_features(s[ids], t[ids], y[ids], 0.25).clamp(0, 5))
    torch.testing.assert_close(f[..., NUM_FEATURES:], extra[ids])
