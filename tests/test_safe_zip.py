"""Policy zips are read as data: a crafted zip's payload never runs (issue 12, point 1)."""

from __future__ import annotations

import base64
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from metagate.errors import ConfigError
from metagate.gates.policy import PolicyGate
from metagate.policies import safe_zip
from metagate.policies.safe_zip import META_NAME, load_policy_zip


class _Payload:
    """Unpickling this writes ``path`` (what a malicious zip would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"with open({self.path!r}, 'w') as f: f.write('pwned')",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A PPO model with our policy saved as ``metagate train-policy`` saves it (untrained: no learning needed)."""
    from stable_baselines3 import PPO

    from metagate.data import get_task
    from metagate.envs import TeacherWeightingEnv
    from metagate.envs.synthetic import synthetic_bank
    from metagate.policies.safe_zip import write_policy_meta
    from metagate.policies.sb3 import TeacherWeightingPolicy

    task = get_task("digits")
    env = TeacherWeightingEnv(task, synthetic_bank(task), batch_size=8, episode_steps=4, alpha=0.3)
    torch.manual_seed(0)
    model = PPO(TeacherWeightingPolicy, env, n_steps=4, batch_size=4, device="cpu", seed=0,
                policy_kwargs=dict(hidden=8, weight_temperature=0.5, label_alpha=0.3, kd_tau=2.0))
    path = tmp_path_factory.mktemp("zip") / "policy.zip"
    model.save(path)
    write_policy_meta(path, model.policy, "ppo")
    obs, _ = env.reset(seed=3)
    return path, model, obs


def _rewrite(src, dst, replace=None, drop=()):
    """Copy a zip with some entries replaced (bytes) or dropped."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name in drop:
                continue
            zout.writestr(name, replace.pop(name) if name in replace else zin.read(name))
        for name, data in replace.items():
            zout.writestr(name, data)
    return dst


def _poisoned_data(src, marker):
    """The zip's ``data`` JSON with every serialized field replaced by the payload."""
    with zipfile.ZipFile(src) as z:
        data = json.loads(z.read("data"))
    evil = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    n = 0
    for v in data.values():
        if isinstance(v, dict) and ":serialized:" in v:
            v[":serialized:"] = evil
            n += 1
    assert n >= 3  # policy_class, observation_space, action_space at least
    return json.dumps(data).encode()


def test_round_trip_gives_the_saved_policy(saved):
    path, model, obs = saved
    pol = load_policy_zip(path)
    x = torch.as_tensor(obs)
    with torch.no_grad():
        torch.testing.assert_close(pol.mean_logits(x), model.policy.mean_logits(x), rtol=0, atol=0)
    assert (pol.hidden, pol.weight_temperature, pol.label_alpha, pol.kd_tau) == (8, 0.5, 0.3, 2.0)
    for (k, v), v2 in zip(model.policy.state_dict().items(), pol.state_dict().values()):
        assert torch.equal(v, v2), k


def test_crafted_zip_payload_never_runs(saved, tmp_path):
    """The payload is live (stable-baselines3's loader runs it); ours ignores every serialized field."""
    from stable_baselines3.common.save_util import load_from_zip_file

    path, model, obs = saved
    marker = tmp_path / "pwned.txt"
    crafted = _rewrite(path, tmp_path / "crafted.zip", {"data": _poisoned_data(path, marker)})
    pol = load_policy_zip(crafted)  # our metadata and weights: loads, payload ignored
    assert not marker.exists()
    with torch.no_grad():
        torch.testing.assert_close(pol.mean_logits(torch.as_tensor(obs)), model.policy.mean_logits(
            torch.as_tensor(obs)), rtol=0, atol=0)
    # an older zip without our description: read from data's plain fields, payload still ignored
    legacy = _rewrite(crafted, tmp_path / "legacy.zip", drop=(META_NAME,))
    assert load_policy_zip(legacy).hidden == 8 and not marker.exists()
    # a zip whose policy_class is only a payload: refused, nothing run
    with zipfile.ZipFile(legacy) as z:
        data = json.loads(z.read("data"))
    data["policy_class"] = {k: v for k, v in data["policy_class"].items() if k.startswith(":")}
    foreign = _rewrite(legacy, tmp_path / "foreign.zip", {"data": json.dumps(data).encode()})
    with pytest.raises(ConfigError, match="not a metagate teacher-weighting policy") as e:
        load_policy_zip(foreign)
    assert str(foreign) in str(e.value) and not marker.exists()
    with pytest.raises(ConfigError, match="--policy"):  # the gate's loader is this one
        PolicyGate(policy=str(foreign))
    assert not marker.exists()
    # the control: stable-baselines3's own loader executes the payload
    load_from_zip_file(foreign, device="cpu")
    assert marker.read_text() == "pwned"


def test_pickled_weights_are_refused(saved, tmp_path):
    path, _, _ = saved
    marker = tmp_path / "pwned.txt"
    buf = io.BytesIO()
    torch.save({"actor.head.weight": _Payload(marker)}, buf)
    crafted = _rewrite(path, tmp_path / "w.zip", {"policy.pth": buf.getvalue()})
    with pytest.raises(ConfigError, match="policy.pth is not a plain tensor state dict"):
        load_policy_zip(crafted)
    assert not marker.exists()


