"""The files of a compare in ``--out DIR``: ``results.json``, ``results.csv``, ``results.md``.

* JSON: every row (one per gate spec x seed: metrics, timing, fingerprints, the full config, figure
  data), the summary (means, paired intervals, cost) and the teachers of each seed;
* CSV: one line per row with every scalar metric and the full config flattened (``config.train.lr``);
* markdown: the results table (what the terminal prints), the cost table and the teachers.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from metagate.compare.stats import mean_std
from metagate.compare.summary import MASS, PAIRED
from metagate.io import atomic_write_text

#: (metric, column title, scale, digits) of the results table
COLUMNS = (("test/acc", "test acc %", 100.0, 2), ("test/nll", "NLL", 1.0, 4), ("test/ece", "ECE", 1.0, 4),
           ("diag/auroc_teacher_share", "AUROC share/corrupted", 1.0, 3))


def _num(v: float, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{round(v, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00" for a rounding residue


def _pm(stat: dict[str, float], scale: float, digits: int) -> str:
    m, sd = stat["mean"] * scale, stat["std"] * scale
    return "-" if math.isnan(m) else f"{_num(m, digits)} ± {_num(sd, digits)}"


def _interval(entry: dict[str, Any] | None, metric: str, scale: float, digits: int) -> str:
    if not entry:
        return "-"
    iv = entry[metric][entry[metric]["shown"]]
    m, lo, hi = (iv[k] * scale for k in ("mean", "lo", "hi"))
    sign = "+" if m > 0 else ""
    if math.isnan(lo):
        return f"{sign}{_num(m, digits)}"
    return f"{sign}{_num(m, digits)} [{_num(lo, digits)}, {_num(hi, digits)}]"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(summary: dict[str, Any]) -> str:
    """Mean ± std per spec and the paired accuracy differences to ``fixed`` and to the best baseline."""
    fixed, best = summary["fixed"], summary["best_baseline"]
    level = "95%"
    oracles = [lb for lb, s in summary["gates"].items() if _kind(s) == "oracle"]
    header = ["gate", "kind", "seeds", *[c[1] for c in COLUMNS], "weight / unit",
              f"Δacc vs {fixed or 'fixed'} ({level} {summary['interval']})",
              f"Δacc vs best baseline {best or '-'} ({level})", "ΔNLL vs fixed", "ΔECE vs fixed",
              *[f"share of {o}'s gain" for o in oracles]]
    rows = []
    for label, s in summary["gates"].items():
        row = [f"`{label}`", _kind(s), str(len(s["seeds"]))]
        row += [_pm(s["metrics"][k], scale, d) for k, _, scale, d in COLUMNS]
        row.append(_pm(s["metrics"].get(MASS, {"mean": float("nan"), "std": float("nan")}), 1.0, 3))
        row.append(_interval(s.get("vs_fixed"), "test/acc", 100.0, 2))
        row.append(_interval(s.get("vs_best_baseline"), "test/acc", 100.0, 2))
        row.append(_interval(s.get("vs_fixed"), "test/nll", 1.0, 4))
        row.append(_interval(s.get("vs_fixed"), "test/ece", 1.0, 4))
        row += [_share(s.get("headroom", {}).get(o)) for o in oracles]
        rows.append(row)
    return markdown_table(header, rows)


def _kind(s: dict[str, Any]) -> str:
    return s.get("kind") or ("baseline" if s["baseline"] else "learned")


def _share(h: dict[str, float] | None) -> str:
    """``45%`` of the oracle's gain over fixed; ``-`` for a gate that is not learned or an oracle without gain."""
    if not h or math.isnan(h["share"]):
        return "-"
    return f"{100 * h['share']:.0f}%"


