"""Flags and the run configuration: Garfield's trainer flags, booleans, start-time refusals."""
from __future__ import annotations

import argparse

import pytest

from byzsgd.config import (RunConfig, add_arguments, config_from_args, parse_bool, parse_host_port,
                           parse_json_object)
from byzsgd.errors import ConfigError, ResilienceError
from byzsgd.deploy.garfield import build_parser as trainer_parser
from byzsgd.deploy.garfield import environment_rank_and_master

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
