"""TeacherWeightingEnv: both env checkers, registration, determinism, reward and weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_clean():
    from metagate.data import get_task

    return get_task("digits")


@pytest.fixture(scope="module")
def synth_bank(digits_clean):
    from metagate.envs.synthetic import synthetic_bank

    return synthetic_bank(digits_clean, accuracies=(0.95, 0.9), adversarial=True)


def make_env(task, bank, **kw):
    from metagate.envs import TeacherWeightingEnv

    kw.setdefault("batch_size", 32)
    kw.setdefault("episode_steps", 8)
    return TeacherWeightingEnv(task, bank, **kw)


def test_gymnasium_check_env(digits_clean, synth_bank):
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(make_env(digits_clean, synth_bank), skip_render_check=True)


def test_sb3_check_env(digits_clean, synth_bank):
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 mistakes a [B, K, F] float Box for an image
        check_env(make_env(digits_clean, synth_bank), warn=False)


def test_registered_and_makeable(digits_clean, synth_bank):
    import gymnasium

    import metagate  # noqa: F401  (registers the env)

    assert "metagate/TeacherWeighting-v0" in gymnasium.registry
    env = gymnasium.make("metagate/TeacherWeighting-v0", task=digits_clean, bank=synth_bank, batch_size=16,
                         episode_steps=3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (16, 3, 11) and obs.dtype == np.float32


def test_episode_reset_determinism_and_reward(digits_clean, synth_bank):
    env = make_env(digits_clean, synth_bank, episode_steps=5)
    obs0, info0 = env.reset(seed=3)
    obs1, info1 = env.reset(seed=3)
    np.testing.assert_array_equal(obs0, obs1)
    assert info0["student_seed"] == info1["student_seed"]
    _, info2 = env.reset(seed=4)
    assert info2["student_seed"] != info0["student_seed"]  # a fresh student per seed
    env.reset(seed=3)
    action = np.zeros(env.action_space.shape, np.float32)
    val0 = env._val
    truncated, steps, total = False, 0, 0.0
    while not truncated:
        obs, r, term, truncated, info = env.step(action)
        assert not term and np.isfinite(r)
        total += r
        steps += 1
    assert steps == 5
    assert total == pytest.approx(env.reward_scale * (val0 - info["val"]), rel=1e-4, abs=1e-5)
    assert total > 0  # equal weights on a fresh student: validation loss goes down
    w = info["teacher_weights"]
    np.testing.assert_allclose(w, 1 / 3, atol=1e-6)  # zero action = equal teacher weights


def test_action_mapping(digits_clean, synth_bank):
    env = make_env(digits_clean, synth_bank, alpha=0.2, temperature=0.25)
    a = np.zeros(env.action_space.shape, np.float32)
    a[:, 2] = -1.0
    a[:, 0] = 1.0
    w = env.weights_from_action(a)
    assert w.shape == (32, 4)
    torch.testing.assert_close(w.sum(1), torch.ones(32))
    torch.testing.assert_close(w[:, 0], torch.full((32,), 0.2))
    assert float(w[:, 3].max()) < 1e-3 and float(w[:, 1].min()) > 0.7
    big = env.weights_from_action(a * 10)  # out-of-box actions are clipped, not extrapolated
    torch.testing.assert_close(big, w)


def test_bad_options(digits_clean, synth_bank):
    from metagate.errors import ConfigError

    with pytest.raises(ConfigError):
        make_env(digits_clean, synth_bank, reward="f1")
    with pytest.raises(ConfigError):
        make_env(digits_clean, synth_bank, batch_size=10**6)
    with pytest.raises(ConfigError):
        make_env(digits_clean, synth_bank, alpha=1.5)


def test_env_step_equals_a_plain_trainer_step(digits_clean, synth_bank):
    """The env reuses its observation's forward for the update: same student as train_step's own forward."""
    from metagate.gates.base import GateOutput
    from metagate.gates.fixed import FixedGate
    from metagate.trainer import TrainConfig, Trainer

    env = make_env(digits_clean, synth_bank, episode_steps=6)
    _, info = env.reset(seed=5)
    rng = np.random.default_rng(0)
    batches, actions = [], []
    for _ in range(4):
        a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        batches.append(env._batch)
        actions.append(a)
        env.step(a)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(info["student_seed"])
        student = digits_clean.make_student()
    tr = Trainer(digits_clean, student, FixedGate(), synth_bank,
                 TrainConfig(seed=info["student_seed"], **env.train_config))
    tr.set_total_steps(env.episode_steps)
    for b, a in zip(batches, actions):
        tr.train_step(b, GateOutput(env.weights_from_action(a), env.tau))
    for (k, p), q in zip(tr.student.state_dict().items(), env.trainer.student.state_dict().values()):
        torch.testing.assert_close(p, q, msg=k)


def test_nan_action_is_reported_not_trained_on(digits_clean, synth_bank):
    from metagate.errors import InputError

    env = make_env(digits_clean, synth_bank)
    env.reset(seed=0)
    before = [p.detach().clone() for p in env.trainer.student.parameters()]
    action = np.zeros(env.action_space.shape, dtype=np.float32)
    action[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        env.step(action)
    for p, q in zip(before, env.trainer.student.parameters()):
        assert torch.equal(p, q)  # the failed step did not move the student


def test_env_config_and_keywords_build_the_same_env(digits_clean, synth_bank):
    """An env takes its options as keywords (gym.make) or as a built config; both give the same env."""
    import gymnasium

    import metagate  # noqa: F401
    from metagate.envs import TeacherWeightingEnv, TeacherWeightingEnvConfig, TemperatureEnvConfig
    from metagate.envs.instance_temperature import InstanceTemperatureEnv
    from metagate.errors import ConfigError

    cfg = TeacherWeightingEnvConfig(batch_size=16, episode_steps=3, alpha=0.2, tau=2.0, lr=0.1)
    a = TeacherWeightingEnv(digits_clean, synth_bank, config=cfg)
    b = gymnasium.make("metagate/TeacherWeighting-v0", task=digits_clean, bank=synth_bank, batch_size=16,
                       episode_steps=3, alpha=0.2, tau=2.0, lr=0.1).unwrapped
    assert a.config == b.config and (b.batch_size, b.alpha, b.tau, b.train_config["lr"]) == (16, 0.2, 2.0, 0.1)
    oa, _ = a.reset(seed=3)
    ob, _ = b.reset(seed=3)
    np.testing.assert_array_equal(oa, ob)
    t = InstanceTemperatureEnv(digits_clean, synth_bank, batch_size=8, t_min=2.0, t_max=6.0)  # old keyword names
    assert t.config == TemperatureEnvConfig(batch_size=8, temp_min=2.0, temp_max=6.0) and t.tau == 4.0
    with pytest.raises(ConfigError, match="not both"):
        InstanceTemperatureEnv(digits_clean, synth_bank, config=t.config, batch_size=8)
    with pytest.raises(ConfigError, match="tau"):
        InstanceTemperatureEnv(digits_clean, synth_bank, tau=3.0)  # an option of the other env


def test_train_policy_flags_are_generated_from_the_configs():
    """Every env and agent option is a train-policy flag, written once: the help of --lr is TrainConfig's,
    --alpha's is the gate's; an option of the other env is refused by name."""
    from metagate.cli import build_parser
    from metagate.envs import EnvConfig, TeacherWeightingEnvConfig, TemperatureEnvConfig
    from metagate.errors import ConfigError
    from metagate.gates.fixed import KDMixConfig
    from metagate.options import flag
    from metagate.train_policy import AgentConfig, agent_config_from_args, env_config_from_args
    from metagate.trainer import TrainConfig

    p = build_parser()
    sub = next(a for a in p._actions if getattr(a, "choices", None) and "train-policy" in a.choices)
    tp = sub.choices["train-policy"]
    flags = {o: a for a in tp._actions for o in a.option_strings}
    for cls in (EnvConfig, TeacherWeightingEnvConfig, TemperatureEnvConfig, AgentConfig):
        for n in cls.option_names():
            assert flag(n) in flags, n
    helps = {f.name: f.metadata["help"] for cls in (TrainConfig, KDMixConfig) for f in cls.option_fields()}
    assert flags["--lr"].help.startswith(helps["lr"]) and flags["--alpha"].help.startswith(helps["alpha"])
    assert "(default: 64)" in flags["--batch-size"].help  # the env's own default, TrainConfig's help
    args = p.parse_args(["train-policy", "--env", "temperature", "--temp-min", "2", "--lr", "0.2", "--timesteps",
                         "7", "--out", "x.zip"])
    cfg = env_config_from_args(args)
    assert isinstance(cfg, TemperatureEnvConfig) and (cfg.temp_min, cfg.lr, cfg.device) == (2.0, 0.2, "cpu")
    assert agent_config_from_args(args).timesteps == 7
    with pytest.raises(ConfigError, match="--temperature: an option of --env weights"):
        env_config_from_args(p.parse_args(["train-policy", "--env", "temperature", "--temperature", "1",
                                           "--out", "x.zip"]))
    with pytest.raises(ConfigError, match="--n-steps"):
        agent_config_from_args(p.parse_args(["train-policy", "--n-steps", "1", "--out", "x.zip"]))


def test_every_train_policy_flag_reaches_the_env_or_the_agent():
    """A data flag of train-policy is an env option (no flag is read and then dropped): --subset, --noise-type,
    --val-fraction, --topk and --teacher-file reach the env's config and the run config its task loads from."""
    from metagate.cli import build_parser
    from metagate.envs import EnvConfig, TeacherWeightingEnvConfig, TemperatureEnvConfig
    from metagate.options import flag
    from metagate.train_policy import AgentConfig, env_config_from_args

    p = build_parser()
    sub = next(a for a in p._actions if getattr(a, "choices", None) and "train-policy" in a.choices)
    tp = sub.choices["train-policy"]
    used = set().union(*(c.option_names() for c in (EnvConfig, TeacherWeightingEnvConfig, TemperatureEnvConfig,
                                                     AgentConfig)))
    own = {"help", "env", "out", "logdir", "verbose", "task", "progress"}
    # the lm task's own options reach the env as its task options (plugin_task_options), checked below
    from metagate.data.lm import LMConfig
    lm_only = LMConfig.option_names() - used
    assert {a.dest for a in tp._actions} - own <= used | lm_only
    lm = env_config_from_args(p.parse_args(["train-policy", "--task", "lm", "--lm-seq-len", "8", "--lm-documents",
                                            "6", "--lm-doc-tokens", "40", "--lm-teacher", "tiny-random",
                                            "--lm-corpus", "pydoc-topics", "--out", "x.zip"]))
    assert lm.plugin_task_options == {"lm_seq_len": 8, "lm_documents": 6, "lm_doc_tokens": 40,
                                      "lm_teacher": "tiny-random", "lm_corpus": "pydoc-topics"}
    assert lm_only == set(lm.plugin_task_options)
    args = p.parse_args(["train-policy", "--task", "g2p", "--subset", "150", "--noise", "0.2", "--noise-type", "word",
                         "--val-fraction", "0.2", "--topk", "8", "--teacher-file", "a=x.npy", "--g2p-no-stress",
                         "--env", "temperature", "--out", "x.zip"])
    cfg = env_config_from_args(args)
    assert (cfg.subset, cfg.noise_type, cfg.val_fraction, cfg.topk, cfg.teacher_file, cfg.g2p_no_stress) == \
        (150, "word", 0.2, 8, ("a=x.npy",), True)
    run = cfg.data_config("g2p")
    opts = run.task_config()
    assert (run.task, opts.subset, run.noise, run.noise_type, run.val_fraction, opts.topk, opts.g2p_no_stress) == \
        ("g2p", 150, 0.2, "word", 0.2, 8, True)
    assert flag("subset") in {o for a in tp._actions for o in a.option_strings}
