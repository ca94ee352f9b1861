"""The `inbetweener` console script: one entry point, one subcommand per job.

Each subcommand is `main(argv=None)` in its own package and is imported only when chosen, so
that `inbetweener curate` never imports torch and `inbetweener interpolate` never imports Ray.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import select
import sys

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "curate": ("pipeline.cli", "curate_main", "raw footage -> shots -> scores -> shards + manifest + report"),
    "select": (
        "pipeline.cli",
        "select_main",
        "re-apply thresholds from a manifest and re-shard (no decoding)",
    ),
    "report": ("pipeline.cli", "report_main", "rebuild report.html from a manifest"),
    "models": (
        "pipeline.models_cli",
        "models_main",
        "list every job's weights; check and download the curate stages'",
    ),
    "demo": ("pipeline.cli", "demo_main", "generate sample cartoon footage and curate it with local Ray"),
    "bench": ("pipeline.bench", "main", "benchmarks (bench curate: decoding vs CPU stages, workers, memory)"),
    "describe": ("training.describe", "main", "parameter counts per part of a model preset"),
    "convert": ("training.convert", "main", "write a checkpoint as safetensors with its config"),
    "train": ("training.train", "main", "train a ToonCrafter stage (rectify, decoder, sketch)"),
    "interpolate": ("inference.interpolate", "main", "keyframes + prompt (+ sketches) -> in-between frames"),
    "evaluate": ("inference.evaluate", "main", "metrics on the eval split (FVD, KVD, LPIPS, CLIP, CPBD)"),
}


# what to do after Ctrl-C, for the commands that keep their finished work
AFTER_INTERRUPT = {
    "curate": "run the same command again to go on (finished sources are kept)",
    "evaluate": "run the same command again to go on (generated and scored clips are kept)",
    "interpolate": "with --batch, run it again with --skip-existing to go on",
}


def version() -> str:
    """The installed distribution's version (`pip install -e .` included), or "unknown" when run from a
    checkout that was never installed."""
    from importlib import metadata

    try:
        return metadata.version("inbetweener")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def usage() -> str:
    lines = [
        "usage: inbetweener COMMAND [ARGS...]   (inbetweener --version: the installed version)",
        "",
        "commands:",
    ]
    for name, (module, _, text) in COMMANDS.items():
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            lines.append(f"  {name:<12} {text}")
    lines += [
        "",
        "Run `inbetweener COMMAND --help` for a command's options and an example,",
        "`inbetweener --version` for the installed version.",
    ]
    return "\n".join(lines)


def stdout_gone() -> bool:
    """Whether the reader of stdout has closed its end. A failed flush says so; with PYTHONUNBUFFERED
    (set in many containers) the failed write left nothing to flush, so the pipe itself is asked."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"inbetweener {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"inbetweener: unknown command {name!r}{guess}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"inbetweener {name}: not available in this install ({exc})", file=sys.stderr)
        return 2
    try:
        result = getattr(module, func_name)(rest)
    except BrokenPipeError:  # `inbetweener models | head`: the reader of stdout has gone
        if not stdout_gone():
            raise  # another pipe (a socket, a worker's): not the reader going away
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would fail again
        return 1
    except KeyboardInterrupt:
        hint = AFTER_INTERRUPT.get(name)
        print(f"\ninbetweener {name}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130  # the shell's code for a SIGINT
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
