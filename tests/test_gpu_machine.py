"""The GPU checks (bench/gpu_checks.sh) run on a lent machine that has torch, torchvision,
transformers and OpenCV (the text stage's bench ran there) but not Ray, webdataset or easyocr, and
maybe not pyarrow or PyAV; open_clip and ftfy travel as wheels. A lazy import of a missing package on
a bench's path fails there only after minutes of compiling, so each bench's CPU smoke mode runs here
in a fresh interpreter where those packages cannot load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("pyarrow", "ray", "webdataset", "av", "scenedetect", "easyocr", "rapidocr_onnxruntime")


def prelude(absent: tuple[str, ...] = ABSENT) -> str:
    return f"""
import importlib.abc, runpy, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")

sys.meta_path.insert(0, Absent())
"""


def run_as_on_the_gpu_machine(code: str, tmp_path: Path, absent=ABSENT) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", prelude(absent) + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        },
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_module(module: str, args: list[str], tmp_path: Path, absent=ABSENT) -> str:
    code = f"sys.argv = [{module!r}, *{args!r}]\nrunpy.run_module({module!r}, run_name='__main__')\n"
    return run_as_on_the_gpu_machine(code, tmp_path, absent).stdout


def test_the_blocked_packages_really_fail_to_import(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", prelude() + "import manifests.io"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "pyarrow" in proc.stderr and "absent on the GPU machine" in proc.stderr


def test_compile_cache_round_trip_without_pyarrow(tmp_path):
    cache = tmp_path / "sample_cache.xz"
    code = f"""
import torch
from training.compilation import load_compile_cache, save_compile_cache
f = torch.compile(lambda x: x.sin() + 1)
f(torch.randn(8))
assert save_compile_cache({str(cache)!r}) > 0
assert load_compile_cache({str(cache)!r})
"""
    run_as_on_the_gpu_machine(code, tmp_path)
    assert cache.stat().st_size > 0


def test_interpolation_bench(tmp_path):
    out = tmp_path / "sample.json"
    args = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--height", "32", "--width", "64",
            "--repeats", "1", "--compile", "off", "--json", str(out), "--profile", str(tmp_path / "k.txt"),
            "--wait-for", str(tmp_path / "absent"), "--wait-max", "1"]  # fmt: skip
    printed = run_module("inference.bench_gpu", args, tmp_path)
    assert "eager" in printed and "interpolation bench, before its timed samples: gave up on" in printed
    waited = json.loads(out.read_text())["waited_for_gpu"]
    assert not waited["found"] and waited["waited_s"] >= 1


def test_training_bench(tmp_path):
    out, compiled, free = tmp_path / "train.json", tmp_path / "gate" / "compiled", tmp_path / "free"
    free.touch()
    args = ["--preset", "tiny", "--device", "cpu", "--batches", "1", "--steps", "1", "--warmup", "1",
            "--breakdown", "--checkpoint-levels", "0,1", "--json", str(out),
            "--signal-compiled", str(compiled), "--wait-for", str(free)]  # fmt: skip
    printed = run_module("training.bench_gpu", args, tmp_path)
    assert compiled.exists() and json.loads(out.read_text())["waited_for_gpu"]["found"]
    assert printed.count("training bench, before its timed steps: found") == 1  # once, not per case


def test_training_bench_with_fp8_linears(tmp_path):
    """torchao travels as a wheel too (`make gpu-wheels`); the bench's fp8 rows use it."""
    out = tmp_path / "train.json"
    args = ["--preset", "tiny", "--device", "cpu", "--batches", "1", "--steps", "1", "--warmup", "0",
            "--no-decoder", "--float8", "tensorwise", "--float8-layers", "all", "--json", str(out)]  # fmt: skip
    printed = run_module("training.bench_gpu", args, tmp_path)
    report = json.loads(out.read_text())
    assert report["float8"] == "tensorwise" and report["rectify_float8_linears"] > 0
    assert "fp8 linears (tensorwise, all)" in printed and report["rows"][0]["s_per_step"] > 0


