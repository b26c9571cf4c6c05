"""Copy the compare tables that ``scripts/reproduce.sh`` wrote into the README, between its markers.

Each ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` block of README.md is replaced by the title, the
results table, the "Sequences" and "Temperatures chosen" tables (when there are) and the machine line of
``runs/reproduce/NAME/results.md``. Run after ``scripts/reproduce.sh``::

    .venv/bin/python scripts/readme_tables.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(md: str, heading: str) -> str:
    """The body of ``## heading`` in a results.md ('' if absent)."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", md, flags=re.M | re.S)
    return m.group(1).strip() if m else ""


def block(name: str) -> str:
    md = (ROOT / "runs" / "reproduce" / name / "results.md").read_text()
    title = md.splitlines()[0].lstrip("# ").strip()
    made = next((line for line in md.splitlines() if line.startswith("Made by")), "")
    parts = [f"**{title}**", "", section(md, "Results")]
    if section(md, "Sequences"):
        parts += ["", "Sequences (PER/WER of greedy decodings on test; Δ paired to fixed):", "", section(md, "Sequences")]
    if section(md, "Language modelling"):
        parts += ["", "Language modelling (test perplexity and token calibration; Δ paired to fixed):", "",
                  section(md, "Language modelling")]
    if section(md, "Teacher shares by token class"):
        parts += ["", "Teacher shares by token class (mean ± std over seeds):", "",
                  section(md, "Teacher shares by token class")]
    if section(md, "Temperatures chosen"):
        parts += ["", "Temperatures chosen (mean of each training unit's last τ):", "", section(md, "Temperatures chosen")]
    parts += ["", made]
    return "\n".join(parts)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    names = re.findall(r"<!-- results:([\w-]+) -->", text)
    for name in names:
        if not (ROOT / "runs" / "reproduce" / name / "results.md").is_file():
            print(f"skip {name}: runs/reproduce/{name}/results.md not found (run scripts/reproduce.sh)")
            continue
        # an empty block has a single newline between its markers
        text = re.sub(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)",
                      lambda m, n=name: m.group(1) + block(n) + "\n" + m.group(2), text, flags=re.S)
        print(f"README: {name} table updated")
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
