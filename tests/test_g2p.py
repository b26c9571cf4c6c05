"""The g2p sequence task: data, models, decoding, metrics, the per-token bank and token units in the loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from metagate.cli import main
from metagate.data import get_task
from metagate.data.g2p import EOS_ID, SPECIALS, UNK_ID, SeqSplit, Vocab, inject_token_noise, load_cmudict
from metagate.data.task import Task
from metagate.errors import ConfigError, InputError, StaleCacheError
from metagate.gates.fixed import CEGate, FixedGate
from metagate.gates.hard import HardGate
from metagate.losses import reduce_weighted, unit_losses
from metagate.seq_metrics import binary_ece, closest_reference, edit_distance, per_wer, sequence_metrics
from metagate.seq_models import GRUSeq2Seq, TransformerSeq2Seq, beam_decode, greedy_decode
from metagate.teachers.build import build_bank
from metagate.teachers.cache import cached_token_logits
from metagate.teachers.sequence import token_index, topk_compress, topk_expand, topk_kl_bound
from metagate.trainer import TrainConfig, Trainer, seed_everything
from metagate.units import PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")

LEX = {
    "cat": [["K", "AE1", "T"]],
    "cab": [["K", "AE1", "B"]],
    "tab": [["T", "AE1", "B"]],
    "bat": [["B", "AE1", "T"]],
    "act": [["AE1", "K", "T"]],
    "tact": [["T", "AE1", "K", "T"]],
    "data": [["D", "AE1", "T", "AH0"], ["D", "EY1", "T", "AH0"]],
    "bad": [["B", "AE1", "D"]],
    "dab": [["D", "AE1", "B"]],
    "cad": [["K", "AE1", "D"]],
    "tad": [["T", "AE1", "D"]],
    "dad": [["D", "AE1", "D"]],
}


@pytest.fixture(scope="module")
def small() -> Task:
    return get_task("g2p", subset=400, noise=0.2)


def _pad(task: Task, extra: int) -> Task:
    """The same task with ``extra`` more padding columns everywhere."""
    def pad_split(s: SeqSplit) -> SeqSplit:
        return SeqSplit(F.pad(s.x, (0, extra)), F.pad(s.y, (0, extra)), s.word, s.words, s.refs)

    t = copy.copy(task)
    t.train, t.meta, t.select, t.test = (pad_split(s) for s in (task.train, task.meta, task.select, task.test))
    t.corrupted = F.pad(task.corrupted, (0, extra))
    t.clean_train_labels = F.pad(task.clean_train_labels, (0, extra))
    return t


# -- data ------------------------------------------------------------------------------------------
def test_split_by_word_no_leak_and_pronunciations_together(small: Task) -> None:
    lex = load_cmudict()
    seen: dict[str, str] = {}
    for name in ("train", "meta", "select", "test"):
        s = getattr(small, name)
        for w in s.words:
            assert w not in seen, f"{w} in {seen.get(w)} and {name}"
            seen[w] = name
        counts = torch.bincount(s.word, minlength=len(s.words))
        assert counts.tolist() == [len(lex[w]) for w in s.words]  # every pronunciation, all in this split
        assert [len(r) for r in s.refs] == [len(lex[w]) for w in s.words]
    assert len(seen) == 400
    assert len(small.test.words) == 40
    again = get_task("g2p", subset=400, noise=0.2)
    assert torch.equal(again.train.x, small.train.x) and torch.equal(again.train.y, small.train.y)
    other = get_task("g2p", subset=400, noise=0.2, data_seed=1)
    assert other.test.words == small.test.words and other.train.words != small.train.words


def test_tensors_vocab_and_unknown_characters() -> None:
    lex = {**LEX, "zap": [["Z", "AE1", "P"]]}
    task = get_task("g2p", subset=None, lexicon=lex, val_fraction=0.4)
    chars, phones = task.info["chars"], task.info["phones"]
    assert tuple(chars.tokens[:4]) == SPECIALS and tuple(phones.tokens[:4]) == SPECIALS
    train_chars = {c for w in task.train.words for c in w}
    assert set(chars.tokens[4:]) == train_chars  # from train only
    for s in (task.train, task.meta, task.select, task.test):
        for i in range(len(s)):
            w = s.words[int(s.word[i])]
            src = s.x[i, 0][s.x[i, 0] != PAD_ID].tolist()
            assert src == [chars.index.get(c, UNK_ID) for c in w]  # unknown characters -> <unk>
            n = int(s.mask[i].sum())
            assert s.y[i, n - 1] == EOS_ID and s.x[i, 1, 0] == 1  # <eos> closes y, <bos> opens the decoder input
            assert torch.equal(s.x[i, 1, 1:n], s.y[i, : n - 1])  # decoder input = target shifted right
    assert Vocab(list(SPECIALS) + ["A"]).encode(["A", "Q"]) == [4, UNK_ID]


def test_no_stress() -> None:
    task = get_task("g2p", subset=None, lexicon=LEX, val_fraction=0.4, no_stress=True)
    assert not any(ch.isdigit() for t in task.info["phones"].tokens for ch in t)
    s = next(sp for sp in (task.train, task.meta, task.select, task.test) if "data" in sp.words)
    assert len(s.refs[s.words.index("data")]) == 2  # AE vs EY still differ


def test_bad_subsets(capsys) -> None:
    with pytest.raises(ConfigError, match="--subset must be >= 1"):
        get_task("g2p", subset=0, lexicon=LEX)
    with pytest.raises(ConfigError, match="exceeds the dictionary's 126052 words"):
        get_task("g2p", subset=200_000)
    with pytest.raises(InputError, match="too small"):
        get_task("g2p", subset=3, lexicon=LEX)
    assert main(["distill", "--task", "g2p", "--subset", "0"]) == 2
    assert "--subset must be >= 1 word" in capsys.readouterr().err


def test_token_and_word_noise() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0]] * 50)
    noisy, cor = inject_token_noise(y, 0.2, "symmetric", 4, 10, g)
    phones = y >= 4
    assert int(cor.sum()) == round(0.2 * int(phones.sum()))
    assert not (cor & ~phones).any()  # <eos> and padding never corrupted
    assert (noisy[cor] != y[cor]).all() and torch.equal(noisy[~cor], y[~cor])
    assert ((noisy[cor] >= 4) & (noisy[cor] < 14)).all()
    noisy, cor = inject_token_noise(y, 0.3, "word", 4, 10, g)
    rows = cor.any(1)
    assert int(rows.sum()) == 30 and torch.equal(cor[rows], phones[rows])
    with pytest.raises(ConfigError, match="symmetric .tokens. or word"):
        inject_token_noise(y, 0.2, "pairflip", 4, 10, g)


# -- models and decoding -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gru", "bigru", "transformer"])
def test_padding_never_changes_real_logits(arch: str) -> None:
    torch.manual_seed(0)
    model = {"gru": lambda: GRUSeq2Seq(12, 9), "bigru": lambda: GRUSeq2Seq(12, 9, 8, 16, 2, True),
             "transformer": lambda: TransformerSeq2Seq(12, 9, 16, 2, 1, 32, 0.0, 16)}[arch]().eval()
    x = torch.tensor([[[4, 5, 6, 7, 0], [1, 4, 5, 0, 0]], [[8, 9, 0, 0, 0], [1, 6, 7, 8, 0]]])
    base = model(x)
    padded = model(F.pad(x, (0, 4)))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.allclose(base[mask], padded[:, :5][mask], atol=1e-5)


def test_greedy_decoding_reproduces_training_words() -> None:
    task = get_task("g2p", subset=None, lexicon=LEX, val_fraction=0.4)
    seed_everything(0)
    model = GRUSeq2Seq(len(task.info["chars"]), task.num_classes, 16, 48)
    cfg = TrainConfig(epochs=150, batch_size=64, lr=1e-2, optimizer="adam", weight_decay=0.0, device="cpu",
                      progress=False, schedule="constant")
    tr = Trainer(task, model, CEGate(), None, cfg)
    for _ in range(cfg.epochs):
        tr.run_epoch()
    single = [i for i in range(len(task.train)) if len(task.train.refs[int(task.train.word[i])]) == 1]
    src = task.train.x[single, 0]
    tok, score = greedy_decode(model.eval(), src, task.train.y.shape[1])
    assert torch.equal(tok, task.train.y[single])
    btok, bscore = beam_decode(model, src, task.train.y.shape[1], beam=3)
    assert torch.equal(btok, tok) and (bscore >= score - 1e-5).all()
    # the decoded words' scores are their teacher-forced log-probabilities
    lp = torch.log_softmax(model(task.train.x[single]), -1).gather(-1, task.train.y[single].unsqueeze(-1))[..., 0]
    assert torch.allclose(score, (lp * task.train.mask[single]).sum(1), atol=1e-4)


def test_beam_search_is_at_least_greedy_and_beam1_is_greedy() -> None:
    torch.manual_seed(3)
    model = TransformerSeq2Seq(10, 8, 16, 2, 1, 32, 0.0, 12).eval()
    src = torch.randint(4, 10, (6, 5))
    g_tok, g_score = greedy_decode(model, src, 8)
    b1_tok, b1_score = beam_decode(model, src, 8, beam=1)
    assert torch.equal(g_tok, b1_tok) and torch.allclose(g_score, b1_score, atol=1e-5)
    _, b4 = beam_decode(model, src, 8, beam=4)
    assert (b4 >= g_score - 1e-5).all()


# -- metrics ---------------------------------------------------------------------------------------------
def test_edit_distance_and_per_wer_by_hand() -> None:
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], [4, 5]) == 2 and edit_distance([4, 5], []) == 2
    assert closest_reference([5, 6, 7], [[5, 9, 9, 9], [5, 6]]) == (1, 2)
    hyps = [[5, 6, 7], [4, 4], [8]]
    refs = [[[5, 6, 7, 8], [5, 6, 7]], [[4, 5, 4]], [[9, 9]]]
    per, wer = per_wer(hyps, refs)
    assert per == pytest.approx((0 + 1 + 2) / (3 + 3 + 2))  # closest references: 3, 3 and 2 long
    assert wer == pytest.approx(2 / 3)


def test_binary_ece_golden() -> None:
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.55, 0.05])
    correct = torch.tensor([1, 0, 1, 1, 0, 0])
    ece, mce = binary_ece(conf, correct)
    # bins: (0.95, acc 0.5) x2, (0.55, acc 2/3) x3, (0.05, acc 0) x1
    assert ece == pytest.approx((2 * 0.45 + 3 * abs(0.55 - 2 / 3) + 0.05) / 6)
    assert mce == pytest.approx(0.45)


def test_sequence_metrics_ignore_padding(small: Task) -> None:
    torch.manual_seed(0)
    model = small.make_student()
    a = sequence_metrics(model, small.test)
    b = sequence_metrics(model, _pad(small, 3).test)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert 0 < a["per"] and a["wer"] == 1.0  # an untrained model


# -- teacher bank ------------------------------------------------------------------------------------------
def test_token_index_packs_real_tokens() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert token_index(mask).tolist() == [[0, 1, 3], [2, 3, 3]]


def test_topk_reconstructs_kl_within_bound() -> None:
    torch.manual_seed(0)
    v, k = 40, 5
    t_logits = torch.randn(500, v) * 3
    s_logp = torch.log_softmax(torch.randn(500, v) * 2, -1)
    p = torch.log_softmax(t_logits, -1)
    vals, idx = topk_compress(p, k)
    p_tilde = topk_expand(vals, idx, v)
    kl = (p.exp() * (p - s_logp)).sum(-1)
    kl_tilde = (p_tilde.exp() * (p_tilde - s_logp)).sum(-1)
    bound = topk_kl_bound(p, s_logp, k)
    assert ((kl_tilde - kl).abs() <= bound + 1e-5).all()
    assert (kl_tilde - kl).abs().max() > 0.1 * bound.max()  # not a vacuous bound
    assert torch.allclose(p_tilde.exp().sum(-1), torch.ones(500), atol=1e-5)
    top = p.topk(k, -1).indices
    assert torch.allclose(p_tilde.gather(1, top), p.gather(1, top), atol=1e-5)
    with pytest.raises(ConfigError, match=r"--topk must be in \[1, V\) = \[1, 40\)"):
        topk_compress(p, 40)


def test_cache_forms_fingerprint_and_vocab_mismatch(small: Task, tmp_path) -> None:
    torch.manual_seed(0)
    teacher = small.make_student()
    full = cached_token_logits(teacher, "t", small, tmp_path)
    m = int(small.train.mask.sum())
    assert full.shape == (m, small.num_classes) and full.dtype == torch.float16
    top = cached_token_logits(teacher, "t", small, tmp_path, topk=8)
    lp = torch.log_softmax(full.float(), -1)  # (near-ties may order differently: compare sorted values)
    assert torch.allclose(top.topk(8, -1).values, lp.topk(8, -1).values, atol=2e-2)
    assert torch.allclose(top.exp().sum(-1), torch.ones(m), atol=1e-4)
    d = tmp_path / small.key
    assert (d / "tokens-t-top8.pt").stat().st_size < 0.5 * (d / "tokens-t.pt").stat().st_size
    assert torch.equal(cached_token_logits(teacher, "t", small, tmp_path), full)  # served from the cache
    with torch.no_grad():
        next(teacher.parameters()).add_(0.1)
    with pytest.raises(StaleCacheError, match="stale teacher cache"):
        cached_token_logits(teacher, "t", small, tmp_path)
    bank, _ = build_bank(small, [("t", teacher)])
    ids = torch.tensor([3, 0])
    rows = bank.lookup(ids).view(2, small.train.y.shape[1], 1, -1)
    with torch.no_grad():
        ref = teacher.eval()(small.train.x[ids])
    real = small.train.mask[ids]
    assert torch.allclose(rows[:, :, 0][real], ref[real], atol=1e-3)  # float16 storage
    assert (rows[~real] == 0).all()
    wrong = GRUSeq2Seq(len(small.info["chars"]), small.num_classes + 2)
    with pytest.raises(InputError, match=f"outputs {small.num_classes + 2} target tokens.*has {small.num_classes}"):
        cached_token_logits(wrong, "w", small, None)
    with pytest.raises(ConfigError, match="--topk"):
        build_bank(small, [("t", teacher)], topk=small.num_classes)


# -- token units in the shared loop -------------------------------------------------------------------------
def _one_step(task: Task, gate, student, teachers):
    bank = build_bank(task, [(f"t{i}", t) for i, t in enumerate(teachers)])[0] if teachers else None
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2, optimizer="adam", weight_decay=0.0, device="cpu",
                      progress=False)
    tr = Trainer(task, copy.deepcopy(student), gate, bank, cfg)
    batch = next(tr.epoch_batches(0))
    res = tr.train_step(batch)
    return tr, batch, res


@pytest.mark.parametrize("gate", [lambda: CEGate(), lambda: FixedGate(alpha=0.3, tau=2.0),
                                  lambda: HardGate(hard_level="token", hard_tau=1.5),
                                  lambda: HardGate(hard_level="sentence", hard_tau=1.5)])
def test_extra_padding_gives_identical_losses_and_decisions(small: Task, gate) -> None:
    torch.manual_seed(0)
    student = small.make_student()
    teachers = [GRUSeq2Seq(len(small.info["chars"]), small.num_classes, 16, 24).eval() for _ in range(2)]
    a, ba, ra = _one_step(small, gate(), student, teachers)
    padded = _pad(small, 4)
    b, bb, rb = _one_step(padded, gate(), student, teachers)
    t = small.train.y.shape[1]
    real = (ba.y != PAD_ID).reshape(-1)
    wa, wb = ra.weights, rb.weights.view(len(bb), t + 4, -1)[:, :t].reshape(-1, ra.weights.shape[1])
    assert torch.allclose(ra.loss, rb.loss, atol=1e-6)
    assert torch.equal(wa[real], wb[real])  # the same decision on every real token
    la, lb = ra.losses, rb.losses.view(len(bb), t + 4, -1)[:, :t].reshape(ra.losses.shape)
    assert torch.allclose(la[real], lb[real], atol=1e-5)
    for pa, pb in zip(a.student.parameters(), b.student.parameters()):
        # the gradients agree to float rounding (longer sequences sum the time steps in another order);
        # Adam's first step divides by |g| + eps, so a ~1e-10 rounding difference on a gradient entry of
        # ~1e-8 moves a parameter by up to ~1e-5 (seen with HKD's KL at student tau = 1)
        assert torch.allclose(pa.grad, pb.grad, atol=1e-8)
        assert torch.allclose(pa, pb, atol=2e-5)
    # padding never counts: the step's loss is the mean over real tokens only
    assert torch.allclose(ra.loss, reduce_weighted(ra.losses, ra.weights, real.float()), atol=1e-6)
    if isinstance(a.gate, HardGate):
        assert (rb.weights.view(len(bb), t + 4, -1)[:, t:, 1:] == 0).all()  # padded tokens: gate 0


def test_unit_losses_on_token_units_match_a_hand_written_seq2seq_kd(small: Task) -> None:
    torch.manual_seed(1)
    student = small.make_student()
    teacher = GRUSeq2Seq(len(small.info["chars"]), small.num_classes, 16, 24).eval()
    tr, batch, res = _one_step(small, FixedGate(alpha=0.4, tau=2.0), student, [teacher])
    s = copy.deepcopy(student).train()
    torch.manual_seed(0)
    logits = s(batch.x)  # [B, T, V]
    t_logits = tr.bank.lookup(batch.ids).view(*logits.shape[:2], -1)
    mask = batch.y != PAD_ID
    ce = F.cross_entropy(logits[mask], batch.y[mask])
    kl = F.kl_div(F.log_softmax(logits[mask] / 2, -1), F.log_softmax(t_logits[mask] / 2, -1), log_target=True,
                  reduction="batchmean") * 4
    assert res.loss.item() == pytest.approx((0.4 * ce + 0.6 * kl).item(), rel=1e-5)
    cols = unit_losses(logits.reshape(-1, logits.shape[-1]), t_logits.reshape(-1, 1, logits.shape[-1]),
                       batch.y.reshape(-1), 2.0)
    assert torch.allclose(cols[mask.reshape(-1)], res.losses[mask.reshape(-1)], atol=1e-5)


def test_token_diagnostics_with_noise(small: Task) -> None:
    torch.manual_seed(0)
    teachers = [GRUSeq2Seq(len(small.info["chars"]), small.num_classes, 16, 24).eval() for _ in range(2)]
    bank, _ = build_bank(small, [("a", teachers[0]), ("b", teachers[1])])
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-2, optimizer="adam", weight_decay=0.0, device="cpu",
                      progress=False)
    tr = Trainer(small, small.make_student(), HardGate(hard_level="token", hard_tau=1.5), bank, cfg)
    tr.run_epoch()
    d = tr.weight_diagnostics()
    real = small.train.mask.reshape(-1)
    w = tr.unit_weights[real]
    assert d["gate/teacher_share"] == pytest.approx(float(w[:, 1:].sum(1).mean()), abs=1e-6)
    assert 0.0 <= d["diag/auroc_teacher_share"] <= 1.0 and "diag/kd_on_right_teachers" in d
    assert len(w) == int(real.sum())


@pytest.mark.parametrize("gate", ["ce", "fixed", "hard"])
def test_distill_g2p_end_to_end(gate: str, tmp_path, capsys) -> None:
    rc = main(["distill", "--task", "g2p", "--subset", "150", "--noise", "0.1", "--gate", gate, "--teachers", "2",
               "--epochs", "2", "--optimizer", "adam", "--lr", "0.003", "--batch-size", "32", "--device", "cpu",
               "--no-progress", "--logdir", str(tmp_path / gate)])
    assert rc == 0
    out = capsys.readouterr().out
    for key in ("test/acc", "test/per", "test/wer", "test/ece", "test/sent_ece"):
        assert key in out
    import json

    m = json.loads((tmp_path / gate / "metrics.json").read_text())
    assert 0 < m["test/per"] < 10 and 0 <= m["test/wer"] <= 1 and math.isfinite(m["test/nll"])
    if gate != "ce":
        assert {"test_per", "test_wer"} <= set(m["teachers"][0])


def test_compare_on_g2p_has_the_sequence_table(tmp_path) -> None:
    """A compare on token units: PER/WER/sentence ECE summarised and paired to fixed (checked by hand), the
    reliability bins over the real test tokens, the weight histograms over the real training tokens."""
    import json

    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "g2p", "--subset", "150", "--noise", "0.1", "--teachers", "2", "--seeds", "0", "1",
               "--epochs", "2", "--optimizer", "adam", "--lr", "0.003", "--batch-size", "32", "--device", "cpu",
               "--threads", "1", "--no-progress", "--gates", "fixed", "hard", "--out", str(out)])
    assert rc == 0
    blob = json.loads((out / "results.json").read_text())
    rows = {(r["label"], r["seed"]): r for r in blob["rows"]}
    diff = [rows[("hard", s)]["metrics"]["test/per"] - rows[("fixed", s)]["metrics"]["test/per"] for s in (0, 1)]
    got = blob["summary"]["gates"]["hard"]["vs_fixed"]["test/per"]["t"]["mean"]
    assert got == pytest.approx(sum(diff) / 2, abs=1e-12)
    md = (out / "results.md").read_text()
    assert "## Sequences" in md and "| `hard` | 2 |" in md.split("## Sequences")[1]
    task = get_task("g2p", subset=150, noise=0.1)
    r = rows[("hard", 0)]
    assert sum(r["calibration"]["count"]) == int((task.test.y != PAD_ID).sum())
    assert sum(r["weights"]["label_clean"]) + sum(r["weights"]["label_corrupted"]) == int(task.train.mask.sum())
    assert (out / "reliability.png").exists()


def test_compare_on_g2p_with_the_hypergradient_credited_policy(tmp_path) -> None:
    """`reinforce:rl_credit=hypergradient` on token units runs end to end in a compare (one epoch, 150 words): the
    policy's rows are in the table beside fixed, with finite PER/WER and weights on the real training tokens."""
    import json

    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "g2p", "--subset", "150", "--noise", "0.1", "--teachers", "2", "--seeds", "0",
               "--epochs", "1", "--optimizer", "adam", "--lr", "0.003", "--batch-size", "32", "--device", "cpu",
               "--threads", "1", "--no-progress", "--gates", "fixed", "reinforce:rl_credit=hypergradient",
               "reinforce:rl_credit=hypergradient,rl_unit=word", "--out", str(out)])
    assert rc == 0
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    task = get_task("g2p", subset=150, noise=0.1)
    for label in ("reinforce:rl_credit=hypergradient", "reinforce:rl_credit=hypergradient,rl_unit=word"):
        r = rows[label]
        m = r["metrics"]
        assert r["gate"] == "reinforce" and r["options"]["rl_credit"] == "hypergradient"
        assert abs(m["diag/kd_share_teacher0_right"] - 0.5) > 1e-4  # the credited policy left equal weights
        assert 0 < m["test/per"] < 10 and 0 <= m["test/wer"] <= 1 and math.isfinite(m["test/nll"])
        assert sum(r["weights"]["label_clean"]) + sum(r["weights"]["label_corrupted"]) == int(task.train.mask.sum())
