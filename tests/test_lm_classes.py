"""The lm task's token classes (frequent / rare, code / prose) and the gate's shares by class."""

from __future__ import annotations

import hf_models  # noqa: F401  (sets HF_HUB_OFFLINE before transformers is imported)
import pytest
import torch

from metagate.data import get_task
from metagate.data.lm_classes import class_masks, code_lines, frequent_types, target_flags
from metagate.diagnostics import class_shares, gate_diagnostics

DOC = ("The name is set first.\n"
       "   >>> x = 1\n"
       "Then it is read back; the value stays the same.\n")


def test_code_lines_follow_the_stated_rule():
    text = "\n".join([
        "A heading",                      # 0
        "*********",                      # 1
        "",                               # 2
        "   rule ::= \"a\" | \"b\"",      # 3  grammar block after a heading: code
        "            | \"c\"",            # 4
        "",                               # 5
        "It is equivalent to",            # 6  a rendered "::" with no mark left
        "",                               # 7
        "   if x:",                       # 8  code
        "",                               # 9  blank inside the block: prose
        "       y()",                     # 10 code
        "",                               # 11
        "Prose that ends in a full stop.",  # 12
        "",                               # 13
        "   An indented description.",    # 14 after a sentence: prose
        "",                               # 15
        "Note:",                          # 16
        "",                               # 17
        "  A note is prose.",             # 18
        "",                               # 19
        "Do the following:",              # 20
        "",                               # 21
        "   * a list item is prose",      # 22
        "more prose",                     # 23
        ">>> print(1)",                   # 24 a prompt anywhere
        "... continued",                  # 25
        "...and an ellipsis is prose",    # 26
    ])
    code = code_lines(text)
    assert [i for i, c in enumerate(code) if c] == [3, 4, 8, 10, 24, 25]


def test_frequent_types_cover_half_of_the_targets_by_hand_count():
    # counts 5: 3, 7: 2, 9: 1 (0 is padding): 5 alone covers 3 of 6 targets
    assert frequent_types(torch.tensor([[5, 5, 5, 7], [7, 9, 0, 0]]), 12).nonzero().flatten().tolist() == [5]
    # counts 5: 2, 7: 2, 9: 1: 5 covers 2 of 5 (< 2.5), so 7 joins
    assert frequent_types(torch.tensor([[5, 5, 7, 7, 9]]), 12).nonzero().flatten().tolist() == [5, 7]
    # a tie at the boundary goes to the smaller id
    assert frequent_types(torch.tensor([[7, 5]]), 12).nonzero().flatten().tolist() == [5]


def test_target_flags_follow_the_chunks_of_the_targets():
    # tokens t0..t6 with L = 3: targets t1 t2 t3 | t4 t5 t6; flags are those of t1.. in order
    flags = [False, True, False, True, True, False, True]
    assert target_flags(flags, 3).tolist() == [[True, False, True], [True, False, True]]
    assert target_flags(flags[:5], 3).tolist() == [[True, False, True], [True, False, False]]  # padding: False


def test_classes_of_a_hand_made_corpus():
    corpus = {f"d{i}": DOC for i in range(6)}
    task = get_task("lm", corpus=corpus, lm_seq_len=5)
    tok = task.info["tokenizer"]
    classes = task.info["token_classes"]
    assert set(classes) == {"frequent", "code"}
    assert classes["code"].shape == classes["frequent"].shape == task.train.y.shape
    enc = tok(DOC, add_special_tokens=False, return_offsets_mapping=True)
    start = DOC.index(">>>") - 3
    end = DOC.index("\n", start) + 1  # the line, its newline included
    # by hand: a token is code when its last character lies in the '>>> x = 1' line
    want = [start <= e - 1 < end for _, e in enc["offset_mapping"]][1:]  # targets: every token after the first
    assert sum(want) >= 5 and not all(want)  # the line's tokens (and the next line's leading ones are not)
    mask = task.train.mask
    n_docs = len(task.train.docs)
    got = classes["code"][mask].tolist()
    assert got == want * n_docs
    assert not classes["code"][~mask].any() and not classes["frequent"][~mask].any()
    # frequent by hand count over the training targets (each document the same text)
    counts: dict[int, int] = {}
    for t in enc["input_ids"][1:]:
        counts[t] = counts.get(t, 0) + n_docs
    total, covered, frequent = sum(counts.values()), 0, set()
    for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered >= total / 2:
            break
        frequent.add(t)
        covered += c
    assert classes["frequent"][mask].tolist() == [t in frequent for t in enc["input_ids"][1:]] * n_docs
    # label noise leaves the classes of the clean text
    noisy = get_task("lm", corpus=corpus, lm_seq_len=5, noise=0.3)
    assert noisy.corrupted.any()
    assert all(torch.equal(noisy.info["token_classes"][k], classes[k]) for k in classes)


def test_class_shares_by_hand():
    w = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6], [0.0, 0.5, 0.5]])
    masks = class_masks({"frequent": torch.tensor([True, True, False, False]),
                         "code": torch.tensor([True, False, True, False])})
    right = torch.tensor([[True, False], [True, True], [False, True], [False, False]])
    out = class_shares(w, masks, right)
    assert out["gate/share_frequent_t0"] == pytest.approx(0.6)  # unit 1 gets no KD weight: no share
    assert out["gate/share_frequent_t1"] == pytest.approx(0.4)
    assert out["gate/w_label_frequent"] == pytest.approx(0.75)
    assert out["gate/share_rare_t0"] == pytest.approx((0.25 + 0.5) / 2)
    assert out["gate/w_label_rare"] == pytest.approx(0.1)
    assert out["gate/share_code_t1"] == pytest.approx((0.4 + 0.75) / 2)
    assert out["gate/share_prose_t0"] == pytest.approx(0.5)  # unit 3 alone (unit 1: label only)
    assert out["diag/right_frequent_t0"] == 1.0 and out["diag/right_frequent_t1"] == 0.5
    assert out["diag/right_code_t1"] == 0.5 and out["diag/right_prose_t0"] == 0.5
    assert "gate/share_code_t0" in gate_diagnostics(w, None, right, classes=masks)
    assert "gate/share_code_t0" not in gate_diagnostics(w, None, right)
