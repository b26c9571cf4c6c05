"""Load a teacher-weighting policy from a stable-baselines3 zip without running anything from it.

stable-baselines3's ``load_from_zip_file`` (and ``PPO.load``) ``cloudpickle.loads`` every serialized
field of the zip's ``data`` JSON and then instantiates whatever ``policy_class`` it names, so a
crafted zip runs its payload (stable-baselines3 issue #2281). This loader reads the zip itself:

* ``metagate-policy.json`` (written by ``metagate train-policy``): the policy class name, the
  observation/action shapes and bounds, and the constructor options, all plain JSON. Zips written
  before it existed fall back to the plain (non-serialized) entries of ``data``: the spaces'
  ``_shape`` and a JSON ``policy_kwargs``.
* ``policy.pth``: the weights, with ``torch.load(weights_only=True)``.

The round trip (:func:`write_meta`, :func:`resolve_zip`, :func:`read_policy_zip`, :func:`build_policy`) is shared
with the temperature policy's zip (:mod:`metagate.gates.temperature.sb3`).

Every ``:serialized:`` field is ignored; the only class ever built is
:class:`metagate.policies.sb3.TeacherWeightingPolicy`. Anything else is refused with a
:class:`~metagate.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagate.errors import ConfigError
from metagate.features import FEATURE_HIGH, NUM_FEATURES

META_NAME = "metagate-policy.json"
FORMAT = "metagate-policy"
VERSION = 1
POLICY_CLASS = "metagate.policies.sb3.TeacherWeightingPolicy"
#: constructor options of the policy and the JSON types each may hold (None: the option is off)
KWARGS: dict[str, tuple[type, ...]] = {
    "hidden": (int,), "log_std_init": (int, float, type(None)), "shared_log_std_init": (int, float, type(None)),
    "weight_temperature": (int, float), "label_alpha": (int, float), "kd_tau": (int, float),
}
#: read bounds (a zip member is decompressed only up to these sizes: no zip bombs)
MAX_JSON_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 64 << 20


def policy_meta(policy: Any, algo: str) -> dict[str, Any]:
    """What the safe loader needs of a :class:`TeacherWeightingPolicy`, as plain JSON."""
    obs, act = policy.observation_space, policy.action_space
    return {
        "format": FORMAT, "version": VERSION, "policy_class": POLICY_CLASS, "algo": algo,
        "observation_shape": [int(s) for s in obs.shape], "observation_low": float(np.min(obs.low)),
        "observation_high": float(np.max(obs.high)), "action_shape": [int(s) for s in act.shape],
        "action_low": float(np.min(act.low)), "action_high": float(np.max(act.high)),
        "policy_kwargs": {"hidden": policy.hidden, "log_std_init": policy.log_std_init,
                          "shared_log_std_init": policy.shared_log_std_init,
                          "weight_temperature": policy.weight_temperature, "label_alpha": policy.label_alpha,
                          "kd_tau": policy.kd_tau},
    }


def write_policy_meta(path: str | Path, policy: Any, algo: str) -> None:
    """Add ``metagate-policy.json`` to a zip saved by ``model.save`` (``metagate train-policy`` calls this)."""
    write_meta(path, META_NAME, policy_meta(policy, algo))


def _read(zf: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ConfigError(f"{where}: the zip has no {name!r} entry") from None
    if info.file_size > limit:
        raise ConfigError(f"{where}: zip entry {name!r} claims {info.file_size} bytes (limit {limit})")
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{where}: zip entry {name!r} is larger than {limit} bytes")
    return data


def _legacy_meta(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The loader's fields from the plain entries of an older zip's ``data`` JSON."""
    cls = data.get("policy_class")
    if not (isinstance(cls, dict) and cls.get("__module__") == "metagate.policies.sb3"
            and "mean_logits" in cls):
        raise ConfigError(f"{where}: not a metagate teacher-weighting policy (its policy_class is not "
                          "TeacherWeightingPolicy; only zips from `metagate train-policy` are loaded)")
    kwargs = data.get("policy_kwargs")
    if not isinstance(kwargs, dict) or ":serialized:" in kwargs:
        raise ConfigError(f"{where}: policy_kwargs is not plain JSON (serialized objects are never loaded)")
    shapes = []
    for key in ("observation_space", "action_space"):
        space = data.get(key)
        shape = space.get("_shape") if isinstance(space, dict) else None
        if not isinstance(shape, list):
            raise ConfigError(f"{where}: {key} has no plain shape")
        shapes.append(shape)
    return {"format": FORMAT, "version": VERSION, "policy_class": POLICY_CLASS, "observation_shape": shapes[0],
            "observation_low": 0.0, "observation_high": FEATURE_HIGH, "action_shape": shapes[1],
            "action_low": -1.0, "action_high": 1.0, "policy_kwargs": kwargs}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{where}: {META_NAME} is not a metagate policy description v{VERSION}")
    if meta.get("policy_class") != POLICY_CLASS:
        raise ConfigError(f"{where}: policy class {meta.get('policy_class')!r} refused; only {POLICY_CLASS} is "
                          "loaded (use stable-baselines3's PPO.load for other policies you trust)")
    obs, act = meta.get("observation_shape"), meta.get("action_shape")
    if not (isinstance(obs, list) and len(obs) == 3 and all(isinstance(s, int) and s >= 1 for s in obs)):
        raise ConfigError(f"{where}: observation shape must be [B, K, F] positive ints, got {obs!r}")
    if act != obs[:2]:
        raise ConfigError(f"{where}: action shape {act!r} does not match the observation's [B, K] {obs[:2]}")
    if obs[2] != NUM_FEATURES:
        raise ConfigError(f"{where}: the policy was trained on {obs[2]} unit features, this metagate computes "
                          f"{NUM_FEATURES}; retrain it with `metagate train-policy`")
    for key in ("observation_low", "observation_high", "action_low", "action_high"):
        if not _number(meta.get(key)):
            raise ConfigError(f"{where}: {key} must be a finite number, got {meta.get(key)!r}")
    kwargs = meta.get("policy_kwargs")
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}: policy_kwargs must be a mapping, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(KWARGS))
    if unknown:
        raise ConfigError(f"{where}: unknown policy option(s) {unknown}; allowed: {sorted(KWARGS)}")
    for k, v in kwargs.items():
        if isinstance(v, bool) or not isinstance(v, KWARGS[k]) or (v is not None and not _number(v)):
            raise ConfigError(f"{where}: policy option {k}={v!r} must be {' or '.join(t.__name__ for t in KWARGS[k])}")
    if kwargs.get("hidden", 16) < 1:
        raise ConfigError(f"{where}: policy option hidden={kwargs['hidden']} must be >= 1")
    return meta


