"""``GatedKDTrainer`` runs for the data-parallel tests: under ``torch.distributed.run --nproc_per_node 2``
(gloo) with 2 sequences per process, or alone with 4; the global batches are the same (sequential order).

``argv``: the output path, the per-process batch, then optionally the gates (comma-separated, default
``fixed``). ``fixed``: rank 0 writes the per-step losses, the gate's logged numbers and the final parameters
to the output path. A learned gate (``meta``, ``reinforce``, ``ctkd``, ``temperature``): every rank writes
``<out>.<gate>.rank<r>`` with the student's and the gate's parameters before and after training."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hf_models import tiny_gpt2, tiny_llama, token_sequences  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from metagate.gates import get_gate_class  # noqa: E402
from metagate.gates.base import Gate  # noqa: E402
from metagate.gates.registry import gate_config  # noqa: E402
from metagate.hf import GatedKDTrainer  # noqa: E402
from metagate.hf.trainer import causal_lm_collator  # noqa: E402

V = 50


class Items(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return {"input_ids": self.seqs[i]}


class Sequential(GatedKDTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


#: the learned gates' options (small: a few steps must move them)
LEARNED = {"meta": {"meta_param": "net", "meta_lr": 1e-2}, "reinforce": {"rl_episode": 1, "alpha": 0.3},
           "ctkd": {"ctkd_curriculum_epochs": 0}, "temperature": {"rl_episode": 1, "temp_hidden": 8}}


def _gate_params(tr) -> list[torch.Tensor]:
    return [p.detach().clone() for p in list(tr.gate.parameters()) + list(tr.gate.student_parameters())]


def main(out: str, per_device: int, gate: str = "fixed") -> None:
    torch.set_num_threads(1)
    seqs = token_sequences(16, V, seed=1)
    args = TrainingArguments(output_dir=out + "-trainer", per_device_train_batch_size=per_device, max_steps=4,
                             logging_steps=1, learning_rate=5e-3, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    options = LEARNED.get(gate, {"alpha": 0.3, "tau": 2.0})
    meta = [{"input_ids": s} for s in token_sequences(6, V, seed=7)] if gate in ("meta", "reinforce", "temperature") \
        else None
    g: str | Gate = gate
    rank = int(os.environ.get("RANK", "0"))
    if gate in LEARNED:  # built per process from its own seed (reinforce's policy) or theta (CTKD): the run
        torch.manual_seed(100 + rank)  # must start every process from process 0's
        g = get_gate_class(gate)(gate_config(gate, {**options, **({"ctkd_theta_init": 1.0 + 0.1 * rank}
                                                                  if gate == "ctkd" else {})}))
    tr = Sequential(model=tiny_gpt2(V, seed=3).train(), args=args, train_dataset=Items(seqs),
                    data_collator=causal_lm_collator(), teachers=[tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)],
                    gate=g, meta_dataset=meta, gate_options=None if gate in LEARNED else options)
    before = _gate_params(tr)
    tr.train()
    if gate in LEARNED:
        torch.save({"world": tr.args.world_size, "rank": tr.args.process_index, "gate_before": before,
                    "gate_after": _gate_params(tr), "updates": getattr(tr.gate, "updates", None),
                    "params": {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}},
                   f"{out}.{gate}.rank{tr.args.process_index}")
    elif tr.is_world_process_zero():
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        logs = [{k: v for k, v in h.items() if k.startswith(("gate/", "train/"))} for h in tr.state.log_history
                if "gate/label_share" in h]
        torch.save({"losses": losses, "world": tr.args.world_size, "logs": logs,
                    "params": {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}}, out)


if __name__ == "__main__":
    for name in (sys.argv[3] if len(sys.argv) > 3 else "fixed").split(","):
        main(sys.argv[1], int(sys.argv[2]), name)