def headline(summary: dict[str, Any]) -> str:
    """One line per learned gate: its paired accuracy difference to the best baseline with the interval, and
    the share of each oracle's gain over ``fixed`` it captured -- the table's answer at a glance."""
    best = summary["best_baseline"]
    lines = []
    for label, s in summary["gates"].items():
        if _kind(s) != "learned":
            continue
        vs = (f"{_interval(s.get('vs_best_baseline'), 'test/acc', 100.0, 2)} acc points vs best baseline {best}"
              if best and s.get("vs_best_baseline") else "no baseline to compare with")
        room = [f"captured {_share(h)} of {o}'s {_num(100 * h['oracle_gain'], 2)}-point gain over {summary['fixed']}"
                if not math.isnan(h["share"]) else
                f"{o} shows no headroom ({_num(100 * h['oracle_gain'], 2)} points over {summary['fixed']}, "
                "interval reaching 0)" for o, h in s.get("headroom", {}).items()]
        lines.append("; ".join([f"{label}: {vs}", *room]))
    return "\n".join(lines)


#: (metric, column title, scale, digits) of the sequence table
SEQUENCE_COLUMNS = (("test/per", "PER %", 100.0, 2), ("test/wer", "WER %", 100.0, 2), ("test/ece", "token ECE", 1.0, 4),
                    ("test/sent_ece", "sentence ECE", 1.0, 4))


def _metric_table(summary: dict[str, Any], columns: tuple[tuple[str, str, float, int], ...],
                  unpaired: tuple[str, ...] = ()) -> str:
    """Each gate's mean ± std of ``columns`` and their paired differences to ``fixed`` (but for ``unpaired``);
    empty when no gate has the first column's metric (another kind of task)."""
    if not any(columns[0][0] in s["metrics"] for s in summary["gates"].values()):
        return ""
    paired = [c for c in columns if c[0] not in unpaired]
    rows = []
    for label, s in summary["gates"].items():
        row = [f"`{label}`", str(len(s["seeds"]))]
        row += [_pm(s["metrics"][k], scale, d) for k, _, scale, d in columns]
        row += [_interval(s.get("vs_fixed"), k, scale, d) for k, _, scale, d in paired]
        rows.append(row)
    fixed = summary["fixed"] or "fixed"
    header = ["gate", "seeds", *[c[1] for c in columns],
              *[f"Δ{c[1].replace(' %', '')} vs {fixed} (95%)" for c in paired]]
    return markdown_table(header, rows)


def sequence_table(summary: dict[str, Any]) -> str:
    """Sequence tasks: PER and WER of greedy decodings on test, token and sentence ECE, and their paired
    differences to ``fixed`` (WER's is not shown); empty for classification."""
    return _metric_table(summary, SEQUENCE_COLUMNS, unpaired=("test/wer",))


#: (metric, column title, scale, digits) of the language-modelling table
LANGUAGE_COLUMNS = (("test/ppl", "perplexity", 1.0, 2), ("test/nll", "token NLL", 1.0, 4),
                    ("test/acc", "token acc %", 100.0, 2), ("test/ece", "token ECE", 1.0, 4))


def language_table(summary: dict[str, Any]) -> str:
    """Language-modelling tasks: test perplexity, token NLL, accuracy and ECE (teacher forcing), and their paired
    differences to ``fixed``; empty for other tasks."""
    return _metric_table(summary, LANGUAGE_COLUMNS)


#: the token classes of the lm task (metagate.data.lm_classes), as the diagnostics name them
TOKEN_CLASSES = ("frequent", "rare", "code", "prose")


def _class_cell(ms: list[dict[str, Any]], key: str, scale: float, digits: int) -> str:
    mean, sd = mean_std([float(m[key]) for m in ms if key in m])
    return _pm({"mean": mean, "std": sd}, scale, digits)  # "-" when no seed has it


