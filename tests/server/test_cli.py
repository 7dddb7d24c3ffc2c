"""The `sleepserve` command line: settings precedence, clear failures, subcommand dispatch."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from support import ROOT

import model.evaluate
import model.train
import scheduler.worker
from server import cli
from server.app import create_app
from server.cli import main, settings_from_args
from server.context import build_server
from server.settings import Settings


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SLEEPSERVE_PORT", "9001")
    monkeypatch.setenv("SLEEPSERVE_STORE", "redis://localhost:6379/0")
    monkeypatch.setenv("SLEEPSERVE_API_KEYS", "a, b")
    settings = settings_from_args(["--port", "9002", "--sleep-passes", "3", "--schedule", "hard"])
    assert settings.port == 9002 and settings.store == "redis://localhost:6379/0"
    assert settings.sleep_passes == 3 and settings.schedule == "hard" and settings.api_keys == ["a", "b"]
    assert settings_from_args(["--checkpoint", "/x/my-model"]).served_model_name == "my-model"
    monkeypatch.setenv("SLEEPSERVE_MODEL", "Org/Some-Model")
    settings = settings_from_args(["--served-model-name", "chat", "--dtype", "bfloat16"])
    assert settings.model_path == "Org/Some-Model" and settings.served_model_name == "chat"
    assert settings.dtype == "bfloat16"


def test_missing_checkpoint_fails_clearly(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SLEEPSERVE_CHECKPOINT", str(tmp_path / "absent"))
    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert "cannot load checkpoint" in error and "absent" in error and "Traceback" not in error


def test_offline_hub_id_fails_with_one_clear_error(tmp_path):
    """A hub id with no network: one line that says how to pass a local folder, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "server", "--model", "Qwen/Qwen3.5-0.8B"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "cannot download Qwen/Qwen3.5-0.8B" in done.stderr and "--model DIR" in done.stderr
    assert "Traceback" not in done.stderr


def test_invalid_settings_and_commands(capsys):
    assert main(["serve", "--model", "/x/a", "--checkpoint", "/x/b"]) == 2
    assert "name different models" in capsys.readouterr().err
    assert main(["serve", "--dtype", "int3"]) == 2
    assert "dtype" in capsys.readouterr().err
    assert main(["serve", "--min-passes", "5", "--max-passes", "2"]) == 2
    assert "min_passes" in capsys.readouterr().err
    for worker in ("process", "offload"):
        assert main(["serve", "--sleep-worker", worker, "--device", "cuda"]) == 2
        assert f"sleep_worker={worker} runs on CPU" in capsys.readouterr().err
    assert main(["serve", "--sleep-worker", "fork"]) == 2
    assert "--sleep-worker / SLEEPSERVE_SLEEP_WORKER" in capsys.readouterr().err
    for worker in ("thread", "interleaved", "offload", "auto"):
        assert main(["serve", "--sleeper-nice", "10", "--sleep-worker", worker]) == 2
        assert "sleeper_nice sets the sleeper process's priority" in capsys.readouterr().err
    assert main(["serve", "--sleeper-nice", "20"]) == 2
    assert "--sleeper-nice / SLEEPSERVE_SLEEPER_NICE" in capsys.readouterr().err
    assert main(["serve", "--sleep-share", "1"]) == 2
    assert "--sleep-share / SLEEPSERVE_SLEEP_SHARE" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "worker" in capsys.readouterr().out


def test_invalid_settings_read_as_one_line_per_setting(monkeypatch, capsys):
    """A bad value names its flag and environment variable and what it got, without pydantic's
    error dump (its links, its "For further information")."""
    monkeypatch.setenv("SLEEPSERVE_PORT", "eighty")
    assert main(["serve", "--sleep-passes", "many", "--sleep-share", "2"]) == 2
    error = capsys.readouterr().err
    lines = error.strip().splitlines()
    assert lines[0] == "sleepserve: invalid settings:" and len(lines) == 4, error
    assert "--port / SLEEPSERVE_PORT: Input should be a valid integer" in error and "'eighty'" in error
    assert "--sleep-passes / SLEEPSERVE_SLEEP_PASSES:" in error and "Input should be 'auto'" in error
    assert "--sleep-share / SLEEPSERVE_SLEEP_SHARE: Input should be less than 1 (got 2.0)" in error
    assert "pydantic" not in error and "http" not in error and "validation error" not in error


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"sleepserve {version('sleepserve')} (torch ")


@pytest.mark.parametrize(
    "parser",
    [cli.serve_parser, model.train.build_parser, model.evaluate.build_parser, scheduler.worker.build_parser],
)
def test_every_help_shows_the_defaults(parser):
    """Each option that takes a value says its default in `--help` (a value, or what leaving it out
    means)."""
    built = parser()
    formatter = built._get_formatter()
    for action in built._actions:
        if action.nargs == 0 or action.required:  # --help and switches; --out of train
            continue
        shown = formatter._expand_help(action) if action.help else ""
        assert "default" in shown, f"{built.prog} {action.option_strings}: {shown!r}"


