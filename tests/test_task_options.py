"""Tasks own their options (issue 25): a TaskConfig per task, flags and YAML keys generated from it, an option
of another task refused with the task that takes it, a plugin task's own options; and the one ``--topk`` rule
and ``--temp-online`` without a policy (issue 26)."""

from __future__ import annotations

import importlib
import sys

import pytest

from metagate.cli import build_parser, config_from_args, main
from metagate.data import TaskConfig, task_config, task_config_class
from metagate.data.builtin import DigitsConfig, FashionConfig
from metagate.data.g2p import G2PConfig
from metagate.errors import ConfigError
from metagate.run import DistillConfig, load_task, task_key


def _cfg(*argv: str) -> DistillConfig:
    return config_from_args(build_parser().parse_args(["distill", *argv]))


def test_each_task_has_its_config_and_the_run_config_none_of_their_fields():
    assert (task_config_class("digits"), task_config_class("fashion"), task_config_class("g2p")) == \
        (DigitsConfig, FashionConfig, G2PConfig)
    assert DigitsConfig.option_names() == set()
    assert FashionConfig.option_names() == {"data_dir"}
    assert G2PConfig.option_names() == {"subset", "g2p_all_words", "g2p_no_stress", "topk"}
    assert not DistillConfig.option_names() & (FashionConfig.option_names() | G2PConfig.option_names())


def test_the_old_flags_and_yaml_keys_reach_the_task(tmp_path):
    cfg = _cfg("--task", "g2p", "--subset", "150", "--g2p-no-stress", "--topk", "8")
    assert cfg.task_options == {"subset": 150, "g2p_no_stress": True, "topk": 8}
    opts = cfg.task_config()
    assert (opts.subset, opts.g2p_all_words, opts.g2p_no_stress, opts.topk, cfg.topk) == (150, False, True, 8, 8)
    assert opts.builder_kwargs() == {"no_stress": True, "subset": 150}
    assert G2PConfig(g2p_all_words=True).builder_kwargs() == {"no_stress": False, "subset": None}
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("task: g2p\nsubset: 150\ng2p-no-stress: true\ntopk: 8\n")
    nested.write_text("task: g2p\ntask_options:\n  subset: 150\n  g2p-no-stress: true\n  topk: 8\n")
    for path in (flat, nested):
        assert _cfg("--config", str(path)).task_options == cfg.task_options
    assert _cfg("--config", str(flat), "--subset", "200").task_options["subset"] == 200  # a set flag wins
    fashion = _cfg("--task", "fashion", "--data-dir", "/x")
    assert fashion.task_options == {"data_dir": "/x"} and fashion.task_config().data_dir == "/x"
    assert fashion.topk is None and DistillConfig().topk is None
    hp = cfg.hparams(type("G", (), {"hparams": lambda self: {}})())
    assert (hp["subset"], hp["topk"], hp["g2p_no_stress"]) == (150, 8, True)  # HPARAMS keep the task's options


def test_an_option_of_another_task_names_the_task_that_takes_it(capsys):
    with pytest.raises(ConfigError, match=r"task 'digits' does not take option\(s\) --topk \(an option of task "
                                          r"g2p, lm\); it takes: no options of its own"):
        _cfg("--task", "digits", "--topk", "8")
    with pytest.raises(ConfigError, match=r"task 'g2p' does not take option\(s\) --data-dir \(an option of task "
                                          r"fashion\); it takes: --g2p-all-words, --g2p-no-stress, --subset, --topk"):
        DistillConfig(task="g2p", task_options={"data_dir": "/x"})
    with pytest.raises(ConfigError, match=r"--frobnicate \(no task takes it\)"):
        task_config("digits", {"frobnicate": 1})
    assert main(["distill", "--task", "fashion", "--subset", "10"]) == 2
    assert "task 'fashion' does not take option(s) --subset (an option of task g2p)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="task_options must be a mapping"):
        DistillConfig(task="g2p", task_options=[("subset", 3)])
    with pytest.raises(ConfigError, match=r"--subset \(G2PConfig\) must be an integer, got 'many'"):
        DistillConfig(task="g2p", task_options={"subset": "many"})
    with pytest.raises(ConfigError, match="--subset 5 and --g2p-all-words exclude each other"):
        _cfg("--task", "g2p", "--subset", "5", "--g2p-all-words")


