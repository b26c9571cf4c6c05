"""Token classes of the lm task's training targets: frequent vs rare, code vs prose.

Each training unit (example ``i``, position ``t``: the target ``y[i, t]``) gets two flags, computed from the
*clean* target (the text's own token, before any label noise), ``False`` on padding:

* **frequent** -- the target's token type is among the most frequent types of the training split's targets that
  together cover half of them: types sorted by their count among the real training targets (most frequent first,
  ties by id), the shortest prefix whose counts reach 50% of the targets. **Rare** = a real target not frequent.
* **code** -- the last character of the target token (the tokenizer's offset mapping) lies in a *code line* of its
  document (:func:`code_lines`): a line that starts, after its indentation, with a ``>>>`` / ``...`` prompt, or a
  line of an indented literal block -- after a paragraph and a blank line, the lines indented deeper than the
  paragraph's last line (blank lines inside included, up to the next line indented no deeper), when that last line
  ends in ``:`` (but for admonition labels such as ``Note:``) or in a letter or digit, or the block's first line holds
  a grammar rule (``::=``) or a prompt, and the block's first line is not a list item. **Prose** = a real target not
  code; blank lines are prose. (The corpus is pydoc's rendering of reST: a ``::`` paragraph renders ending in
  ``:``, or with no mark at all after ``"equivalent to ::"``, its literal block indented under it; notes, list items
  and the descriptions under a method's signature are indented too, and are prose.) On the whole corpus 12% of the
  characters are code.

:func:`target_classes` maps the per-document flags onto ``[N, L]`` exactly as :func:`metagate.data.lm.chunk_document`
cuts the document's tokens into targets, so unit ``i * L + t`` of the shared loop reads flag ``[i, t]``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

#: lines ending in ``:`` that introduce an indented note, not a literal block
ADMONITIONS = frozenset({"Note:", "Notes:", "See also:", "Warning:", "Caution:", "Important:", "Tip:", "Hint:"})
_PROMPT = re.compile(r"(>>>|\.\.\.)( |$)")
_LIST_ITEM = re.compile(r"([*+-]|\d+\.|\(\d+\)|\[\d+\])( |$)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _introduces_literal(line: str) -> bool:
    """A paragraph's last line that introduces a literal block in pydoc's rendering: it ends in ``:`` (not an
    admonition label), or in a letter or digit (``"equivalent to::"`` renders without its ``::``)."""
    s = line.strip()
    return bool(s) and s not in ADMONITIONS and (s.endswith(":") or s[-1].isalnum())


def code_lines(text: str) -> list[bool]:
    """Per line of ``text`` (``text.split("\\n")``): whether it is a code line (see the module docstring)."""
    lines = text.split("\n")
    code = [bool(_PROMPT.match(ln.lstrip(" "))) for ln in lines]
    i = 0
    while i < len(lines) - 2:
        if lines[i].strip() and not lines[i + 1].strip():  # a paragraph's last line, then a blank line
            depth, j = _indent(lines[i]), i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            first = lines[j].lstrip(" ") if j < len(lines) else ""
            if (j < len(lines) and _indent(lines[j]) > depth and not _LIST_ITEM.match(first)
                    and (_introduces_literal(lines[i]) or "::=" in first or _PROMPT.match(first))):
                while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > depth):
                    code[j] = code[j] or bool(lines[j].strip())
                    j += 1
                i = j
                continue
        i += 1
    return code


def code_chars(text: str) -> Tensor:
    """``[len(text)]`` bool: the character lies in a code line (a line's ``\\n`` belongs to it)."""
    flags = torch.zeros(len(text), dtype=torch.bool)
    start = 0
    for line, is_code in zip(text.split("\n"), code_lines(text)):
        end = start + len(line) + 1  # its newline
        if is_code:
            flags[start : min(end, len(text))] = True
        start = end
    return flags


def token_code_flags(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """Per token (``offsets``: the fast tokenizer's ``(start, end)`` character spans): whether its last character
    lies in a code line (an empty span reads the character before ``end``)."""
    if not text or not offsets:
        return [False] * len(offsets)
    span = torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)
    last = torch.maximum(span[:, 1] - 1, span[:, 0]).clamp(0, len(text) - 1)
    return code_chars(text)[last].tolist()


def frequent_types(targets: Tensor, vocab: int) -> Tensor:
    """``[vocab]`` bool: the most frequent token types of ``targets`` (id 0 is padding, not counted) that together
    cover at least half of the real targets (ties broken by the smaller id)."""
    real = targets[targets != 0].reshape(-1)
    counts = torch.bincount(real, minlength=vocab)[:vocab]
    sorted_counts, order = torch.sort(counts, descending=True, stable=True)  # stable: ties by the smaller id
    before = sorted_counts.cumsum(0) - sorted_counts  # targets covered by the more frequent types
    out = torch.zeros(vocab, dtype=torch.bool)
    out[order[(before < 0.5 * len(real)) & (sorted_counts > 0)]] = True
    return out


def target_flags(flags: list[bool], seq_len: int) -> Tensor:
    """``[n, L]`` bool of a document's per-token ``flags`` at its targets, chunked as
    :func:`metagate.data.lm.chunk_document` chunks its tokens (padding: False)."""
    from metagate.data.lm import chunk_document

    # the chunk of positions 1..n: a target slot holds its token's position + 1, padding holds 0
    _, pos = chunk_document(list(range(1, len(flags) + 1)), seq_len)
    return torch.tensor([False, *flags], dtype=torch.bool)[pos]


def target_classes(docs: list[str], code_flags: dict[str, list[bool]], clean_targets: Tensor, vocab: int,
                   seq_len: int) -> dict[str, Tensor]:
    """``{"frequent": [N, L], "code": [N, L]}`` bool over a split's targets (documents ``docs`` in the split's
    order, ``code_flags`` per document token, ``clean_targets`` the split's clean ``y``)."""
    code = torch.cat([target_flags(code_flags[d], seq_len) for d in docs])
    if code.shape != clean_targets.shape:
        raise ValueError(f"token classes {tuple(code.shape)} do not match the targets {tuple(clean_targets.shape)}")
    frequent = frequent_types(clean_targets, vocab)[clean_targets] & (clean_targets != 0)
    return {"frequent": frequent, "code": code & (clean_targets != 0)}


#: the four classes of the diagnostics, as (name, class key, flag value)
CLASSES = (("frequent", "frequent", True), ("rare", "frequent", False), ("code", "code", True),
           ("prose", "code", False))


def class_masks(classes: dict[str, Tensor]) -> dict[str, Tensor]:
    """``frequent / rare / code / prose`` unit masks from the two stored flags (over the same units)."""
    return {name: classes[key] if value else ~classes[key] for name, key, value in CLASSES}