def _meta(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(META_NAME))


@pytest.mark.parametrize("edit, msg", [
    (lambda m: m.update(policy_class="stable_baselines3.common.policies.ActorCriticPolicy"), "policy class .* refused"),
    (lambda m: m["policy_kwargs"].update(activation_fn="torch.nn.Tanh"), "unknown policy option.*activation_fn"),
    (lambda m: m["policy_kwargs"].update(hidden="16"), "hidden='16' must be int"),
    (lambda m: m["policy_kwargs"].update(hidden=0), "hidden=0 must be >= 1"),
    (lambda m: m["policy_kwargs"].update(kd_tau=float("nan")), "kd_tau=nan"),
    (lambda m: m.update(observation_shape=[8, 3, 5], action_shape=[8, 3]), "trained on 5 unit features"),
    (lambda m: m.update(action_shape=[8, 2]), "does not match"),
    (lambda m: m.update(version=99), "not a metagate policy description"),
    (lambda m: m["policy_kwargs"].update(hidden=12), "do not fit"),
])
def test_malformed_descriptions_are_refused(saved, tmp_path, edit, msg):
    path, _, _ = saved
    meta = _meta(path)
    edit(meta)
    crafted = _rewrite(path, tmp_path / "m.zip", {META_NAME: json.dumps(meta).encode()})
    with pytest.raises(ConfigError, match=msg) as e:
        load_policy_zip(crafted)
    assert str(crafted) in str(e.value)


def test_oversized_entries_and_foreign_files_are_refused(saved, tmp_path, monkeypatch):
    path, _, _ = saved
    monkeypatch.setattr(safe_zip, "MAX_WEIGHTS_BYTES", 1000)  # a bomb: the entry is read only up to the bound
    with pytest.raises(ConfigError, match="policy.pth.*limit 1000"):
        load_policy_zip(path)
    monkeypatch.undo()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="not a stable-baselines3 policy zip"):
        load_policy_zip(bad)
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(ConfigError, match="no 'data' entry"):
        load_policy_zip(empty)
    nanw = _rewrite(path, tmp_path / "nan.zip", {"policy.pth": _nan_weights(path)})
    with pytest.raises(ConfigError, match="NaN"):
        load_policy_zip(nanw)


def _nan_weights(path):
    with zipfile.ZipFile(path) as z:
        state = torch.load(io.BytesIO(z.read("policy.pth")), weights_only=True)
    state["actor.head.bias"] = torch.full_like(state["actor.head.bias"], np.nan)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_temperature_zip_shares_the_safe_round_trip(tmp_path):
    """The temperature policy's zip goes through the same loader: the saved policy comes back (same actions);
    a poisoned data entry never runs and pickled weights are refused."""
    from stable_baselines3 import PPO

    from metagate.data import get_task
    from metagate.envs import InstanceTemperatureEnv
    from metagate.envs.synthetic import synthetic_bank
    from metagate.gates.temperature.policy import NUM_STATE
    from metagate.gates.temperature.sb3 import META_NAME as TEMP_META
    from metagate.gates.temperature.sb3 import TemperaturePolicySB3, load_temperature_zip, write_temperature_meta

    task = get_task("digits")
    env = InstanceTemperatureEnv(task, synthetic_bank(task), batch_size=8, episode_steps=4, temp_min=2.0,
                                 temp_max=6.0)
    torch.manual_seed(0)
    model = PPO(TemperaturePolicySB3, env, n_steps=4, batch_size=4, device="cpu", seed=0,
                policy_kwargs=dict(hidden=8, t_min=2.0, t_max=6.0, label_alpha=0.3))
    path = tmp_path / "temp.zip"
    model.save(path)
    write_temperature_meta(path, model.policy, "ppo")
    obs, _ = env.reset(seed=1)
    pol = load_temperature_zip(path, NUM_STATE)
    x = torch.as_tensor(obs)
    torch.testing.assert_close(pol.mean_action(x), model.policy.mean_action(x))
    assert (pol.t_min, pol.t_max, pol.label_alpha, pol.hidden) == (2.0, 6.0, 0.3, 8)
    marker = tmp_path / "pwned"
    poisoned = _rewrite(path, tmp_path / "poisoned.zip", {"data": _poisoned_data(path, marker)})
    load_temperature_zip(poisoned, NUM_STATE)  # the data entry is never read
    evil = io.BytesIO()
    torch.save({"w": _Payload(marker)}, evil)
    with pytest.raises(ConfigError, match="not a plain tensor state dict"):
        load_temperature_zip(_rewrite(path, tmp_path / "evil.zip", {"policy.pth": evil.getvalue()}), NUM_STATE)
    with pytest.raises(ConfigError, match=f"no {TEMP_META!r} entry"):
        load_temperature_zip(_rewrite(path, tmp_path / "bare.zip", drop=(TEMP_META,)), NUM_STATE)
    assert not marker.exists()