def test_model_stage_bench(tmp_path):
    out = tmp_path / "models.json"
    table = tmp_path / "clip_kernels.txt"
    args = ["--device", "cpu", "--tiny", "--stages", "text,aesthetic,alignment", "--fp8", "--out", str(out)]
    printed = run_module("pipeline.bench_models_gpu", [*args, "--profile", str(table)], tmp_path)
    assert "aesthetic_fp8 + alignment together" in printed and out.exists()
    head, *rest = table.read_text().splitlines()  # the fp8 stage's call: how busy, then the operators
    assert head.startswith("one call of 2 clips: wall ") and "ms, kernels " in head
    assert any("_scaled_mm" in line for line in rest)


def test_model_stage_bench_without_the_open_clip_wheels(tmp_path):
    """Without the carried wheels the bench falls back to transformers' CLIP and its own CRAFT."""
    args = ["--device", "cpu", "--tiny", "--fallbacks", "--stages", "text,aesthetic,alignment"]
    printed = run_module("pipeline.bench_models_gpu", args, tmp_path, (*ABSENT, "open_clip", "ftfy"))
    assert "transformers CLIPModel" in printed and "vs all 77 positions: " in printed


def script_commands() -> list[tuple[str, list[str]]]:
    """(module, argv) of every `part ... python3 -m MODULE ARGS` line of bench/gpu_checks.sh, with its
    shell defaults filled in and its optional flags (`${VAR:+--flag}`) given."""
    import re
    import shlex

    commands = []
    for line in (ROOT / "bench" / "gpu_checks.sh").read_text().splitlines():
        if not re.match(r"\s*(\S+=\S+ )*part ", line) or "python3 -m " not in line:
            continue
        command = line.split("python3 -m ", 1)[1].split(" 2>&1", 1)[0]
        command = re.sub(r"\$\{\w+:[-+]([^}]*)\}", r"\1", command)  # defaults, and optional flags as if set
        command = command.replace("$OUT", "/tmp/out").replace("$TC", "conv3d").replace("$GATE", "/tmp/gate")
        module, *argv = shlex.split(command)
        commands.append((module, argv))
    return commands


def test_every_command_of_the_gpu_script_parses(monkeypatch):
    """A misspelt flag in bench/gpu_checks.sh would cost a GPU session one of its few minutes: each
    command's arguments go through its module's own parser here (stopped right after parsing)."""
    import argparse
    import importlib

    import pytest

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    commands = script_commands()
    assert {m for m, _ in commands} >= {
        "inference.bench_gpu",
        "training.bench_gpu",
        "pipeline.bench_models_gpu",
    }
    # the compiled rectify step beside the sample, and the sample, wait for each other's GPU work
    beside = [a for m, a in commands if m == "training.bench_gpu" and "--signal-compiled" in a]
    sample = [a for m, a in commands if m == "inference.bench_gpu"]
    assert len(beside) == 1 and len(sample) == 1
    signal = beside[0][beside[0].index("--signal-compiled") + 1]
    assert sample[0][sample[0].index("--wait-for") + 1] == signal
    for module, argv in commands:
        with pytest.raises(Parsed) as parsed:
            importlib.import_module(module).main(argv)
        if "--cudnn-benchmark" in argv:
            assert parsed.value.args[0].cudnn_benchmark, module


def test_unet_benches(tmp_path):
    """The parts gpu_checks.sh runs when their limits are set (T_UNET, T_MODEL)."""
    profile = ["--preset", "tiny", "--device", "cpu", "--frames", "4", "--height", "8", "--width", "8",
               "--repeats", "1", "--kernels", "5", "--json", str(tmp_path / "unet.json")]  # fmt: skip
    run_module("training.profile_unet", profile, tmp_path)
    model = ["--preset", "tiny", "--device", "cpu", "--frames", "4", "--steps", "2", "--repeats", "1",
             "--json", str(tmp_path / "model.json")]  # fmt: skip
    run_module("training.bench_model", model, tmp_path)
    assert (tmp_path / "unet.json").exists() and (tmp_path / "model.json").exists()


