import subprocess
import sys

from jobs.cli import COMMANDS, main

EXPECTED = ["synth", "build", "status", "resume", "pca", "directions", "sample", "edit", "invert", "report", "serve", "demo"]


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in EXPECTED:
        assert name in out
    assert list(COMMANDS) == EXPECTED


def test_console_script_installed():
    import shutil

    exe = shutil.which("w2w") or str(__import__("pathlib").Path(sys.executable).parent / "w2w")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "weights2weights" in out.stdout


def test_each_subcommand_has_help(capsys):
    for name in EXPECTED:
        try:
            main([name, "--help"])
        except SystemExit as stop:
            assert stop.code == 0
        out = " ".join(capsys.readouterr().out.split())
        assert f"usage: w2w {name}" in out and " ".join(COMMANDS[name].split()[:4]) in out


def test_unimplemented_commands_fail_loudly(capsys):
    import importlib.util

    missing = [n for n in EXPECTED if importlib.util.find_spec(f"jobs.commands.{n}") is None]
    for name in missing:
        assert main([name]) != 0
        assert "not implemented yet" in capsys.readouterr().err
