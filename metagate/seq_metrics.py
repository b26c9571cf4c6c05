"""Sequence metrics: token-level (teacher forcing, padding dropped) and word-level (decoded words).

* token: accuracy, NLL, ECE/MCE, Brier over the unmasked target tokens
  (:func:`metagate.metrics.classification_metrics` on the flattened tokens);
* word: PER -- the summed edit distance of each decoded word to the *closest* of its word's
  pronunciations over the summed length of those closest pronunciations --, WER -- the share of words
  whose decoding matches none of its pronunciations --, and the sentence-level calibration of the
  decoded word's confidence (``exp`` of its summed token log-probabilities, ``<eos>`` included) against
  its correctness (``sent_ece``, ``sent_mce``, ``sent_conf``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metagate.metrics import MCE_MIN_COUNT, N_BINS, classification_metrics, confidence_bins
from metagate.seq_models import EOS, PAD, beam_decode, greedy_decode


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit-cost substitution, insertion, deletion)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def closest_reference(hyp: Sequence[int], refs: Sequence[Sequence[int]]) -> tuple[int, int]:
    """``(distance, reference length)`` of the reference closest to ``hyp`` (ties: the shorter reference
    first, then the first listed)."""
    return min((edit_distance(hyp, r), len(r)) for r in refs)


def per_wer(hyps: Sequence[Sequence[int]], refs: Sequence[Sequence[Sequence[int]]]) -> tuple[float, float]:
    """Phoneme and word error rate of decoded words ``hyps`` against each word's pronunciations ``refs``."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} decoded words but {len(refs)} reference sets")
    errors = length = wrong = 0
    for h, rs in zip(hyps, refs):
        d, n = closest_reference(h, rs)
        errors, length, wrong = errors + d, length + n, wrong + (d > 0)
    return errors / max(length, 1), wrong / max(len(hyps), 1)


def strip(tokens: Tensor) -> list[list[int]]:
    """Decoded ``[B, L]`` id rows -> lists of ids before the first ``<eos>`` (``<pad>`` dropped)."""
    out = []
    for row in tokens.tolist():
        seq = []
        for t in row:
            if t == EOS:
                break
            if t != PAD:
                seq.append(t)
        out.append(seq)
    return out


def binary_ece(confidence: Tensor, correct: Tensor, n_bins: int = N_BINS) -> tuple[float, float]:
    """ECE and MCE of a confidence ``[N]`` in ``[0, 1]`` for a binary outcome ``correct [N]``."""
    conf = confidence.double().clamp(0, 1)
    acc = correct.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1]).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    gap = (torch.zeros_like(count).index_add_(0, idx, conf) - torch.zeros_like(count).index_add_(0, idx, acc)).abs()
    ece = float(gap.sum() / count.sum().clamp_min(1))
    nonempty = count > 0
    mce = float((gap[nonempty] / count[nonempty]).max()) if nonempty.any() else 0.0
    return ece, mce


@torch.no_grad()
def teacher_forced_logits(model: nn.Module, x: Tensor, device: torch.device | str = "cpu",
                          batch_size: int = 512) -> Tensor:
    """``[N, L, V]`` logits in eval mode (CPU, float32)."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def decode_words(model: nn.Module, src: Tensor, max_len: int, beam: int = 1, device: torch.device | str = "cpu",
                 batch_size: int = 512) -> tuple[list[list[int]], Tensor]:
    """Decode each source ``[W, S]``: ids per word and the decoded word's log-probability ``[W]``."""
    model.eval()
    hyps: list[list[int]] = []
    scores = []
    for i in range(0, len(src), batch_size):
        s = src[i : i + batch_size].to(device)
        tok, score = greedy_decode(model, s, max_len) if beam == 1 else beam_decode(model, s, max_len, beam)
        hyps += strip(tok.cpu())
        scores.append(score.float().cpu())
    return hyps, torch.cat(scores) if scores else torch.zeros(0)


def decode_length(src: Tensor) -> int:
    """Most tokens decoded for sources ``[W, S]``: twice the longest real source plus ``<eos>`` and one (no
    English word has more than twice as many phonemes as letters; padding never changes it)."""
    return 2 * int((src != PAD).sum(1).max()) + 2 if len(src) else 1


def sequence_metrics(model: nn.Module, split: object, device: torch.device | str = "cpu",
                     beam: int = 1) -> dict[str, float]:
    """Token metrics under teacher forcing and word metrics of decoded words on a :class:`SeqSplit`; on a
    split without references (a language-modelling split) :func:`language_metrics`."""
    if not hasattr(split, "refs"):
        return language_metrics(model, split, device)
    logits = teacher_forced_logits(model, split.x, device)
    out = classification_metrics(logits.reshape(-1, logits.shape[-1]), split.y.reshape(-1),
                                 split.mask.reshape(-1))
    first = split.first_of_word()
    src = split.x[first, 0]
    hyps, score = decode_words(model, src, decode_length(src), beam, device)
    out["per"], out["wer"] = per_wer(hyps, split.refs)
    correct = torch.tensor([closest_reference(h, r)[0] == 0 for h, r in zip(hyps, split.refs)])
    conf = score.exp()
    out["sent_ece"], out["sent_mce"] = binary_ece(conf, correct)
    out["sent_conf"] = float(conf.mean())
    return out


@torch.no_grad()
def language_metrics(model: nn.Module, split: object, device: torch.device | str = "cpu",
                     batch_size: int = 8) -> dict[str, float]:
    """The token metrics of :func:`~metagate.metrics.classification_metrics` (same numbers) and the perplexity
    ``exp(nll)`` of a language-modelling split under teacher forcing, a batch at a time: per token only its
    confidence, correctness, NLL and Brier term are kept (``[tokens, V]`` probabilities of a 49,152-token
    vocabulary would not fit in memory)."""
    model.eval()
    conf, correct, nll, brier = [], [], [], []
    for i in range(0, len(split.x), batch_size):
        y = split.y[i : i + batch_size]
        keep = y != PAD
        lp = torch.log_softmax(model(split.x[i : i + batch_size].to(device)).double().cpu()[keep], -1)
        y = y[keep]
        top, pred = lp.max(-1)
        lp_y = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        conf.append(top.exp())
        correct.append(pred == y)
        nll.append(-lp_y)
        brier.append((2 * lp).exp().sum(-1) - 2 * lp_y.exp() + 1)
    c, ok = torch.cat(conf), torch.cat(correct).double()
    b = confidence_bins(c, ok)
    gap = (b["confidence"] - b["accuracy"]).abs()
    nonempty, big = b["count"] > 0, b["count"] >= MCE_MIN_COUNT
    mean_nll = float(torch.cat(nll).mean())
    out = {"acc": float(ok.mean()), "nll": mean_nll,
           "ece": float((gap * b["count"]).sum() / b["count"].sum().clamp_min(1)),
           "mce": float(gap[nonempty].max()) if nonempty.any() else 0.0, "brier": float(torch.cat(brier).mean())}
    if big.any():
        out[f"mce_min{MCE_MIN_COUNT}"] = float(gap[big].max())
    out["ppl"] = math.exp(mean_nll)
    return out
