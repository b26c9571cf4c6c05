"""Encoder-decoder models for sequence tasks (grapheme-to-phoneme), in plain torch.

**Input packing.** The shared loop calls ``model(x)`` with one tensor, so a sequence example packs its
source and its teacher-forcing decoder input into ``x [B, 2, L]``: row 0 the source ids, row 1
``<bos>`` followed by the target (without ``<eos>``), both right-padded with ``<pad>`` (id 0).
``forward(x)`` returns logits ``[B, L, V]``: position ``t`` predicts target token ``t`` (``<eos>``
after the last phoneme). Padding never changes the logits of real positions: the encoder packs the
source by length, attention masks padded source positions and the decoder is causal.

**Feature protocol.** Like :mod:`metagate.models`, every model has ``features(x) -> [B, L, H]`` (the input of
its output layer) and ``head`` (that ``nn.Linear``, stored as ``out``: ``head`` is a read-only alias, so
checkpoints keep their ``out.*`` keys) with ``forward(x) == head(features(x))``; the look-ahead credit of
:mod:`metagate.gates.credit` reads them per token.

**Decoding.** :func:`greedy_decode` and :func:`beam_decode` work with any model that has
``start(src) -> state`` and ``step(state, prev) -> (log_probs [B, V], state)``; a state is a tuple
of tensors whose first dimension is the batch (reordered by beam search).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD, BOS, EOS = 0, 1, 2  # ids shared by every sequence vocabulary (metagate.data.g2p.SPECIALS)

State = tuple[Tensor, ...]


def pack_inputs(src: Tensor, dec_in: Tensor) -> Tensor:
    """``x [B, 2, L]`` from source ``[B, S]`` and decoder input ``[B, T]`` (the shorter is padded)."""
    length = max(src.shape[1], dec_in.shape[1])
    return torch.stack([F.pad(src, (0, length - src.shape[1])), F.pad(dec_in, (0, length - dec_in.shape[1]))], 1)


class Seq2Seq(nn.Module):
    """Base of the encoder-decoders: ``forward(x [B, 2, L]) -> [B, L, V]`` (teacher forcing), which is
    ``head(features(x))``."""

    src_vocab: int
    tgt_vocab: int
    out: nn.Linear  #: the output layer (``[H] -> [V]``)

    @property
    def head(self) -> nn.Linear:
        """The output layer (the feature protocol's name for ``out``; not a second module: no new state-dict key)."""
        return self.out

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``[B, L, H]`` the output layer's input for ``x [B, 2, L]`` (teacher forcing)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))

    def start(self, src: Tensor) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, state: State, prev: Tensor) -> tuple[Tensor, State]:  # pragma: no cover - abstract
        raise NotImplementedError