def test_the_unet_call_check_script_runs_without_the_missing_packages(tmp_path):
    """bench/cuda_graph_check.py (gpu_checks.sh's T_GRAPH part) on the tiny preset and the CPU: the
    stacked and the shared call agree, and each is timed."""
    code = "sys.argv = ['cuda_graph_check.py', 'tiny', 'cpu', 'eager', '300']\nrunpy.run_path('bench/cuda_graph_check.py', run_name='__main__')\n"
    out = run_as_on_the_gpu_machine(code, tmp_path).stdout
    assert "inputs stacked for both branches:" in out and "inputs shared:" in out
    difference = float(out.split("largest difference, shared vs stacked:")[1].split()[0])
    assert difference < 1e-5


def parts_run(tmp_path: Path, env: dict[str, str], cached: bool) -> list[str]:
    """Run bench/gpu_checks.sh with stand-ins for python3 and nvidia-smi that only record what they were
    asked to do, in a working tree with or without a carried compile cache: the `python3 -m` commands of
    the parts that ran, in order."""
    tree, bin_dir = tmp_path / "tree", tmp_path / "bin"
    (tree / "bench").mkdir(parents=True)
    (tree / "bench" / "gpu_checks.sh").write_text((ROOT / "bench" / "gpu_checks.sh").read_text())
    if cached:
        (tree / ".gpucache").mkdir()
        (tree / ".gpucache" / "train_cache.xz").write_bytes(b"carried")
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "python3").write_text(f'#!/bin/sh\n[ "$1" = -m ] && echo "$*" >> {calls}\nexit 0\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, memory.total'\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    subprocess.run(
        ["bash", "bench/gpu_checks.sh"],
        cwd=tree,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return calls.read_text().splitlines() if calls.exists() else []


def test_the_gpu_script_times_a_baseline_in_the_same_run(tmp_path):
    """The compile caches are not committed, so a fresh checkout carries none: the compiled plain layout
    would have to compile from scratch after the channels-last step, which does not fit one call. The
    script then times the eager step as the same-run baseline; with a carried cache, the compiled plain
    layout. Either way the channels-last step runs first."""
    fresh = parts_run(tmp_path / "fresh", {}, cached=False)
    train = [c for c in fresh if c.startswith("-m training.bench_gpu")]
    assert len(train) == 2 and "--channels-last" in train[0]
    assert "--compile" not in train[1] and "--checkpoint-levels 0,2" in train[1]
    assert any(c.startswith("-m pipeline.bench_models_gpu") for c in fresh)

    carried = parts_run(tmp_path / "carried", {}, cached=True)
    train = [c for c in carried if c.startswith("-m training.bench_gpu")]
    assert len(train) == 2 and "--channels-last" in train[0]
    assert "--compile inductor" in train[1] and "--compile-cache" in train[1]


def test_the_gpu_script_skips_a_part_whose_whole_limit_is_not_left(tmp_path):
    """The aesthetic bench's first minutes compile and the eager baseline's warm-up steps take a while:
    cut short they measure little, so they wait for a call of their own rather than starting with what
    is left; a part without WHOLE (the channels-last step) takes what is left."""
    short = parts_run(tmp_path / "short", {"T_CL": "0", "T_CLIP": "110", "BUDGET": "60"}, cached=False)
    assert short == []  # neither the eager baseline (100 s) nor the CLIP part (110 s) fits in 60 s
    cl = parts_run(tmp_path / "cl", {"T_CL": "545", "T_CLIP": "110", "BUDGET": "60"}, cached=False)
    assert len(cl) == 1 and "--channels-last" in cl[0]  # 60 s of its 545
    eager = parts_run(tmp_path / "eager", {"T_CL": "0", "T_CLIP": "0", "BUDGET": "120"}, cached=False)
    assert len(eager) == 1 and "training.bench_gpu" in eager[0] and "--compile" not in eager[0]
    whole = parts_run(
        tmp_path / "whole", {"T_CL": "0", "T_EAGER": "0", "T_CLIP": "110", "BUDGET": "120"}, cached=False
    )
    assert [c.split()[1] for c in whole] == ["pipeline.bench_models_gpu"]
