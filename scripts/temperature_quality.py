"""Evidence for issue #14: the temperature gates against fixed KD, tuned and untuned, on noisy and clean labels.

For every noise rate, over the training seeds (data split and teachers: ``--data-seed``, shared by all rows),
each row is a gate spec (``name`` or ``name:option=value,...`` as in ``metagate compare``):

* ``fixed:tau=4``; ``fixed-tuned:...``: ``fixed`` at the grid point with the best ``select`` accuracy (ties:
  lower ``select`` NLL, the rule of ``metagate compare``), tuned per seed; the reference of the differences;
* ``ctkd`` (global) and ``ctkd:ctkd_variant=instance``;
* ``temperature`` (in-loop REINFORCE, the episode reward) and ``temperature:temp_reward=redistributed``
  (ITKD's reward redistribution);
* ``temperature:temp_policy=PPO``: a PPO policy trained once per noise rate with ``metagate train-policy
  --env temperature`` on that data (agent seed 0, ``--policy-timesteps`` env steps) and deployed in every seed.

Printed per noise rate: test accuracy, NLL and ECE (mean ± std over seeds), the paired difference to
``fixed-tuned`` with a 95% Student-t interval, the mean temperature each row chose on corrupted vs clean
training units (their last temperature; constant rows: their temperature) and the tuned temperatures. Every
finished run is kept in ``--out``/runs.jsonl: a rerun continues where it stopped.

    .venv/bin/python scripts/temperature_quality.py --task fashion --noises 0.4 0 --seeds 0 1 2 3 4
    .venv/bin/python scripts/temperature_quality.py --task digits --noises 0.4 --seeds 0 --epochs 2 \\
        --policy-timesteps 200 --out runs/tq-check     # the end-to-end check (a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metagate.bench import parse_gate_spec
from metagate.gates import gate_config
from metagate.gates.tuned import FixedTunedConfig
from metagate.run import DistillConfig, build_gate, load_task
from metagate.teachers.build import load_teachers
from metagate.trainer import TrainConfig, Trainer, seed_everything

ROWS = ["fixed:tau=4", "fixed-tuned:alpha_grid=0.5/,tau_grid=1/2/4/8,lr_scales=1/", "ctkd",
        "ctkd:ctkd_variant=instance", "temperature", "temperature:temp_reward=redistributed",
        "temperature:temp_policy=PPO"]
PPO = "PPO"  # placeholder of a spec's temp_policy: the policy this script trains
T95 = {1: float("nan"), 2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306,
       10: 2.262}  # Student t, two-sided 95%, by number of seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="digits")
    p.add_argument("--noises", type=float, nargs="+", default=[0.4, 0.0], help="label-noise rates (symmetric)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    p.add_argument("--data-seed", type=int, default=0, help="the data split, noise draw and teachers of every seed")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--gates", nargs="+", default=ROWS, help="gate specs, one row each (the first fixed-tuned "
                                                            "row is the reference of the differences)")
    p.add_argument("--policy-timesteps", type=int, default=20000,
                   help="env steps of the PPO temperature policy (one student update each; fashion: ~7 ms each on one "
                        "busy core, 20000 in 2-4 min)")
    p.add_argument("--temp-policy", default=None, help="deploy this zip for the PPO row instead of training one")
    p.add_argument("--cache-dir", default=None, help="teacher cache (default: $METAGATE_CACHE or ~/.cache/metagate)")
    p.add_argument("--out", default="runs/temperature-quality", help="results (runs.jsonl), PPO zips")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p.parse_args(argv)


def train_ppo(a: argparse.Namespace, task: Any, bank: Any, noise: float, out: Path) -> Path:
    """A temperature policy from ``metagate train-policy --env temperature`` on this data (reused if saved)."""
    from metagate.cli import build_parser
    from metagate.envs import InstanceTemperatureEnv
    from metagate.train_policy import env_config_from_args, train_policy

    if a.temp_policy:
        return Path(a.temp_policy)
    zip_path = out / f"temp-ppo-{a.task}-n{noise:g}-d{a.data_seed}-t{a.policy_timesteps}.zip"
    if zip_path.is_file():
        return zip_path
    argv = ["train-policy", "--env", "temperature", "--task", a.task, "--noise", str(noise), "--data-seed",
            str(a.data_seed), "--timesteps", str(a.policy_timesteps), "--seed", "0", "--out", str(zip_path)]
    print("  training the PPO temperature policy: metagate " + " ".join(argv), flush=True)
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    train_policy(args, env=InstanceTemperatureEnv(task, bank, config=env_config_from_args(args)))
    print(f"  ... {time.perf_counter() - t0:.0f} s -> {zip_path}", flush=True)
    return zip_path


def fit(task: Any, bank: Any, gate_name: str, opts: dict[str, Any], seed: int, epochs: int,
        lr: float | None = None) -> dict[str, Any]:
    """One run: final metrics and the mean temperature on corrupted / clean training units."""
    seed_everything(seed)
    gate = build_gate(gate_name, opts)
    train = TrainConfig(epochs=epochs, seed=seed, device="cpu", progress=False, eval_test_every_epoch=False,
                        **({} if lr is None else {"lr": lr}))
    t0 = time.perf_counter()
    m = Trainer(task, task.make_student(), gate, bank, train).fit()
    log = getattr(gate, "_log", None)
    if log is not None and bool((~torch.isnan(log.unit_tau)).any()):
        tau = log.unit_tau.float().cpu()
    else:
        tau = torch.full((len(task.train),), float(getattr(gate, "tau", float("nan"))))
    c = task.corrupted.cpu()
    seen = ~torch.isnan(tau)

    def mean(sel: torch.Tensor) -> float:
        return float(tau[sel & seen].mean()) if bool((sel & seen).any()) else float("nan")

    return {"metrics": {k: float(v) for k, v in m.items() if k.startswith(("test/", "select/"))},
            "tau_corrupted": mean(c), "tau_clean": mean(~c), "tau_all": mean(torch.ones_like(c)),
            "seconds": time.perf_counter() - t0}


def fixed_label(alpha: float, tau: float, lr: float) -> str:
    """The key of a ``fixed`` run in runs.jsonl (a fixed row and a grid point with the same values share it)."""
    return f"fixed:alpha={alpha:g},tau={tau:g},lr={lr:g}"


def tuned(task: Any, bank: Any, opts: dict[str, Any], seed: int, epochs: int, done: Any) -> dict[str, Any]:
    """``fixed-tuned``: every grid point as ``fixed``; the best ``select`` accuracy (ties: lower NLL) wins."""
    cfg = FixedTunedConfig(**opts)
    scored = []
    for p in cfg.grid(TrainConfig.lr):
        row = done(fixed_label(p["alpha"], p["tau"], p["lr"]), seed,
                   lambda p=p: fit(task, bank, "fixed", {"alpha": p["alpha"], "tau": p["tau"]}, seed, epochs,
                                   lr=p["lr"]))
        scored.append((row["metrics"]["select/acc"], -row["metrics"]["select/nll"], len(scored), p, row))
    best = max(scored, key=lambda t: t[:3])
    return {**best[4], "chosen": best[3]}


def parse_rows(texts: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, gate, options)`` of each spec, checked before anything runs (``PPO`` stands for a zip)."""
    rows = []
    for text in texts:
        name, opts = parse_gate_spec(text)
        gate_config(name, {k: v for k, v in opts.items() if v != PPO})  # unknown gate or option: fail now
        rows.append((text.replace(" ", ""), name, opts))
    return rows