class GRUSeq2Seq(Seq2Seq):
    """GRU encoder (optionally bidirectional), GRU decoder with Luong (general) attention.

    :param src_vocab: source vocabulary size (characters)
    :param tgt_vocab: target vocabulary size ``V`` (phonemes + specials)
    :param emb: embedding width
    :param hidden: GRU width
    :param layers: GRU layers (encoder and decoder)
    :param bidirectional: bidirectional encoder (its two directions are projected to ``hidden``)
    :param dropout: dropout on embeddings and the attentional state
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, emb: int = 32, hidden: int = 64, layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.src_vocab, self.tgt_vocab, self.layers = src_vocab, tgt_vocab, layers
        self.src_emb = nn.Embedding(src_vocab, emb, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(tgt_vocab, emb, padding_idx=PAD)
        d = 2 if bidirectional else 1
        self.encoder = nn.GRU(emb, hidden, layers, batch_first=True, bidirectional=bidirectional)
        self.bridge = nn.Linear(d * hidden, hidden)  # memory and initial decoder state
        self.decoder = nn.GRU(emb, hidden, layers, batch_first=True)
        self.attn = nn.Linear(hidden, hidden, bias=False)
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, tgt_vocab)
        self.drop = nn.Dropout(dropout)
        self.bidirectional = bidirectional

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(memory [B, S, H], source mask [B, S], initial decoder state [layers, B, H])``."""
        mask = src != PAD
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(self.drop(self.src_emb(src)), lengths, batch_first=True, enforce_sorted=False)
        out, h = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        memory = torch.tanh(self.bridge(out))
        if self.bidirectional:  # h: [layers * 2, B, H] -> the two directions side by side
            h = h.view(self.layers, 2, *h.shape[1:]).transpose(1, 2).reshape(self.layers, h.shape[1], -1)
        return memory, mask, torch.tanh(self.bridge(h))

    def _attend(self, dec: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """The attentional state ``[B, T, H]`` (the output layer's input)."""
        scores = torch.bmm(self.attn(dec), memory.transpose(1, 2))  # [B, T, S]
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        context = torch.bmm(torch.softmax(scores, -1), memory)
        return self.drop(torch.tanh(self.combine(torch.cat([dec, context], -1))))

    def features(self, x: Tensor) -> Tensor:
        memory, mask, h = self.encode(x[:, 0])
        dec, _ = self.decoder(self.drop(self.tgt_emb(x[:, 1])), h.contiguous())
        return self._attend(dec, memory, mask)

    def start(self, src: Tensor) -> State:
        memory, mask, h = self.encode(src)
        return h.transpose(0, 1).contiguous(), memory, mask  # batch first, so beams reorder on dim 0

    def step(self, state: State, prev: Tensor) -> tuple[Tensor, State]:
        h, memory, mask = state
        dec, h_new = self.decoder(self.tgt_emb(prev).unsqueeze(1), h.transpose(0, 1).contiguous())
        logits = self.out(self._attend(dec, memory, mask)).squeeze(1)
        return F.log_softmax(logits, -1), (h_new.transpose(0, 1).contiguous(), memory, mask)


class TransformerSeq2Seq(Seq2Seq):
    """A small Transformer encoder-decoder with learned positions (a different architecture from the GRUs,
    so that teachers err on different tokens).

    :param max_len: longest source or target handled (positions)
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 64, heads: int = 4, layers: int = 2,
                 ff: int = 128, dropout: float = 0.1, max_len: int = 64) -> None:
        super().__init__()
        self.src_vocab, self.tgt_vocab, self.max_len = src_vocab, tgt_vocab, max_len
        self.src_emb = nn.Embedding(src_vocab, d_model, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(tgt_vocab, d_model, padding_idx=PAD)
        self.pos = nn.Embedding(max_len, d_model)
        self.core = nn.Transformer(d_model, heads, layers, layers, ff, dropout, batch_first=True)
        # the nested-tensor fast path drops padded rows in eval mode: keep shapes fixed
        self.core.encoder.enable_nested_tensor = self.core.encoder.use_nested_tensor = False
        self.out = nn.Linear(d_model, tgt_vocab)
        self.scale = d_model**0.5

    def _embed(self, emb: nn.Embedding, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence of length {ids.shape[1]} exceeds the model's max_len {self.max_len}")
        return emb(ids) * self.scale + self.pos(torch.arange(ids.shape[1], device=ids.device))

    def _encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        pad = src == PAD
        return self.core.encoder(self._embed(self.src_emb, src), src_key_padding_mask=pad), pad

    def _decode(self, dec_in: Tensor, memory: Tensor, src_pad: Tensor) -> Tensor:
        """The decoder's output ``[B, T, d_model]`` (the output layer's input)."""
        t = dec_in.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf"), device=dec_in.device), 1)
        # no target key-padding mask: with right padding the causal mask already hides later positions
        return self.core.decoder(self._embed(self.tgt_emb, dec_in), memory, tgt_mask=causal,
                                 memory_key_padding_mask=src_pad)

    def features(self, x: Tensor) -> Tensor:
        memory, pad = self._encode(x[:, 0])
        return self._decode(x[:, 1], memory, pad)

    def start(self, src: Tensor) -> State:
        memory, pad = self._encode(src)
        return memory, pad, torch.zeros(src.shape[0], 0, dtype=torch.long, device=src.device)

    def step(self, state: State, prev: Tensor) -> tuple[Tensor, State]:
        memory, pad, prefix = state
        prefix = torch.cat([prefix, prev.unsqueeze(1)], 1)
        logits = self.out(self._decode(prefix, memory, pad))[:, -1]
        return F.log_softmax(logits, -1), (memory, pad, prefix)


@torch.no_grad()
def greedy_decode(model: Seq2Seq, src: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Greedy decoding.

    :param src: ``[B, S]`` source ids
    :param max_len: most target tokens (``<eos>`` included)
    :return: ``tokens [B, max_len]`` (``<eos>`` then ``<pad>`` after the end) and the summed
        log-probability of each decoded sequence ``[B]`` (its tokens and its ``<eos>``)
    """
    state = model.start(src)
    b = src.shape[0]
    prev = torch.full((b,), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    score = torch.zeros(b, device=src.device)
    out = torch.full((b, max_len), PAD, dtype=torch.long, device=src.device)
    for t in range(max_len):
        log_p, state = model.step(state, prev)
        lp, tok = log_p.max(-1)
        tok = tok.masked_fill(done, PAD)
        score = score + lp.masked_fill(done, 0.0)
        out[:, t] = tok
        done = done | (tok == EOS)
        prev = tok.masked_fill(done, EOS)
        if bool(done.all()):
            break
    return out, score


@torch.no_grad()
def beam_decode(model: Seq2Seq, src: Tensor, max_len: int, beam: int = 4) -> tuple[Tensor, Tensor]:
    """Beam search (no length normalisation; a finished hypothesis keeps its score).

    :return: as :func:`greedy_decode`, the best hypothesis of each source
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    b = src.shape[0]
    dev = src.device
    state = tuple(s.repeat_interleave(beam, 0) for s in model.start(src))
    prev = torch.full((b * beam,), BOS, dtype=torch.long, device=dev)
    score = torch.full((b, beam), float("-inf"), device=dev)
    score[:, 0] = 0.0  # one live hypothesis at the start, not `beam` copies of it
    done = torch.zeros(b * beam, dtype=torch.bool, device=dev)
    hyps = torch.full((b * beam, 0), PAD, dtype=torch.long, device=dev)
    for _ in range(max_len):
        log_p, state = model.step(state, prev)
        v = log_p.shape[-1]
        # a finished hypothesis only continues with <pad>, at no cost
        finished = torch.full_like(log_p, float("-inf"))
        finished[:, PAD] = 0.0
        log_p = torch.where(done.unsqueeze(1), finished, log_p)
        total = (score.reshape(-1, 1) + log_p).reshape(b, beam * v)
        score, flat = total.topk(beam, -1)
        origin = (flat // v + torch.arange(b, device=dev).unsqueeze(1) * beam).reshape(-1)
        tok = (flat % v).reshape(-1)
        state = tuple(s.index_select(0, origin) for s in state)
        hyps = torch.cat([hyps.index_select(0, origin), tok.unsqueeze(1)], 1)
        done = done.index_select(0, origin) | (tok == EOS)
        prev = tok.masked_fill(done, EOS)
        if bool(done.all()):
            break
    best = score.argmax(-1)
    rows = torch.arange(b, device=dev) * beam + best
    out = torch.full((b, max_len), PAD, dtype=torch.long, device=dev)
    out[:, : hyps.shape[1]] = hyps.index_select(0, rows)
    return out, score.gather(1, best.unsqueeze(1)).squeeze(1)
