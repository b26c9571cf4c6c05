"""Hugging Face language models in metagate (optional extra ``metagate[hf]``).

* :class:`metagate.hf.GatedKDTrainer`: a ``transformers.Trainer`` running metagate gates per token
  (imported on first access, so ``import metagate.hf`` works without ``transformers``);
* ``SparseBank``, ``score_sparse``, ``cached_sparse_bank``: the sparse top-k teacher bank, which lives in
  :mod:`metagate.teachers.sparse` (torch and safetensors only), re-exported here.

The loss itself is :func:`metagate.losses.gated_kd`, usable in any loop.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GatedKDTrainer", "SparseBank", "score_sparse", "cached_sparse_bank"]


def __getattr__(name: str) -> Any:
    if name == "GatedKDTrainer":
        from metagate.hf.trainer import GatedKDTrainer

        return GatedKDTrainer
    if name in ("SparseBank", "score_sparse", "cached_sparse_bank"):
        from metagate.teachers import sparse

        return getattr(sparse, name)
    raise AttributeError(f"module 'metagate.hf' has no attribute {name!r}")
