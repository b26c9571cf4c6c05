"""Options written once: the config dataclasses give the flags, the YAML keys, the API and HPARAMS."""

from __future__ import annotations

import re

import pytest

from metagate.cli import build_parser
from metagate.cli_args import config_from_args, gate_config_classes
from metagate.errors import ConfigError
from metagate.gates import GATES, get_gate_class
from metagate.options import flag
from metagate.run import DistillConfig, build_gate
from metagate.trainer import TrainConfig

#: one option of each gate, with a non-default value
GATE_OPTION = {"fixed": ("alpha", 0.2), "hard": ("hard_tau", 2.5), "meta": ("meta_param", "net"),
               "reinforce": ("rl_hidden", 8), "policy": ("online", True), "meta+policy": ("meta_columns", "split")}


def _cfg(tmp_path, text: str, *argv: str) -> DistillConfig:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return config_from_args(build_parser().parse_args(["distill", "--config", str(path), *argv]))


@pytest.mark.parametrize("gate", sorted(GATE_OPTION))
@pytest.mark.parametrize("spelling", ["flat", "gate_options"])
def test_yaml_sets_gate_options_for_each_gate(tmp_path, gate, spelling):
    name, value = GATE_OPTION[gate]
    v = str(value).lower() if isinstance(value, bool) else value
    body = f"{name}: {v}" if spelling == "flat" else f"gate_options:\n  {name}: {v}"
    cfg = _cfg(tmp_path, f"gate: {gate}\n{body}\n")
    assert cfg.gate == gate
    assert getattr(cfg.gate_config(), name) == value
    if gate in ("fixed", "hard", "meta", "reinforce"):  # built here without a policy zip
        assert build_gate(cfg.gate, cfg.gate_options).hparams()[name] == value


def test_yaml_alpha_reaches_the_fixed_gate(tmp_path):
    gate = build_gate(*(lambda c: (c.gate, c.gate_options))(_cfg(tmp_path, "alpha: 0.2\n")))
    assert gate.alpha == 0.2
    gate = build_gate(*(lambda c: (c.gate, c.gate_options))(_cfg(tmp_path, "gate_options: {alpha: 0.2}\n")))
    assert gate.alpha == 0.2


def test_command_line_wins_over_yaml(tmp_path):
    cfg = _cfg(tmp_path, "alpha: 0.2\nepochs: 3\n", "--alpha", "0.7")
    assert cfg.gate_options["alpha"] == 0.7 and cfg.train.epochs == 3


@pytest.mark.parametrize("text,names", [
    ("gate: meta\nalpha: 0.2\n", ["alpha", "fixed"]),            # an option of another gate
    ("gate: fixed\nmeta_lr: 0.1\n", ["meta_lr", "meta"]),
    ("gate: fixed\ngate_options: {hard_tau: 2}\n", ["hard_tau", "hard"]),
    ("gate: hard\nfoo: 1\n", ["foo"]),                            # an option of no gate
    ("gate_options: {foo: 1}\n", ["foo", "no gate"]),
])
def test_yaml_option_of_another_gate_is_a_clear_error(tmp_path, text, names):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, text)
    for n in names:
        assert n in str(e.value)


def test_command_line_option_of_another_gate_is_an_error():
    with pytest.raises(ConfigError, match="hard_tau"):
        config_from_args(build_parser().parse_args(["distill", "--gate", "meta", "--hard-tau", "2"]))


@pytest.mark.parametrize("text,key", [
    ('noise: "lots"\n', "--noise"), ('epochs: "two"\n', "--epochs"), ('lr: "0.1"\n', "--lr"),
    ("teachers: [1, 2]\n", "--teachers"), ("epochs: 2.7\n", "--epochs"), ("epochs: true\n", "--epochs"),
    ("alpha: .nan\n", "--alpha"), ("tau: .inf\n", "--tau"), ("momentum: -5\n", "--momentum"),
    ("weight_decay: .nan\n", "--weight-decay"), ("rl_hidden: 0\ngate: reinforce\n", "--rl-hidden"),
    ("meta_param: grid\ngate: meta\n", "--meta-param"), ("epochs: 0\n", "--epochs"),
    ("seed: 100000000000000000000000\n", "--seed"),
])
def test_typed_values(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        _cfg(tmp_path, text)


def test_alias_bomb_is_refused(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    lines.append("adversarial_teacher: *i")
    with pytest.raises(ConfigError, match="expands"):
        _cfg(tmp_path, "\n".join(lines) + "\n")


def test_help_lists_every_option_once_with_its_default():
    sub = build_parser()._subparsers._group_actions[0].choices["distill"]  # noqa: SLF001
    text = sub.format_help()
    assert "(default: 0.5) (default: 0.5)" not in text
    names = set(DistillConfig.option_names()) - {"gate", "logdir", "resume", "overwrite"}
    names |= TrainConfig.option_names() - {"progress", "eval_test_every_epoch"}
    for cls in gate_config_classes():
        names |= cls.option_names()
    for name in sorted(names):
        hits = re.findall(rf"^\s+{re.escape(flag(name))}(?=[\s,])", text, flags=re.M)
        assert len(hits) == 1, (name, len(hits))
    for line_block in re.split(r"\n(?=\s{2}--)", text):
        if line_block.strip().startswith("--") and "--help" not in line_block:
            assert line_block.count("(default:") <= 1, line_block
    assert "(default: 1500" not in text and "(default: unset)" in text  # unset options say so


def test_every_gate_declares_a_config_and_hparams_come_from_it():
    for name, cls in GATES.items():
        assert cls.config_class.option_names() <= set(get_gate_class(name).config_class.option_names())
    gate = build_gate("meta", {"meta_param": "net"})
    hp = gate.hparams()
    assert hp["meta_param"] == "net" and hp["meta_lr"] == 1e-3 and hp["meta_backend"] == "func"


def test_policy_default_rl_lr_is_one_value():
    from metagate.gates.policy import PolicyConfig, ReinforceConfig, RLConfig

    assert RLConfig().rl_lr == ReinforceConfig().rl_lr == PolicyConfig().rl_lr == 1e-2
