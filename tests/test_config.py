"""Flags and the run configuration: Garfield's trainer flags, booleans, start-time refusals."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from byzsgd.config import (RunConfig, add_arguments, config_from_args, parse_bool, parse_host_port,
                           parse_json_object)
from byzsgd.errors import ConfigError, ResilienceError
from byzsgd.deploy.trainer_cli import build_parser as trainer_parser
from byzsgd.deploy.trainer_cli import environment_rank_and_master

GARFIELD_ARGV = ["--master", "localhost", "--rank", "0", "--dataset", "mnist", "--batch", "32",
                 "--num_ps", "4", "--num_workers", "7", "--fw", "1", "--fps", "1", "--model", "convnet",
                 "--loss", "nll", "--optimizer", "sgd", "--opt_args", '{"lr":"0.1","momentum":"0.9"}',
                 "--num_iter", "200", "--gar", "median", "--acc_freq", "50", "--bench", "false",
                 "--log", "true"]


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                        ("false", False), ("False", False), ("0", False), ("no", False)])
def test_parse_bool(text, value):
    assert parse_bool(text) is value


def test_parse_bool_rejects_garbage():
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bool("maybe")


def test_garfield_flags_parse_exactly():
    args = trainer_parser().parse_args(GARFIELD_ARGV)
    cfg = config_from_args(args)
    assert cfg.bench is False and cfg.log is True  # not bool("false")
    assert cfg.opt_args == {"lr": "0.1", "momentum": "0.9"}
    assert (cfg.num_ps, cfg.num_workers, cfg.fw, cfg.fps) == (4, 7, 1, 1)
    assert cfg.q_w == 6 and cfg.q_ps == 3 and cfg.is_ps and cfg.role == "ps"
    cfg.check_resilience()  # median with 6 inputs, f=1 and 3 inputs, f=1 is fine


def test_rank_role_split():
    cfg = RunConfig(rank=4, num_ps=4, num_workers=7)
    assert not cfg.is_ps and cfg.worker_index == 0 and cfg.worker_ranks == list(range(4, 11))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(rank=11, num_ps=4, num_workers=7), "--rank 11 out of range"),
    (dict(num_ps=4, num_workers=7, fw=7), "--fw"),
    (dict(num_ps=4, num_workers=7, fps=4), "--fps"),
    (dict(batch=0), "--batch"),
    (dict(mode="fast"), "--mode"),
    (dict(tls_cert="a.pem"), "--tls_cert"),
])
def test_bad_configs_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        RunConfig(**kwargs)


def test_resilience_refused_at_start_names_rule_n_f_bound():
    cfg = RunConfig(num_ps=1, num_workers=5, fw=2, gar="krum")
    with pytest.raises(ResilienceError) as err:
        cfg.check_resilience()
    msg = str(err.value)
    assert "krum" in msg and "n=3" in msg and "f=2" in msg  # q_w = 5 - 2 = 3 inputs


def test_model_quorum_checked_too():
    cfg = RunConfig(num_ps=3, num_workers=7, fw=1, fps=1, gar="median")
    with pytest.raises(ResilienceError, match="n=2"):  # q_ps = 2 models with f=1
        cfg.check_resilience()


def test_json_and_host_port():
    assert parse_json_object('{"lr": 0.1}') == {"lr": 0.1}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_json_object("[1]")
    assert parse_host_port("h") == ("h", 29500)
    assert parse_host_port("h:1234") == ("h", 1234)
    assert parse_host_port("[::1]:99") == ("::1", 99)
    with pytest.raises(ConfigError):
        parse_host_port("h:notaport")


def test_secret_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("BYZSGD_SECRET", raising=False)
    monkeypatch.delenv("BYZSGD_SECRET_FILE", raising=False)
    path = tmp_path / "s"
    path.write_text("file-secret\n")
    assert RunConfig(secret_file=str(path)).secret() == b"file-secret"
    monkeypatch.setenv("BYZSGD_SECRET", "env-secret")
    assert RunConfig().secret() == b"env-secret"
    with pytest.raises(ConfigError, match="cannot read"):
        RunConfig(secret_file=str(tmp_path / "missing")).secret()


def test_torchrun_and_slurm_environment():
    p = trainer_parser()
    args = p.parse_args(["--num_ps", "2", "--num_workers", "3"])
    environment_rank_and_master(args, {"RANK": "3", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4000"})
    assert args.rank == 3 and args.master == "10.1.2.3:4000"
    args = p.parse_args(["--num_ps", "2", "--num_workers", "3"])
    environment_rank_and_master(args, {"SLURM_PROCID": "1"})
    assert args.rank == 1


def test_every_flag_has_help():
    p = argparse.ArgumentParser()
    add_arguments(p)
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest


# -- one configuration object: flags round-trip, everything refused at start --------------------
def _every_flag_set() -> RunConfig:
    """A configuration with every flag away from its default (paper --sync so that the
    mode-specific flags are legal)."""
    return RunConfig(master="10.0.0.1:4000", rank=2, dataset="synthetic:1x8x8:4", batch=7, num_ps=4,
                     num_workers=7, fw=1, fps=1, model="cifarnet", loss="cross-entropy",
                     optimizer="sgd", opt_args={"lr": "0.05", "momentum": 0.9}, num_iter=11,
                     gar="median", acc_freq=3, bench=True, log=True, mode="paper",
                     gar_args={}, model_gar="median", gather_period=3, peers="/x/deployment.json",
                     data_root="/data", split="dirichlet:0.5", seed=9, eval_samples=100,
                     metrics="/x/m.jsonl", listen_host="127.0.0.2", advertise_host="h", port=1234,
                     secret_file="/s", insecure_shared_secret=True, bind_address=False, tls_cert="c.pem", tls_key="k.pem", tls_ca="ca.pem",
                     step_timeout=5.5, resend_after=0.25, startup_timeout=1e-3, attack="ipm",
                     attack_args={"epsilon": 0.5, "collude": True}, threads=2,
                     drop_nonfinite=False, checkpoint_dir="/ck", checkpoint_every=4, resume=True,
                     sync=True, lipschitz_quantile=0.5, lipschitz_warmup=2, lipschitz_window=9,
                     outliers_factor=7.5, pull_timeout=0.5, log_diameter=False,
                     strict_resilience=True, pre_agg="clipping:tau=5,nnm",
                     model_pre_agg="clipping", worker_momentum=0.5, lipschitz_l=0.5,
                     lipschitz_history="window", outliers_bound="authors", device="cuda:1",
                     wm_rows="recent", wm_staleness=5, check_tolerance=0.01)


def test_every_flag_round_trips_through_argv():
    from byzsgd.flags import flag_fields, default_of

    cfg = _every_flag_set()
    unset = [f.name for f, _ in flag_fields(RunConfig) if getattr(cfg, f.name) == default_of(f)]
    # the test covers every flag (--sync needs the default optimizer; median takes no gar_args;
    # --credentials excludes --insecure_shared_secret: round-tripped below; --check_gradients
    # and --scheduled_byzantine are garfield-mode only: round-tripped below)
    assert unset == ["optimizer", "gar_args", "check_gradients", "credentials", "scheduled_byzantine"], unset
    garfield = dataclasses.replace(cfg, mode="garfield", sync=False, gather_period="auto",
                                   lipschitz_quantile=None, check_gradients=2)
    assert RunConfig.from_argv(garfield.to_argv()) == garfield
    with_creds = RunConfig.from_argv(dataclasses.replace(cfg, insecure_shared_secret=False,
                                                         credentials="/c/rank2.cred").to_argv())
    assert with_creds.credentials == "/c/rank2.cred" and not with_creds.insecure_shared_secret
    argv = cfg.to_argv()
    assert RunConfig.from_argv(argv) == cfg
    other = RunConfig(optimizer="adam", num_workers=3, gar="geometric_median", gar_args={"eps": 1e-5})
    assert RunConfig.from_argv(other.to_argv()) == other
    assert RunConfig.from_argv(RunConfig(rank=0).to_argv()) == RunConfig(rank=0)
    # the trainer's parser reads the same argv to the same object
    assert config_from_args(trainer_parser().parse_args(argv)) == cfg


def test_launch_config_round_trips_and_harness_values_match_flags():
    from byzsgd.deploy.options import LaunchConfig

    lc = LaunchConfig.from_argv(["--num_iter", "5", "--byz_workers", "1", "--worker_attack", "alie",
                                 "--worker_attack_args", '{"collude": true}', "--json", "--spawn", "exec"])
    assert lc.json and lc.spawn == "exec" and lc.run.num_iter == 5 and lc.run.num_ps == 4
    assert LaunchConfig.from_argv(lc.to_argv()) == lc
    assert LaunchConfig.from_values(dict(num_iter="5", byz_workers=1, worker_attack="alie",
                                         worker_attack_args={"collude": True}, json=True,
                                         spawn="exec")) == lc


def test_gar_args_checked_against_the_rule():
    RunConfig(gar="trimmed_mean", gar_args={}).validate()
    RunConfig(num_workers=3, gar="geometric_median", gar_args={"eps": 1e-5}).validate()
    with pytest.raises(ConfigError, match="--gar_args.*'median'.*'bogus'"):
        RunConfig(gar_args={"bogus": 1}).validate()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(rank=1, num_workers=2, attack="alie", attack_args={"nope": 1}), "unknown arguments \\['nope'\\]"),
    (dict(rank=1, num_workers=2, attack="teleport"), "unknown worker attack 'teleport'"),
    (dict(rank=0, attack="stale", attack_args={"lag": "soon"}), "PS attack 'stale'.*lag"),
    (dict(rank=0, attack="stale", attack_args={"wrong": 1}), "unknown arguments \\['wrong'\\]"),
    (dict(rank=1, num_workers=2, attack="silent", attack_args={"z": 1}), "unknown arguments \\['z'\\]"),
])
def test_bad_attack_refused_by_validate(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**kwargs).validate()


def test_every_worker_role_arg_accepted():
    from byzsgd.roles.byzantine import WORKER_ROLE_ARGS

    args = dict(estimate="fresh", estimate_batches=3, collude=True, search_every=2, meta={},
                momentum_aware=False)
    assert set(args) == set(WORKER_ROLE_ARGS)
    RunConfig(rank=1, num_workers=2, attack="optimal_alie", attack_args=args).validate()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(gather_period=5), "--gather_period 5 needs --mode paper"),
    (dict(mode="paper", num_ps=4, fps=1, num_workers=4, fw=1, pull_timeout=3.0), "--pull_timeout 3.0 needs"),
    (dict(lipschitz_window=9), "--lipschitz_window 9 needs"),
])
def test_mode_flags_refused_outside_their_mode(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**kwargs).validate()


@pytest.mark.parametrize("flags,needle", [
    (["--gar_args", '{"bogus": 1}'], "bogus"),
    (["--byz_workers", "1", "--worker_attack", "alie", "--worker_attack_args", '{"zz": 1}'], "zz"),
    (["--sync", "true"], "--sync"),
    (["--gather_period", "4"], "--gather_period"),
])
def test_launcher_refuses_at_start_with_exit_code_2(tmp_path, flags, needle):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "byzsgd.launch", "--run_dir", str(tmp_path / "run"),
                           *flags], capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "byzsgd.launch: error:" in proc.stderr and needle in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_nll_on_a_logit_model_warns_and_a_fitting_loss_does_not():
    import warnings

    from byzsgd.config import LossModelMismatch

    with pytest.warns(LossModelMismatch, match="cross-entropy"):
        RunConfig(model="resnet18", dataset="synthetic:3x32x32:10", loss="nll").validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossModelMismatch)
        RunConfig(model="resnet18", dataset="synthetic:3x32x32:10", loss="cross-entropy").validate()
        RunConfig(model="convnet", loss="nll").validate()
        RunConfig(model="linear", loss="nll").validate()


def test_validated_config_is_checked_once_and_immutable(monkeypatch):
    from byzsgd.config import ValidatedConfig

    calls = []
    real = RunConfig.check_all
    monkeypatch.setattr(RunConfig, "check_all", lambda self: (calls.append(self.rank), real(self))[1])
    raw = RunConfig(num_workers=4, fw=1, gar="krum")  # cheap checks only: built
    with pytest.raises(ResilienceError):
        raw.validate()
    cfg = RunConfig(num_workers=4, fw=1).validate()
    assert isinstance(cfg, ValidatedConfig) and calls == [0, 0]
    assert cfg.validate() is cfg and ValidatedConfig.of(cfg) is cfg and calls == [0, 0]
    cfg.check_resilience()  # what a role calls: free on a validated one
    assert calls == [0, 0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_iter = 5
    with pytest.raises(ResilienceError):  # a change is a new object, checked again
        dataclasses.replace(cfg, gar="krum")
    assert dataclasses.replace(cfg, rank=1).rank == 1 and calls[-1] == 1


def test_every_flag_round_trips_through_json():
    cfg = _every_flag_set()
    assert RunConfig.from_json(cfg.to_json()) == cfg
    other = RunConfig(optimizer="adam", num_workers=3, gar="geometric_median", gar_args={"eps": 1e-5})
    assert RunConfig.from_json(other.to_json()) == other
    with pytest.raises(ConfigError, match="no flag field 'bogus'"):
        RunConfig.from_json('{"byzsgd_config": 1, "fields": {"bogus": 1}}')
    with pytest.raises(ConfigError, match="format 1"):
        RunConfig.from_json('{"fields": {}}')
    with pytest.raises(ConfigError, match="batch: expected a int"):
        RunConfig.from_json('{"byzsgd_config": 1, "fields": {"batch": [3]}}')


def test_launcher_validates_every_rank_once(monkeypatch, tmp_path):
    """Each rank's configuration is checked on its own rank, once (the pre-start check and the
    layout share it): a Byzantine worker's argument that names its own rank is refused before
    the start (checking the last worker only, as the launcher did, let rank 9 fail at start)."""
    from byzsgd.config import ValidatedConfig
    from byzsgd.deploy.options import LaunchConfig

    lc = LaunchConfig.from_argv(["--byz_workers", "2", "--worker_attack", "withhold_from",
                                 "--worker_attack_args", '{"ranks": [9]}'])
    lc.node_config(10).validate()  # the last worker alone is fine
    with pytest.raises(ConfigError, match="ranks"):
        lc.validate()
    calls = []
    real = RunConfig.check_all
    monkeypatch.setattr(RunConfig, "check_all", lambda self: (calls.append(self.rank), real(self))[1])
    lc = LaunchConfig.from_argv(["--byz_workers", "1", "--worker_attack", "alie"]).validate()
    nodes = lc.node_configs(tmp_path)
    assert calls == list(range(11)) and all(isinstance(n, ValidatedConfig) for n in nodes)
    assert nodes == [lc.node_config(r, run_dir=tmp_path).validate() for r in range(11)]
    assert [n.attack for n in nodes] == [None] * 10 + ["alie"] and nodes[3].peers.startswith(str(tmp_path))
    with pytest.raises(ValueError):
        nodes[0].with_files(rank=3)