def stats(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = parse_rows(a.gates)
    ref = next((label for label, gate, _ in specs if gate == "fixed-tuned"), specs[0][0])
    log_path = out / "runs.jsonl"
    cache: dict[str, dict[str, Any]] = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            cache[rec["key"]] = rec["result"]
    print(f"{a.task}: noise {a.noises}, seeds {a.seeds}, data seed {a.data_seed}, {a.epochs} epochs; "
          f"results in {log_path}", flush=True)
    for noise in a.noises:
        cfg = DistillConfig(task=a.task, noise=noise, data_seed=a.data_seed, cache_dir=a.cache_dir,
                            train=TrainConfig(device="cpu", progress=False))
        task = load_task(cfg)
        bank, _ = load_teachers(cfg, task, progress=False)
        zip_path = train_ppo(a, task, bank, noise, out) if any(o.get("temp_policy") == PPO
                                                                for _, _, o in specs) else None

        def done(label: str, seed: int, run: Any, noise: float = noise) -> dict[str, Any]:
            key = json.dumps([a.task, noise, a.data_seed, a.epochs, label, seed])
            if key not in cache:
                cache[key] = run()
                with log_path.open("a") as f:
                    f.write(json.dumps({"key": key, "result": cache[key]}) + "\n")
                m = cache[key]["metrics"]
                print(f"  n={noise:g} seed {seed} {label}: acc {m['test/acc']:.4f} nll {m['test/nll']:.4f} "
                      f"({cache[key]['seconds']:.0f} s)", flush=True)
            return cache[key]

        res: dict[str, list[dict[str, Any]]] = {}
        for text, gate, options in specs:
            opts = {k: (str(zip_path) if v == PPO else v) for k, v in options.items()}
            key = text.replace(PPO, zip_path.name) if zip_path is not None else text
            if gate == "fixed" and set(opts) <= {"alpha", "tau"}:  # the same run as that point of a tuning grid
                key = fixed_label(opts.get("alpha", 0.5), opts.get("tau", 4.0), TrainConfig.lr)
            res[text] = []
            for seed in a.seeds:
                if gate == "fixed-tuned":
                    res[text].append(tuned(task, bank, opts, seed, a.epochs, done))
                else:
                    res[text].append(done(key, seed, lambda gate=gate, opts=opts, seed=seed, task=task, bank=bank:
                                          fit(task, bank, gate, opts, seed, a.epochs)))
        report(a, noise, res, ref)


def report(a: argparse.Namespace, noise: float, res: dict[str, list[dict[str, Any]]], ref: str) -> None:
    n = len(a.seeds)
    print(f"\n{a.task}, {noise:g} symmetric noise, {n} seeds, {a.epochs} epochs; differences: row minus {ref} "
          f"(paired by seed, 95% t interval)")
    width = max(len(k) for k in res)
    for metric in ("acc", "nll", "ece"):
        base = [r["metrics"][f"test/{metric}"] for r in res[ref]]
        for k, rows in res.items():
            v = [r["metrics"][f"test/{metric}"] for r in rows]
            mean, sd = stats(v)
            dm, dsd = stats([x - y for x, y in zip(v, base)])
            half = T95.get(n, 2.0) * dsd / math.sqrt(n)
            diff = "(reference)" if k == ref else f"{dm:+.4f} [{dm - half:+.4f}, {dm + half:+.4f}]"
            print(f"  {metric:4s} {k:{width}s}  {mean:.4f} ± {sd:.4f}   {diff}")
    print("  mean temperature chosen (last one of each training unit), corrupted vs clean units:")
    for k, rows in res.items():
        c = stats([r["tau_corrupted"] for r in rows])[0]
        cl = stats([r["tau_clean"] for r in rows])[0]
        print(f"  tau  {k:{width}s}  corrupted {c:.2f}  clean {cl:.2f}  all {stats([r['tau_all'] for r in rows])[0]:.2f}")
    for k, rows in res.items():
        if rows and "chosen" in rows[0]:
            print(f"  {k}: tuned on select per seed: " + ", ".join(
                f"seed {s}: tau {r['chosen']['tau']:g}" for s, r in zip(a.seeds, rows)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
