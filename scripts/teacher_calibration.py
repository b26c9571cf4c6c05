"""The teachers' calibration before and after temperature scaling: a markdown table for the README.

For each setting, the project's teachers (trained once and cached, as ``metagate teachers`` does) are fitted
on the clean ``meta`` split exactly as a run fits them (:func:`metagate.calibration.calibrate_teachers`), then
scored on ``meta`` and on ``test``: NLL, ECE, accuracy and mean confidence at tau = 1, at HKD's fixed 1.5 and
at the fitted tau* (per teacher; the ensemble of the calibrated teachers at its own r). Sequence tasks are
scored per real token (teacher forcing). ::

    PYTHONPATH=. .venv/bin/python scripts/teacher_calibration.py                 # digits 0.4/0, g2p 0.2/0
    PYTHONPATH=. .venv/bin/python scripts/teacher_calibration.py "digits 0.4"    # one setting: "TASK NOISE [flags]"
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from metagate.calibration import calibrate_teachers, nll_ece, split_logits
from metagate.cli import build_parser
from metagate.cli_args import config_from_args
from metagate.run import load_task
from metagate.teachers.cache import default_cache_dir
from metagate.teachers.training import load_or_train_teachers

SETTINGS = ["digits 0.4", "digits 0", "g2p 0.2", "g2p 0"]
TAUS = ("1", "1.5", "tau*")


def scores(probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, float]:
    """NLL, ECE, accuracy, mean confidence of ``probs [M, C]`` against ``y``."""
    nll, ece = nll_ece(probs, y)
    conf, pred = probs.max(-1)
    return nll, ece, float((pred == y).double().mean()), float(conf.double().mean())


def setting_rows(setting: str) -> list[str]:
    task_name, noise, *flags = setting.split()
    args = build_parser().parse_args(["teachers", "--task", task_name, "--noise", noise, "--no-progress", *flags])
    cfg = config_from_args(args, gate="fixed")
    task = load_task(cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    modules, names, _ = load_or_train_teachers(task, cfg.teachers, cache, progress=False)
    lg_meta, y_meta = split_logits(modules, task.meta)
    cal = calibrate_teachers(lg_meta.double(), y_meta, names, extra_taus=(1.5,))
    rows = []
    for split, (lg, y) in (("meta", (lg_meta, y_meta)), ("test", split_logits(modules, task.test))):
        lg = lg.double()
        who = [*[(n, lg[:, k : k + 1], cal.taus[k], 1.0) for k, n in enumerate(names)],
               ("ensemble", lg, torch.tensor(cal.taus, dtype=torch.float64).view(1, -1, 1), cal.ensemble_tau)]
        for n, z, tk, r in who:
            cells = []
            for t in TAUS:
                p = torch.softmax(z / (tk * r) if t == "tau*" else z / float(t), -1).mean(1)
                nll, ece, acc, conf = scores(p, y)
                cells.append(f"{nll:.3f} / {ece:.3f}")
            tau_star = (f"{float(tk):.3g}" if n != "ensemble" else f"{cal.ensemble_tau:.3g} × τ_k")
            rows.append(f"| {task_name} {noise} | {split} | {n} | {tau_star} | {' | '.join(cells)} "
                        f"| {acc:.3f} | {conf:.3f} |")
    return rows


def main(argv: list[str]) -> int:
    t0 = time.time()
    print("| task noise | split | teacher | τ* | NLL / ECE at τ=1 | at τ=1.5 | at τ* | acc | mean conf at τ* |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting in argv or SETTINGS:
        for row in setting_rows(setting):
            print(row, flush=True)
    print(f"\n({time.time() - t0:.0f} s; τ* fitted by NLL on meta, per token on g2p; ECE: 15 bins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