def token_class_table(rows: list[dict[str, Any]]) -> str:
    """Each gate's mean share of the KD weight per teacher and its label weight on frequent / rare / code / prose
    training tokens (mean ± std over seeds, from the runs' ``gate/share_{class}_t{k}`` and ``gate/w_label_{class}``),
    and a last row with how often each teacher's top-1 is the clean token on each class (``diag/right_*``, from the
    bank, one value per seed); empty when no row has token classes."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    names: list[str] = []
    right: dict[int, dict[str, Any]] = {}  # seed -> metrics holding the bank's per-class correctness
    for r in rows:
        m = r["metrics"]
        if "gate/w_label_frequent" not in m:
            continue
        by_label.setdefault(r["label"], []).append(m)
        if r.get("teachers") and not names:
            names = [t["name"] for t in r["teachers"]]
        if "diag/right_frequent_t0" in m:
            right.setdefault(r["seed"], m)
    if not by_label:
        return ""
    header = ["gate", "seeds", *[f"{n}: {c}" for n in names for c in TOKEN_CLASSES],
              *[f"label w: {c}" for c in TOKEN_CLASSES]]
    out = [[f"`{label}`", str(len(ms)),
            *[_class_cell(ms, f"gate/share_{c}_t{k}", 1.0, 3) for k in range(len(names)) for c in TOKEN_CLASSES],
            *[_class_cell(ms, f"gate/w_label_{c}", 1.0, 3) for c in TOKEN_CLASSES]] for label, ms in by_label.items()]
    if right:
        ms = list(right.values())
        out.append(["teacher top-1 right % (bank)", str(len(ms)),
                    *[_class_cell(ms, f"diag/right_{c}_t{k}", 100.0, 1) for k in range(len(names))
                      for c in TOKEN_CLASSES], *["-"] * len(TOKEN_CLASSES)])
    return markdown_table(header, out)


def cost_table(summary: dict[str, Any]) -> str:
    """Wall time per epoch and the per-step cost relative to ``fixed`` (paired by seed)."""
    rows = []
    for label, s in summary["gates"].items():
        t = s["time_per_epoch"]
        rows.append([f"`{label}`", _pm(t, 1.0, 3), str(s["steps_per_epoch"]),
                     "-" if math.isnan(s["step_cost_vs_fixed"]) else f"{s['step_cost_vs_fixed']:.2f}x"])
    return markdown_table(["gate", "s / epoch", "steps / epoch", f"step cost vs {summary['fixed'] or 'fixed'}"],
                          rows)


def teachers_table(teachers: dict[int, list[dict[str, Any]]]) -> str:
    """Accuracy, and the temperature fitted on ``meta`` with the meta NLL / ECE at τ = 1 and at the fitted τ."""
    nan = float("nan")
    rows = [[str(seed), t["name"], _num(100 * t.get("select_acc", nan), 2), _num(100 * t.get("test_acc", nan), 2),
             _num(t.get("tau", nan), 3), _num(t.get("meta_nll_tau1", nan), 3), _num(t.get("meta_ece_tau1", nan), 3),
             _num(t.get("meta_nll", nan), 3), _num(t.get("meta_ece", nan), 3)]
            for seed, ts in teachers.items() for t in ts]
    return markdown_table(["seed", "teacher", "select acc %", "test acc %", "τ fitted on meta", "meta NLL τ=1",
                           "meta ECE τ=1", "meta NLL τ fitted", "meta ECE τ fitted"], rows)


def tuning_table(rows: list[dict[str, Any]]) -> str:
    """The choice of every gate tuned on ``select`` (the full grid with its scores is in the JSON)."""
    out = [[f"`{r['label']}`", str(r["seed"]), str(len(r["tuning"]["grid"])),
            *(f"{r['tuning']['chosen'][k]:g}" for k in ("alpha", "tau", "lr")),
            _num(100 * r["metrics"]["select/acc"], 2)] for r in rows if "tuning" in r]
    return markdown_table(["gate", "seed", "grid points", "alpha", "tau", "lr", "select acc %"], out) if out else ""


TAU_KEYS = ("diag/tau_mean", "diag/tau_corrupted", "diag/tau_clean")


def temperature_table(rows: list[dict[str, Any]]) -> str:
    """The temperatures the temperature gates chose: the mean over training units of each unit's last one,
    on all, corrupted and clean units (mean ± std over seeds); empty when no row chose any."""
    by_label: dict[str, list[dict[str, float]]] = {}
    for r in rows:
        if "diag/tau_mean" in r["metrics"]:
            by_label.setdefault(r["label"], []).append(r["metrics"])
    out = []
    for label, ms in by_label.items():
        cells = []
        for k in TAU_KEYS:
            mean, sd = mean_std([float(r[k]) for r in ms if k in r])
            cells.append(_pm({"mean": mean, "std": sd}, 1.0, 2))  # "-" when no seed has it
        out.append([f"`{label}`", str(len(ms)), *cells])
    return markdown_table(["gate", "seeds", "τ all units", "τ corrupted", "τ clean"], out) if out else ""


def markdown(summary: dict[str, Any], teachers: dict[int, list[dict[str, Any]]], title: str,
             extra: str = "", rows: list[dict[str, Any]] | None = None) -> str:
    """The whole ``results.md``."""
    parts = [f"# {title}", "", "## Results", "",
             "Mean ± std over seeds; Δ: paired difference per seed (same data draw and teachers), mean "
             f"[{summary['interval']} 95% interval]. Best baseline: the non-learned gate with the best mean "
             "test accuracy (oracles, which read the recorded clean labels, are never one). Weight / unit: the mean "
             "total weight of a training unit (label + teachers; fixed: 1). Share of an oracle's gain: the learned "
             "gate's mean accuracy gain over fixed divided by the oracle's (- when the oracle's own gain is not "
             "significant: no headroom measured).", "", results_table(summary), ""]
    lines = headline(summary)
    if lines:
        parts += [lines.replace("\n", "  \n"), ""]
    sequences = sequence_table(summary)
    if sequences:
        parts += ["## Sequences", "", "Token accuracy, NLL and token ECE above are under teacher forcing; PER and "
                  "WER are of greedy decodings (closest reference pronunciation).", "", sequences, ""]
    language = language_table(summary)
    if language:
        parts += ["## Language modelling", "", "Test perplexity = exp(token NLL), under teacher forcing.", "",
                  language, ""]
    classes = token_class_table(rows or [])
    if classes:
        parts += ["## Teacher shares by token class", "",
                  "Each teacher's share of the KD weight, w_k / sum_j w_j, and the label weight w_0 (label w), "
                  "averaged over the training tokens of a class by the weights last used for each token (mean ± std "
                  "over seeds). Frequent: the most frequent token types that together cover half of the training "
                  "targets; rare: the rest. Code: tokens on a code line of the documentation (a >>> prompt, a "
                  "literal block or a grammar rule); prose: the rest. The last row: how often each teacher's top-1 "
                  "is the clean token on that class, from the bank, so a reader sees whether the shares follow who "
                  "is right.", "", classes, ""]
    parts += ["## Cost", "", cost_table(summary), ""]
    tuning = tuning_table(rows or [])
    if tuning:
        parts += ["## Tuned on select", "", tuning, ""]
    temperatures = temperature_table(rows or [])
    if temperatures:
        parts += ["## Temperatures chosen", "", temperatures, ""]
    if any(teachers.values()):
        parts += ["## Teachers", "", teachers_table(teachers), ""]
    if extra:
        parts += [extra, ""]
    return "\n".join(parts)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def csv_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One flat dict per row: label, gate, seed, options, every scalar metric, timing, fingerprints, config."""
    flat = []
    for r in rows:
        f: dict[str, Any] = {"label": r["label"], "gate": r["gate"], "seed": r["seed"],
                             "options": json.dumps(r["options"], sort_keys=True)}
        f.update({k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        f.update(flatten(r["time"], "time."))
        f.update(flatten(r["fingerprints"], "fingerprint."))
        f.update(flatten(r["config"], "config."))
        flat.append(f)
    first = ["label", "gate", "seed", "options"]
    metric_keys = sorted({k for f in flat for k in f if "/" in k}, key=lambda k: (k not in PAIRED, k))
    rest = sorted({k for f in flat for k in f} - set(first) - set(metric_keys))
    return first + metric_keys + rest, flat


def write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any],
                  teachers: dict[int, list[dict[str, Any]]], title: str, extra: dict[str, Any] | None = None,
                  extra_md: str = "") -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    blob = {"title": title, "summary": summary, "teachers": {str(k): v for k, v in teachers.items()},
            "rows": rows, **(extra or {})}
    atomic_write_text(paths["json"], json.dumps(blob, indent=2))
    header, flat = csv_rows(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, restval="")
    w.writeheader()
    w.writerows(flat)
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["md"], markdown(summary, teachers, title, extra_md, rows))
    return paths
