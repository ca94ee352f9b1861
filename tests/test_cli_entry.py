"""The `inbetweener` entry point: dispatch, unknown commands, and Ctrl-C."""

from __future__ import annotations

import importlib

import pytest

import inbetweener_cli


def test_unknown_command_lists_the_commands(capsys):
    assert inbetweener_cli.main(["curat"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'curat' (did you mean 'curate'?)" in err and "  interpolate " in err
    assert inbetweener_cli.main(["zzz"]) == 2
    assert "unknown command 'zzz'\n" in capsys.readouterr().err  # nothing close: no guess


def test_version_is_the_installed_distributions(capsys):
    from importlib import metadata

    assert inbetweener_cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"inbetweener {metadata.version('inbetweener')}\n"


@pytest.mark.parametrize("command", ["curate", "train", "report"])
def test_ctrl_c_is_a_short_message_and_code_130(command, monkeypatch, capsys):
    """No traceback out of Ray or torch: one line, with how to go on where the command keeps its work."""
    module_name, func_name, _ = inbetweener_cli.COMMANDS[command]
    module = importlib.import_module(module_name)

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, func_name, interrupted)
    assert inbetweener_cli.main([command, "x"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"inbetweener {command}: interrupted") and "Traceback" not in err
    hint = inbetweener_cli.AFTER_INTERRUPT.get(command)
    assert (hint in err) if hint else err.endswith("interrupted")


def test_reader_gone_with_unbuffered_stdout_is_quiet_exit_1(monkeypatch):
    """`inbetweener describe tiny --json | head -c 10` under PYTHONUNBUFFERED=1 (common in containers): the
    failed write leaves nothing to flush, and that is still the reader gone, not a traceback."""
    import io
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # `head` has read its bytes and left
    stdout = io.TextIOWrapper(io.FileIO(write_end, "w"), write_through=True)  # as PYTHONUNBUFFERED makes it
    module_name, func_name, _ = inbetweener_cli.COMMANDS["describe"]
    module = importlib.import_module(module_name)

    def prints(argv):
        print('{\n "unet": 1\n}')

    monkeypatch.setattr(module, func_name, prints)
    monkeypatch.setattr("sys.stdout", stdout)
    try:
        assert inbetweener_cli.main(["describe", "tiny", "--json"]) == 1
    finally:
        monkeypatch.undo()
        stdout.close()
