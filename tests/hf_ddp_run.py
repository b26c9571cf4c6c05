"""One ``GatedKDTrainer`` (``fixed``) run for the data-parallel test: under ``accelerate launch --cpu
--num_processes 2`` (gloo) with 2 sequences per process, or alone with 4; the global batches are the same
(sequential order). Rank 0 writes the per-step losses and the final parameters to ``argv[1]``."""

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


def main(out: str, per_device: int) -> None:
    torch.set_num_threads(1)
    seqs = token_sequences(16, V, seed=1)
    args = TrainingArguments(output_dir=out + "-trainer", per_device_train_batch_size=per_device, max_steps=4,
                             logging_steps=1, learning_rate=5e-3, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    tr = Sequential(model=tiny_gpt2(V, seed=3).train(), args=args, train_dataset=Items(seqs),
                    data_collator=causal_lm_collator(), teachers=[tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)],
                    gate="fixed", gate_options={"alpha": 0.3, "tau": 2.0})
    tr.train()
    if tr.is_world_process_zero():
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        torch.save({"losses": losses, "world": tr.args.world_size,
                    "params": {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