def test_missing_subcommand_module_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "worker", ("no_such_pkg.worker:main", "x"))
    assert main(["worker"]) == 2
    assert "not available" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["train", "eval"])
def test_subcommands_dispatch(monkeypatch, name):
    calls = []
    monkeypatch.setitem(cli.COMMANDS, name, ("json:dumps", "x"))  # any importable callable
    monkeypatch.setattr("json.dumps", lambda argv: calls.append(argv) or 0)
    assert main([name, "--flag"]) == 0
    assert calls == [["--flag"]]


@pytest.mark.parametrize(
    "flags,threads,allowed,expected",
    [
        ([], 1, {0, 1, 2, 3}, {3}),  # interleaved on CPU: the last core
        (["--sleep-worker", "interleaved"], 1, {2, 5}, {5}),
        (["--sleep-worker", "offload"], 1, {0, 1}, {1}),  # its sleeper process takes the other cores
        (["--sleep-mode", "inline"], 1, {0, 1}, {1}),
        ([], 2, {0, 1}, None),  # torch's own threads need the cores
        (["--sleep-worker", "process"], 1, {0, 1}, None),  # the sleeper needs a core of its own
        (["--device", "cuda", "--sleep-worker", "thread"], 1, {0, 1}, None),
        ([], 1, {0}, None),  # one core anyway
        (["--cpu-affinity", "none"], 1, {0, 1}, None),
        (["--cpu-affinity", "0, 1"], 4, {0, 1, 2}, {0, 1}),  # explicit: whatever the rest
    ],
)
def test_server_threads_share_a_core_when_they_only_take_turns(flags, threads, allowed, expected):
    assert cli.server_cpus(settings_from_args(flags), allowed, threads) == expected


def test_cpu_affinity_outside_the_allowed_cpus_or_malformed_is_refused(capsys):
    with pytest.raises(ValueError, match="may only use CPUs"):
        cli.server_cpus(settings_from_args(["--cpu-affinity", "7"]), {0, 1}, 1)
    assert main(["serve", "--cpu-affinity", "first"]) == 2
    assert "--cpu-affinity / SLEEPSERVE_CPU_AFFINITY: cpu_affinity is auto" in capsys.readouterr().err


@pytest.mark.parametrize(
    "allowed,server,expected",
    [({0, 1}, {1}, {0}), ({0, 2, 3}, {3}, {0, 2}), ({0, 1}, None, None), ({1}, {1}, None)],
)
def test_the_sleeper_takes_the_cpus_the_server_leaves_free(allowed, server, expected):
    assert cli.sleeper_cpus(allowed, server) == expected


def test_auto_sleep_offloads_to_the_cpus_the_server_leaves_free(tiny_checkpoint):
    """`sleep_worker=auto` on CPU: offloaded to a sleeper process on the CPUs the server's threads leave
    free (as `sleepserve serve` passes them), pinned there; interleaved where there are none."""
    settings = Settings(checkpoint=tiny_checkpoint(), store="memory")
    interleaved = build_server(settings).engine.executor
    assert interleaved is not None and interleaved.isolation == "interleaved"
    interleaved.shutdown()
    cpu = min(os.sched_getaffinity(0))
    offloaded = build_server(settings, sleeper_cpus={cpu}).engine.executor
    try:
        assert offloaded is not None and offloaded.isolation == "offload"
        helper = offloaded._helper
        assert helper is not None and helper.cpus == {cpu}
    finally:
        offloaded.shutdown()


def test_serve_time_sleep_settings_reach_the_model(tiny_checkpoint, capsys):
    settings = settings_from_args(
        [
            "--model",
            str(tiny_checkpoint()),
            "--window",
            "12",
            "--sleep-blocks",
            "0:1",
            "--sleep-mode",
            "inline",
        ]
    )
    config = build_server(settings).model.config
    assert (config.window, config.sleep_blocks) == (12, (0, 1))
    assert main(["serve", "--sleep-blocks", "3"]) == 2
    assert "FIRST:LAST" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_checkpoint()), "--sleep-blocks", "0:9"]) == 2
    assert "sleep_blocks" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,environ,expected",
    [
        ([], {}, 1),  # the server's own choice, whatever the machine
        (["--device", "cuda"], {}, 1),
        ([], {"OMP_NUM_THREADS": "3"}, 3),
        (["--torch-threads", "2"], {"OMP_NUM_THREADS": "3"}, 2),
    ],
)
def test_the_server_picks_its_torch_threads(flags, environ, expected):
    assert cli.torch_threads(settings_from_args(flags), environ) == expected


async def test_the_memory_store_does_not_claim_to_save_sessions_at_exit(tiny_checkpoint, caplog):
    app = create_app(Settings(checkpoint=tiny_checkpoint(), store="memory"))
    with caplog.at_level(logging.INFO, logger="sleepserve"):
        async with app.router.lifespan_context(app):
            pass
    assert "the in-memory sessions end with the process" in caplog.text
    assert "sessions saved" not in caplog.text