def test_task_key_covers_the_task_options():
    a = DistillConfig(task="g2p", task_options={"subset": 150})
    b = DistillConfig(task="g2p", task_options={"subset": 151})
    assert task_key(a) != task_key(b) and task_key(a) == task_key(DistillConfig(task="g2p", task_options={"subset": 150}))
    hash(task_key(a))


def test_topk_at_or_above_the_vocabulary_is_refused_for_every_gate_before_any_teacher(tmp_path):
    """One rule: a --topk that is >= the phoneme vocabulary is refused whenever given, with a teacher gate or the
    ce gate (which reads no teacher), when the task loads: before any teacher is trained."""
    for gate in ("ce", "fixed"):
        cfg = _cfg("--task", "g2p", "--subset", "150", "--topk", "100000", "--gate", gate,
                   "--cache-dir", str(tmp_path / "cache"))
        with pytest.raises(ConfigError, match=r"--topk must be in \[1, V\) = \[1, \d+\) for a vocabulary of "
                                              r"\d+ tokens, got 100000"):
            load_task(cfg)
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached
    task = load_task(_cfg("--task", "g2p", "--subset", "150", "--topk", "8"))
    with pytest.raises(ConfigError, match=rf"= \[1, {task.num_classes}\) .* got {task.num_classes}"):
        load_task(_cfg("--task", "g2p", "--subset", "150", "--topk", str(task.num_classes)))
    load_task(_cfg("--task", "g2p", "--subset", "150", "--topk", str(task.num_classes - 1)))  # the largest k


def test_temp_online_without_a_policy_is_refused():
    with pytest.raises(ConfigError, match="--temp-online keeps a deployed --temp-policy learning; without "
                                          "--temp-policy"):
        _cfg("--gate", "temperature", "--temp-online")
    with pytest.raises(ConfigError, match="--temp-online"):
        _cfg("--gate", "hard+temperature", "--temp-online")
    assert _cfg("--gate", "temperature", "--temp-online", "--temp-policy", "p.zip").gate_options == \
        {"temp_online": True, "temp_policy": "p.zip"}


PLUGIN = '''
from dataclasses import dataclass

import torch

from metagate.data import TaskConfig, build_task
from metagate.errors import ConfigError
from metagate.models import MLP
from metagate.options import option


@dataclass
class RingsConfig(TaskConfig):
    """rings: how many classes."""

    rings: int = option(2, "rings: number of concentric rings (classes)")

    def __post_init__(self):
        super().__post_init__()
        if self.rings < 2:
            raise ConfigError(f"--rings must be >= 2, got {self.rings}")


def build(noise=0.0, noise_type="symmetric", data_seed=0, val_fraction=0.1, rings=2):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60 * rings) % rings
    angle = torch.rand(len(y), generator=g) * 6.2832
    x = torch.stack([(y + 1) * angle.cos(), (y + 1) * angle.sin()], 1)
    return build_task("rings", x[::2], y[::2], x[1::2], y[1::2], rings, {"mlp": lambda: MLP(2, (8,), rings)}, [],
                      noise=noise, noise_type=noise_type, data_seed=data_seed, val_fraction=val_fraction)


build.config_class = RingsConfig


def plain(data_dir=None, **kw):
    """A builder that declares no options: it takes --data-dir, as plugin builders always could."""
    task = build(**kw)
    task.name = f"plain-{data_dir}"
    return task
'''


