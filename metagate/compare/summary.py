"""Rows (one per gate spec x seed) -> one summary per spec: mean ± std, paired differences, cost."""

from __future__ import annotations

import math
from typing import Any

from metagate.compare.stats import mean_std, paired, paired_bootstrap, paired_t

#: metrics summarised (mean ± std over seeds)
METRICS = ("test/acc", "test/nll", "test/ece", "test/mce", "test/brier", "select/acc",
           "diag/auroc_teacher_share", "diag/teacher_choice_gain")
#: metrics given paired differences against the references
PAIRED = ("test/acc", "test/nll", "test/ece")
#: sequence tasks' metrics (PER/WER of greedy decodings, sentence-level ECE), summarised and paired when present
SEQUENCE = ("test/per", "test/wer", "test/sent_ece")
#: language-modelling tasks' metrics (test perplexity), summarised and paired when present
LANGUAGE = ("test/ppl",)


#: what each row's weights add up to: ``gate/mass`` = mean over training units of the unit's total weight
#: (label + teachers), from the run's ``gate/mean_w_*`` diagnostics
MASS = "gate/mass"


def row_mass(metrics: dict[str, Any]) -> float:
    """Mean total weight per training unit, ``mean_i sum_j w_ij`` = the sum of the column means ``gate/mean_w_*``
    (the weights last used for each unit); NaN when the run recorded none."""
    cols = [float(v) for k, v in metrics.items() if k.startswith("gate/mean_w_")]
    return math.fsum(cols) if cols else float("nan")


def kind_of(gate: str, baseline: bool) -> str:
    """``oracle`` (reads the recorded truth: shown, never the best baseline), ``baseline`` or ``learned``."""
    from metagate.gates import GATES

    if getattr(GATES.get(gate), "oracle", False):
        return "oracle"
    return "baseline" if baseline else "learned"


def by_label(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by spec label (first-seen order), each group sorted by seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["label"], []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def reference_labels(groups: dict[str, list[dict[str, Any]]], baselines: dict[str, bool]) -> tuple[str | None,
                                                                                                     str | None]:
    """``(fixed, best baseline)``: the first plain ``fixed`` spec, and the baseline spec with the best mean
    test accuracy (the strongest rule a learned gate must beat; chosen on test, so it favours the baseline)."""
    fixed = next((lb for lb, rs in groups.items() if lb == "fixed"), None) or \
        next((lb for lb, rs in groups.items() if rs[0]["gate"] == "fixed"), None)
    scored = [(mean_std(_values(rs, "test/acc"))[0], lb) for lb, rs in groups.items()
              if baselines.get(lb) and kind_of(rs[0]["gate"], True) != "oracle"]
    scored = [(m, lb) for m, lb in scored if not math.isnan(m)]
    best = max(scored, key=lambda t: t[0])[1] if scored else None
    return fixed, best


def _values(rs: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r["metrics"].get(key, float("nan"))) for r in rs]


def _paired_on_seeds(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str, method: str,
                     samples: int) -> dict[str, Any]:
    common = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
    va = [float(next(r for r in a if r["seed"] == s)["metrics"].get(key, float("nan"))) for s in common]
    vb = [float(next(r for r in b if r["seed"] == s)["metrics"].get(key, float("nan"))) for s in common]
    return {"t": paired_t(va, vb).as_dict(), "bootstrap": paired_bootstrap(va, vb, samples=samples).as_dict(),
            "shown": paired(va, vb, method, samples=samples).method}


def summarise(rows: list[dict[str, Any]], baselines: dict[str, bool], method: str = "t",
              samples: int = 10_000) -> dict[str, Any]:
    """The compare's summary.

    :param baselines: label -> whether that spec is a non-learned baseline
    :param method: the interval shown in the tables (``t`` or ``bootstrap``; the JSON has both)
    :return: ``{"fixed", "best_baseline", "interval", "gates": {label: {...}}}``
    """
    groups = by_label(rows)
    fixed, best = reference_labels(groups, baselines)
    fixed_time = {r["seed"]: r["time"]["per_epoch"] for r in groups.get(fixed, [])} if fixed else {}
    seq = SEQUENCE if any("test/per" in r["metrics"] for r in rows) else ()
    seq += LANGUAGE if any("test/ppl" in r["metrics"] for r in rows) else ()
    gates: dict[str, Any] = {}
    for label, rs in groups.items():
        kind = kind_of(rs[0]["gate"], bool(baselines.get(label)))
        s: dict[str, Any] = {"gate": rs[0]["gate"], "baseline": kind == "baseline", "kind": kind,
                             "seeds": [r["seed"] for r in rs], "options": rs[0]["options"], "metrics": {}}
        for k in (*METRICS, *seq):
            m, sd = mean_std(_values(rs, k))
            s["metrics"][k] = {"mean": m, "std": sd}
        m, sd = mean_std([row_mass(r["metrics"]) for r in rs])
        s["metrics"][MASS] = {"mean": m, "std": sd}
        for name, ref in (("vs_fixed", fixed), ("vs_best_baseline", best)):
            if ref is not None and ref != label:
                s[name] = {"reference": ref, **{k: _paired_on_seeds(rs, groups[ref], k, method, samples)
                                                for k in (*PAIRED, *seq)}}
        per_epoch = [r["time"]["per_epoch"] for r in rs]
        s["time_per_epoch"] = dict(zip(("mean", "std"), mean_std(per_epoch)))
        s["steps_per_epoch"] = rs[0]["time"]["steps_per_epoch"]
        ratios = [r["time"]["per_epoch"] / fixed_time[r["seed"]] for r in rs
                  if fixed_time.get(r["seed"], 0) > 0]  # paired by seed: same data, same machine load
        s["step_cost_vs_fixed"] = mean_std(ratios)[0] if ratios else float("nan")
        gates[label] = s
    for s in gates.values():
        s["headroom"] = headroom(s, gates) if s["kind"] == "learned" else {}
    return {"fixed": fixed, "best_baseline": best, "interval": method, "gates": gates}


def headroom(s: dict[str, Any], gates: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per oracle row: its paired accuracy gain over ``fixed``, this gate's, and the share of the oracle's gain
    the gate captures (``gain / oracle_gain``). The share is NaN when the oracle shows no headroom: its gain is
    not above 0, or its 95% interval (the t interval; with one seed, none) reaches 0 -- a ratio to a gain
    indistinguishable from noise would mean nothing."""
    gain, _ = _fixed_gain(s)
    out = {}
    for label, o in gates.items():
        if o["kind"] != "oracle":
            continue
        og, lo = _fixed_gain(o)
        room = og > 0 and (math.isnan(lo) or lo > 0)
        out[label] = {"oracle_gain": og, "oracle_gain_lo": lo, "gain": gain,
                      "share": gain / og if room and not math.isnan(gain) else float("nan")}
    return out


def _fixed_gain(s: dict[str, Any]) -> tuple[float, float]:
    """The paired mean test-accuracy gain over ``fixed`` and its interval's lower end (NaN without ``fixed``)."""
    vf = s.get("vs_fixed")
    if not vf:
        return float("nan"), float("nan")
    t = vf["test/acc"]["t"]
    return float(t["mean"]), float(t["lo"])
