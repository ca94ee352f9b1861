"""`inbetweener demo`: an --out it cannot use is said in one line before any footage is drawn."""

from __future__ import annotations

import pytest

from pipeline.cli import demo_main


@pytest.mark.parametrize("where", ["a_file", "a_file/demo"])
def test_demo_refuses_an_out_it_cannot_write_and_keeps_what_is_there(where, tmp_path, capsys):
    """--out at an existing file, or below one, crashed with a FileExistsError/NotADirectoryError traceback."""
    (tmp_path / "a_file").write_text("someone's notes\n")
    assert demo_main(["--out", str(tmp_path / where), "--no-fetch"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("inbetweener demo: --out ") and "Traceback" not in err and len(err.splitlines()) == 1
    )
    assert (tmp_path / "a_file").read_text() == "someone's notes\n"


def test_demo_help_says_where_out_is_and_what_goes_in_it(capsys):
    """--out had no help line: neither its default nor that a rerun scores OUT/curated again."""
    with pytest.raises(SystemExit):
        demo_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: out/demo" in out and "OUT/curated/" in out and "--restart" in out


def test_each_demo_starts_over(tmp_path, monkeypatch):
    """A rerun kept the earlier demo's split (split.sticky), so a demo that fetched Big Buck Bunny after one
    that could not differed from a fresh one; each demo now curates as a first run does."""
    from pipeline import cli, samples

    seen: list[list[str]] = []
    monkeypatch.setattr(samples, "generate_footage", lambda folder: folder.mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(cli, "curate_main", lambda argv: seen.append(argv) or 0)
    assert demo_main(["--out", str(tmp_path / "demo"), "--no-fetch"]) == 0
    (argv,) = seen
    assert "--restart" in argv and argv[argv.index("--set") + 1] == "split.sticky=false"
