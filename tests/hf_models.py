"""Tiny random causal LMs built from configs (no download) for the ``metagate.hf`` tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_gpt2(vocab: int = 50, seed: int = 0, n_embd: int = 16, n_layer: int = 1):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab: int = 50, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def token_sequences(n: int, vocab: int = 50, seed: int = 0, lo: int = 5, hi: int = 12):
    """``n`` random token sequences of lengths in ``[lo, hi]`` (a learnable pattern: each token then its
    successor mod ``vocab``, from a random start, so a few steps visibly lower the loss)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        start = int(torch.randint(0, vocab, (1,), generator=g))
        out.append((torch.arange(length) + start) % vocab)
    return out
