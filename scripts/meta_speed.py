"""Speed of the meta gate's backends, per step, relative to the ``fixed`` gate's step.

All variants run in one process, interleaved, through the shared trainer's ``train_step``,
on the same student architecture (same initial weights), the same batches and the same
(random, right-shaped) teacher logits; a meta look-ahead every step; the order of the variants
rotates from round to round. Reported: median
ms/step over ``--repeats`` rounds, the ratio to ``fixed``, and the peak extra resident
memory of ``--mem-steps`` steps of each variant measured in a fresh subprocess
(peak RSS ``VmHWM`` during the steps, reset via ``/proc/self/clear_refs``, minus the RSS
after setup and warm-up; CPU only).

    python scripts/meta_speed.py --task fashion --students mlp cnn
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from functools import partial

import torch

VARIANTS = {
    "fixed": ("fixed", {"alpha": 0.1, "tau": 4.0}),
    "meta func (all)": ("meta", {"meta_backend": "func", "meta_lookahead": "all"}),
    "meta func (last)": ("meta", {"meta_backend": "func", "meta_lookahead": "last"}),
    "meta func (all, difference)": ("meta", {"meta_backend": "func", "meta_lookahead": "all",
                                             "meta_product": "difference"}),
    "meta func (all, no reuse)": ("meta", {"meta_backend": "func", "meta_lookahead": "all", "meta_no_reuse": True}),
    "meta higher (all)": ("meta", {"meta_backend": "higher", "meta_lookahead": "all"}),
    "meta closed-form": ("meta", {"meta_backend": "closed-form"}),
    "meta func (last, val 64)": ("meta", {"meta_backend": "func", "meta_lookahead": "last", "meta_val_batch": 64}),
    "meta closed-form (val 64)": ("meta", {"meta_backend": "closed-form", "meta_val_batch": 64}),
}


def build(task_name: str, arch: str, k: int, batch_size: int, steps: int, variants: list[str]):
    from metagate.data import Batch, get_task
    from metagate.run import build_gate
    from metagate.teachers.bank import TeacherBank
    from metagate.trainer import TrainConfig, Trainer

    task = get_task(task_name)
    torch.manual_seed(0)
    n, c = len(task.train), task.num_classes
    bank = TeacherBank(torch.randn(n, k, c) * 3, [f"t{j}" for j in range(k)])
    init = task.make_student(arch)
    cfg = TrainConfig(epochs=1000, batch_size=batch_size, lr=0.05, device="cpu", progress=False)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        batches.append(Batch(task.train.x[idx], task.train.y[idx], idx))
    steps_fns = {}
    for name in variants:
        gate_name, opts = VARIANTS[name]
        tr = Trainer(task, copy.deepcopy(init), build_gate(gate_name, opts), bank, cfg)
        steps_fns[name] = tr.train_step
    return steps_fns, batches


def time_all(args: argparse.Namespace, arch: str) -> dict[str, float]:
    from metagate.bench import interleaved_medians, time_steps

    fns, batches = build(args.task, arch, args.teachers, args.batch_size, args.steps, args.variants)
    for fn in fns.values():  # warm-up
        for b in batches[:5]:
            fn(b)
    return interleaved_medians({name: partial(time_steps, fn, batches, torch.device("cpu")) for name, fn in fns.items()},
                               args.repeats)


def peak_memory_child(args: argparse.Namespace) -> None:
    fns, batches = build(args.task, args.student_one, args.teachers, args.batch_size, args.mem_steps, [args.variant])
    fn = fns[args.variant]
    for b in batches[:3]:
        fn(b)
    try:  # reset the kernel's peak-RSS counter (Linux >= 4.0) so setup's peak does not mask the steps'
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _proc_kb("VmRSS")
    for b in batches:
        fn(b)
    peak = _proc_kb("VmHWM")
    print(json.dumps({"extra_mb": (peak - base) / 1024, "peak_mb": peak / 1024}))


def _proc_kb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_memory(args: argparse.Namespace, arch: str, variant: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--student-one", arch, "--variant", variant, "--task", args.task,
           "--teachers", str(args.teachers), "--batch-size", str(args.batch_size), "--mem-steps", str(args.mem_steps),
           "--threads", str(args.threads)]
    # fixed mmap threshold: big tensors are mmapped and returned on free, so RSS tracks live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="fashion")
    p.add_argument("--students", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per timing round")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--mem-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants to time (fixed is always included)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--student-one", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fixed", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.variants = ["fixed"] + [v for v in args.variants if v != "fixed"]
    torch.set_num_threads(args.threads)
    if args.child:
        peak_memory_child(args)
        return
    from metagate.report import table

    results: dict[str, dict[str, dict[str, float]]] = {}
    rows = []
    for arch in args.students:
        t = time_all(args, arch)
        results[arch] = {}
        for name, sec in t.items():
            mem = peak_memory(args, arch, name)
            results[arch][name] = {"ms": sec * 1e3, "ratio": sec / t["fixed"], **mem}
            rows.append([arch, name, f"{sec * 1e3:.2f}", f"{sec / t['fixed']:.2f}x", f"{mem['extra_mb']:.1f}"])
        print(f"done {arch}", file=sys.stderr, flush=True)
    print(f"task {args.task}, K={args.teachers}, batch {args.batch_size}, {args.steps} steps x {args.repeats} "
          f"interleaved rounds (median), CPU, torch threads {args.threads}; meta look-ahead every step")
    print(table(["student", "variant", "ms/step", "vs fixed", "peak extra RSS MB"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
