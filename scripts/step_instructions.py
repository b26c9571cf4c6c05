"""Instructions per trainer step of one gate, counted by callgrind: a speed figure that other load cannot move.

Wall-clock ratios (``metagate bench``) need a quiet machine; instruction counts do not. Run under valgrind with
instrumentation off until the steps (this script switches it on and off around them)::

    PYTHONHASHSEED=0 OMP_NUM_THREADS=1 valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/tmp/cg.out .venv/bin/python scripts/step_instructions.py meta fashion 20

and read ``Collected : N`` (instructions over the 20 steps). Specs are ``metagate bench --gates`` specs, or
``hand`` for the hand-written KD step. The set-up is :func:`metagate.bench.bench_student`'s (random teacher
logits, the ``mlp`` student, batch 128, 3 teachers), so two checkouts run the same steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import torch

import metagate.bench as mb


def main(spec: str, task: str, steps: int) -> None:
    torch.set_num_threads(1)
    want = "hand-written KD" if spec == "hand" else f"trainer + {spec}"

    def only_the_wanted_steps(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
        toggle = ["callgrind_control", "-i"]
        subprocess.run([*toggle, "on", str(os.getpid())], check=True, capture_output=True)
        runs[want]()
        subprocess.run([*toggle, "off", str(os.getpid())], check=True, capture_output=True)
        return {name: float("nan") for name in runs}

    mb.interleaved_medians = only_the_wanted_steps  # bench_student's timing loop, replaced by one counted pass
    mb.bench_student(task, "mlp", 3, 128, steps, 1, torch.device("cpu"),
                     gates=() if spec in ("hand", "fixed") else (spec,))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: step_instructions.py SPEC TASK STEPS   (under valgrind --tool=callgrind; see the docstring)")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
