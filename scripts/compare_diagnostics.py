"""Numbers a compare's ``results.md`` does not print, from its ``results.json``: paired differences between any
two rows, and per row what the gate did (how often the label branch fired) against the student's confidence.

::

    PYTHONPATH=. .venv/bin/python scripts/compare_diagnostics.py runs/reproduce/digits \\
        --pair 'meta:meta_param=net' 'fixed-tuned:tau_grid=1/2/4/8,lr_scales=1/2/3'

Per row (mean ± std over seeds): test accuracy, ECE, the student's mean confidence on test (from the
reliability bins: per token on sequence tasks, teacher forcing), confidence minus accuracy (> 0: over-confident),
``gate/mean_w_label`` (for ``hard``: the share of units on the label branch, the student not more confident than
the teachers' gauge) and ``gate/teacher_share``. Paired: per seed ``a - b``, mean [t 95% interval].
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from scipy import stats


def mean_std(v: list[float]) -> str:
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return f"{m:.4f} ± {s:.4f}"


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    n = len(d)
    m = sum(d) / n
    if n < 2:
        return f"{m:+.4f} (1 seed)"
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    h = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}] (n={n})"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a compare's --out directory")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="row labels: print A - B per metric, paired by seed")
    ap.add_argument("--metrics", nargs="+", default=["test/acc", "test/ece", "test/nll", "test/per", "test/sent_ece"])
    args = ap.parse_args(argv)
    res = json.loads((args.out / "results.json").read_text())
    by: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in res["rows"]:
        m, seed = r["metrics"], int(r["seed"])
        for k, v in m.items():
            if isinstance(v, (int, float)):
                by[r["label"]][k][seed] = float(v)
        cal = r.get("calibration")
        if cal:
            n = sum(cal["count"])
            conf = sum(c * w for c, w in zip(cal["confidence"], cal["count"])) / n
            acc = sum(a * w for a, w in zip(cal["accuracy"], cal["count"])) / n
            by[r["label"]]["conf"][seed], by[r["label"]]["conf_minus_acc"][seed] = conf, conf - acc
    print("| row | seeds | test acc | ECE | mean confidence | confidence − accuracy | gate/mean_w_label | teacher share "
          "| sentence ECE | sentence confidence |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, m in by.items():
        cells = [mean_std(list(m[k].values())) if m.get(k) else "-"
                 for k in ("test/acc", "test/ece", "conf", "conf_minus_acc", "gate/mean_w_label", "gate/teacher_share",
                           "test/sent_ece", "test/sent_conf")]
        print(f"| `{label}` | {len(m['test/acc'])} | " + " | ".join(cells) + " |")
    for a, b in args.pair:
        for lab in (a, b):
            if lab not in by:
                raise SystemExit(f"no row {lab!r} in {args.out}/results.json; rows: {', '.join(by)}")
        print(f"\n{a} − {b}:")
        for k in args.metrics:
            if by[a].get(k) and by[b].get(k):
                print(f"  {k}: {paired(by[a][k], by[b][k])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
