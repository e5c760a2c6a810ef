"""The CLI explains itself: every parser walked for its flags and their help, every
--help read for its examples (each parsed by the real parser) and exit codes, and
the flags that name a setting (`--data-dir`, `run --log-level`, `run --log-format`)
shown to win over the config file and the environment, in real subprocesses.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.cli import build_parser, main
from orchestrator.config import LoggingSettings
from orchestrator.models import ExitCode
from tests.support.data import LEAD_HEADER, drop_leads, lead_rows, result, write_csv
from tests.support.processes import CliRunner
from tests.support.settings import LEADS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator

PROG = "marketo-orchestrator"
# The commands that read the settings, and so the data directory.
READ_SETTINGS = ("run", "status", "submit", "check")
# Those that read neither: each says so in its own --help.
NO_DATA_DIR = ("split", "simulator")


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, the simulator's knobs included (added only when asked for)."""
    parser = build_parser(["simulator"])
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def help_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    return out


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_command_that_reads_settings_takes_data_dir_the_others_say_they_read_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    found = commands()
    assert set(found) == {*READ_SETTINGS, *NO_DATA_DIR}, "a new command: which list is it in?"
    for name in READ_SETTINGS:
        assert {"--config", "--data-dir"} <= option_strings(found[name]), name
    for name in NO_DATA_DIR:
        assert "--data-dir" not in option_strings(found[name]), name
        text = " ".join(help_of(capsys, name).split())
        assert "no configuration and no data directory" in text, name
    assert {"--log-level", "--log-format"} <= option_strings(found["run"])


def test_every_argument_of_every_parser_has_help_text() -> None:
    top = build_parser(["simulator"])
    parsers = {PROG: top, **{f"{PROG} {n}": p for n, p in commands().items()}}
    for name, parser in parsers.items():
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue  # hidden on purpose (submit --poll, for tests)
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert (action.help or "").strip(), f"{what} has no help text"
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{name} {choice.dest} has no help text"


@pytest.mark.parametrize("command", ["", *READ_SETTINGS, *NO_DATA_DIR])
def test_every_help_shows_examples_that_parse_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    text = help_of(capsys, *command.split())
    _, examples_and_codes = text.split("\nexamples:\n")
    examples, codes = examples_and_codes.split("\nexit codes:\n")

    lines = [line.strip() for line in examples.splitlines()]
    commands_shown = [line for line in lines if line.startswith(f"{PROG} ")]
    assert commands_shown, "at least one example"
    assert len(commands_shown) == sum(line.startswith("# ") for line in lines), "each explained"
    for line in commands_shown:
        args = shlex.split(line)[1:]
        parsed = build_parser(args).parse_args(args)  # exits 2 if an example is wrong
        assert parsed.command == (command or parsed.command)

    numbers = [int(m) for m in re.findall(r"^  (\d)  \S", codes, re.MULTILINE)]
    assert numbers == sorted(numbers)
    assert numbers[0] == ExitCode.COMPLETE
    assert ExitCode.USAGE in numbers
    if command in ("", "run", "submit"):
        assert numbers == [int(code) for code in ExitCode], "SPEC section 2's five codes"
    assert "exit as run --once" not in text


def test_usage_mistakes_in_the_new_flags_exit_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for args, flag in (
        (["run", "--data-dir", ""], "--data-dir"),
        (["status", "--data-dir", " "], "--data-dir"),
        (["run", "--log-level", "loud"], "--log-level"),
        (["run", "--log-format", "yaml"], "--log-format"),
        (["split", "x.csv", "--out", "d", "--data-dir", "/tmp"], "--data-dir"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == ExitCode.USAGE, args
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"{PROG}: usage error: "), line
        assert flag in line, line


async def test_data_dir_flag_wins_over_the_config_and_the_variable(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    in_file, in_env, on_flag = tmp_path / "in-file", tmp_path / "in-env", tmp_path / "on-flag"
    runner = CliRunner.for_settings(
        tmp_path / "cli", fast_settings(sim.base_url, in_file, (LEADS,))
    )
    runner.env["ORCHESTRATOR_DATA_DIR"] = str(in_env)
    drop_leads(on_flag, "flagged.csv", 6)
    later = write_csv(tmp_path / "later.csv", LEAD_HEADER, lead_rows(2))
    try:
        once = await runner.command("run", "--once", "--data-dir", str(on_flag))
        assert once.returncode == 0, once.stderr()
        assert result(on_flag, "done", "leads", "flagged.csv")["rows_processed"] == 6
        assert len(sim.records("leads")) == 6

        status = await runner.command("status", "--json", "--data-dir", str(on_flag))
        assert status.returncode == 0, status.stderr()
        [entry] = json.loads(status.stdout())["files"]
        assert (entry["file"], entry["status"]) == ("flagged.csv", "complete")

        check = await runner.command("check", "--data-dir", str(on_flag))
        assert check.returncode == 0, check.stderr()
        assert f"data_dir: ok ({on_flag};" in check.stdout()

        submit = await runner.command(
            "submit", str(later), "--route", "leads", "--data-dir", str(on_flag)
        )
        assert submit.returncode == 0, submit.stderr()
        handed = submit.stdout().strip()
        assert (on_flag / "inbox" / "leads" / f"{handed}-later.csv").is_file()

        # Without the flag the variable wins over the file: no daemon ever ran there.
        plain = await runner.command("status")
        assert plain.returncode == ExitCode.USAGE
        assert f"no state store at {in_env / 'state.db'}" in plain.stderr()
        assert not in_file.exists()
        assert not in_env.exists()
    finally:
        await runner.close()


async def test_run_log_flags_win_over_the_config_and_the_variables(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    data_dir = tmp_path / "data"
    settings = replace(
        fast_settings(sim.base_url, data_dir, (LEADS,)),
        logging=LoggingSettings(format="json", level="error"),
    )
    runner = CliRunner.for_settings(tmp_path / "cli", settings)
    runner.env["ORCHESTRATOR_LOGGING_LEVEL"] = "warning"
    runner.env["ORCHESTRATOR_LOGGING_FORMAT"] = "console"
    try:
        drop_leads(data_dir, "quiet.csv", 4)
        quiet = await runner.once()
        assert quiet.returncode == 0, quiet.stderr()
        assert quiet.events() == [], "the variables' console format, not the file's JSON"
        assert "Marketo call" not in quiet.stdout(), "nor below the variable's level"

        drop_leads(data_dir, "loud.csv", 4)
        loud = await runner.daemon("--once", "--log-level", "debug", "--log-format", "json")
        await loud.wait()
        assert loud.returncode == 0, loud.stderr()
        calls = loud.events("Marketo call")
        assert calls, "debug lines, as JSON"
        assert {event["level"] for event in calls} == {"debug"}
        lines = loud.stdout().splitlines()
        assert len(loud.events()) == len(lines), "every line JSON"
    finally:
        await runner.close()


async def test_simulator_on_a_taken_port_exits_1_with_one_line(tmp_path: Path) -> None:
    runner = CliRunner(tmp_path / "cli")
    runner.workdir.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        try:
            proc = await runner.run("simulator", "--port", port)
        finally:
            await runner.close()
    assert proc.returncode == ExitCode.FAILED
    [line] = proc.stderr().splitlines()
    assert line.startswith(f"{PROG}: error: 127.0.0.1:{port}: "), line