@pytest.fixture
def rings(tmp_path, monkeypatch):
    """A task plugin with an option of its own, importable as ``rings_plugin:build`` and installed as ``rings``."""
    (tmp_path / "rings_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "rings_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rings-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[metagate.tasks]\nrings = rings_plugin:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("rings_plugin", None)


def test_a_plugin_task_declares_its_options(rings, tmp_path, capsys):
    # installed: a flag of its own, in --help, reaching the builder
    cfg = _cfg("--task", "rings", "--rings", "3")
    assert cfg.task_options == {"rings": 3} and load_task(cfg).num_classes == 3
    assert load_task(_cfg("--task", "rings")).num_classes == 2  # the option's default
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "--rings RINGS" in capsys.readouterr().out
    # named as module:builder: a YAML key and task_options (its flags exist only for installed tasks)
    yml = tmp_path / "r.yaml"
    yml.write_text("task: rings_plugin:build\nrings: 4\n")
    assert load_task(_cfg("--config", str(yml))).num_classes == 4
    assert load_task(DistillConfig(task="rings_plugin:build", task_options={"rings": 5})).num_classes == 5
    # its own checks, and another task's option, refused
    with pytest.raises(ConfigError, match="--rings must be >= 2, got 1"):
        DistillConfig(task="rings", task_options={"rings": 1})
    with pytest.raises(ConfigError, match=r"task 'rings' does not take option\(s\) --subset \(an option of task g2p\); "
                                          r"it takes: --rings"):
        _cfg("--task", "rings", "--subset", "3")
    with pytest.raises(ConfigError, match=r"task 'g2p' does not take option\(s\) --rings \(an option of task rings\)"):
        _cfg("--task", "g2p", "--rings", "3")


def test_a_plugin_tasks_options_reach_the_train_policy_env(rings):
    from metagate.envs.config import TeacherWeightingEnvConfig, env_config
    from metagate.train_policy import env_config_from_args, make_env_kwargs

    args = build_parser().parse_args(["train-policy", "--task", "rings", "--rings", "3", "--out", "x.zip"])
    cfg = env_config_from_args(args)
    assert cfg.plugin_task_options == {"rings": 3}
    run = cfg.data_config("rings")
    assert run.task_options == {"rings": 3} and load_task(run).num_classes == 3
    kwargs = make_env_kwargs(args)
    assert env_config(TeacherWeightingEnvConfig, None, kwargs).plugin_task_options == {"rings": 3}


def test_a_plugin_without_a_config_takes_data_dir_only(rings):
    from metagate.data.builtin import DataDirConfig

    assert task_config_class("rings_plugin:plain") is DataDirConfig
    assert load_task(DistillConfig(task="rings_plugin:plain", task_options={"data_dir": "/d"})).name == "plain-/d"
    with pytest.raises(ConfigError, match=r"task 'rings_plugin:plain' does not take option\(s\) --rings"):
        DistillConfig(task="rings_plugin:plain", task_options={"rings": 3})
    with pytest.raises(ConfigError, match=r"unknown task 'nope'"):
        DistillConfig(task="nope")  # when the config is built, not when the run starts


def test_register_task_takes_a_config_class_only():
    from metagate.data import register_task

    with pytest.raises(ConfigError, match="config must be a TaskConfig subclass"):
        register_task("bad", config=dict)  # type: ignore[arg-type]
    assert issubclass(G2PConfig, TaskConfig)


def test_a_compare_cell_saved_before_task_options_still_matches():
    """A compare cell.json written when g2p's options were DistillConfig fields is read in today's form (the
    set ones in task_options), so an old --out resumes instead of reporting changed options."""
    from dataclasses import asdict

    from metagate.compare.grid import with_new_defaults
    from metagate.run import upgrade_saved_config

    now = DistillConfig(task="g2p", task_options={"subset": 150, "topk": 8})
    old = {k: v for k, v in asdict(now).items() if k != "task_options"}
    old.update(data_dir=None, subset=150, g2p_all_words=False, g2p_no_stress=False, topk=8)
    assert upgrade_saved_config(old) == asdict(now)
    assert with_new_defaults(old, now) == asdict(now)
    digits = asdict(DistillConfig())
    old_digits = {k: v for k, v in digits.items() if k != "task_options"}
    old_digits.update(data_dir=None, subset=None, g2p_all_words=False, g2p_no_stress=False, topk=None)
    assert with_new_defaults(old_digits, DistillConfig()) == digits