def resolve_zip(path: str | Path, what: str, hint: str) -> tuple[Path, str]:
    """The zip's path (``.zip`` appended when the name lacks it) and how errors name it; a missing file is a
    :class:`ConfigError` ending with ``hint`` (how to make one)."""
    p = Path(path)
    if not p.is_file() and p.with_suffix(".zip").is_file():
        p = p.with_suffix(".zip")
    if not p.is_file():
        raise ConfigError(f"{what} {path}: no such file ({hint})")
    return p, f"{what} {p}"


def write_meta(path: str | Path, name: str, meta: dict[str, Any]) -> None:
    """Add the plain-JSON description ``name`` to a zip saved by ``model.save``."""
    with zipfile.ZipFile(path, mode="a") as zf:
        zf.writestr(name, json.dumps(meta, indent=2))


def read_policy_zip(path: Path, where: str, meta_name: str, fallback: Any = None,
                    check: Any = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """The JSON description ``meta_name`` and the ``policy.pth`` weights of a zip, executing nothing of it:
    ``json.loads`` and ``torch.load(weights_only=True)``, bounded reads, every ``:serialized:`` field ignored.

    :param fallback: ``fallback(data, where) -> meta`` for zips without ``meta_name`` (reads the plain entries
        of SB3's ``data`` JSON); ``None``: such a zip is refused
    :param check: ``check(meta, where) -> meta`` validates the description before the weights are read
    :raises ConfigError: not a zip, a missing or malformed entry, weights that are not plain tensors
    """
    try:
        with zipfile.ZipFile(path) as zf:
            if meta_name in set(zf.namelist()) or fallback is None:
                try:
                    meta = json.loads(_read(zf, meta_name, MAX_JSON_BYTES, where))
                except ValueError as e:
                    raise ConfigError(f"{where}: {meta_name} is not JSON ({e})") from e
            else:
                try:
                    data = json.loads(_read(zf, "data", MAX_JSON_BYTES, where))
                except ValueError as e:
                    raise ConfigError(f"{where}: its data entry is not JSON ({e})") from e
                if not isinstance(data, dict):
                    raise ConfigError(f"{where}: its data entry is not a mapping")
                meta = fallback(data, where)
            if check is not None:
                meta = check(meta, where)
            weights = _read(zf, "policy.pth", MAX_WEIGHTS_BYTES, where)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ConfigError(f"{where}: not a stable-baselines3 policy zip ({type(e).__name__}: {e})") from e
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: refuse, never fall back to full pickle
        raise ConfigError(f"{where}: policy.pth is not a plain tensor state dict ({type(e).__name__}: {e})") from e
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise ConfigError(f"{where}: policy.pth is not a mapping of parameter names to tensors")
    return meta, state


def build_policy(cls: type, observation_space: Any, action_space: Any, kwargs: dict[str, Any],
                 state: dict[str, torch.Tensor], where: str, device: str | torch.device) -> Any:
    """``cls(observation_space, action_space, lr_schedule, **kwargs)`` with the weights ``state`` loaded; weights
    that do not fit or hold NaN/inf are a :class:`ConfigError`."""
    try:
        policy = cls(observation_space, action_space, lambda _: 0.0, **kwargs)
        policy.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"{where}: the weights do not fit a {cls.__name__} with its options ({e})") from e
    if not all(torch.isfinite(v).all() for v in policy.state_dict().values() if v.is_floating_point()):
        raise ConfigError(f"{where}: the policy's weights hold NaN/inf")
    return policy.to(device)


def load_policy_zip(path: str | Path, device: str | torch.device = "cpu", what: str = "--policy") -> Any:
    """A :class:`TeacherWeightingPolicy` from a zip of ``metagate train-policy``, executing nothing of it.

    :param what: how errors name the file (the option it came from)
    :raises ConfigError: a missing, foreign, malformed or oversized zip, another policy class, weights
        that are not plain tensors or do not fit
    """
    from gymnasium import spaces

    from metagate.policies.sb3 import TeacherWeightingPolicy

    p, where = resolve_zip(path, what, "train one with `metagate train-policy --out ...`")
    meta, state = read_policy_zip(p, where, META_NAME, fallback=_legacy_meta, check=_check_meta)
    obs = spaces.Box(meta["observation_low"], meta["observation_high"], tuple(meta["observation_shape"]),
                     np.float32)
    act = spaces.Box(meta["action_low"], meta["action_high"], tuple(meta["action_shape"]), np.float32)
    return build_policy(TeacherWeightingPolicy, obs, act, meta["policy_kwargs"], state, where, device)
