"""The GPU benchmark's CPU smoke run, on the paths the GPU machine takes (no open_clip, no easyocr)."""

from __future__ import annotations

import json
import re

import pytest


def test_minimal_craft_has_easyocr_craft_keys_and_shapes():
    import torch

    from pipeline.bench_models_gpu import _minimal_craft
    from pipeline.stages.text import craft_shapes

    with torch.device("meta"):
        mine = {k: tuple(v.shape) for k, v in _minimal_craft().state_dict().items()}
    assert mine == craft_shapes()


def test_bench_smoke_run_on_cpu_writes_every_stage(tmp_path, capsys):
    from pipeline.bench_models_gpu import main

    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--tiny", "--fallbacks", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["stages"]) == {"text", "aesthetic", "alignment", "alignment_all_positions", "caption"}
    for name, r in results["stages"].items():
        assert r["clips_per_s"] > 0 and r["batch_size"] == 2, name
    assert results["stages"]["aesthetic"]["model"].startswith("transformers CLIPModel")
    assert results["stages"]["text"]["model"].startswith("minimal CRAFT")
    assert results["aesthetic_plus_alignment_clips_per_s"] > 0
    printed = capsys.readouterr().out
    assert "clips/s" in printed and "vs all 77 positions:" in printed


def test_bench_measures_other_forward_sizes_and_the_compiled_tower_beside_eager(tmp_path, capsys):
    from pipeline.bench_models_gpu import main

    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--tiny", "--fallbacks", "--stages", "aesthetic,alignment", "--fp8"]
    more = ["--frames-per-forward", "2", "--clips-per-call", "3"]
    assert main([*args, "--compile", "eager", *more, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    fp8 = results["stages"]["aesthetic_fp8_compiled"]  # fp8 linears, compiled like the fp16 row
    assert "fp8 e4m3" in fp8["model"] and "torch.compile eager" in fp8["model"] and fp8["clips_per_s"] > 0
    assert fp8["converted"]["linear"] == 6  # transformers' CLIP layer: q, k, v, out, fc1, fc2
    agree = fp8["agreement_with_fp16"]
    assert agree["frames"] == 24 and 0.99 < agree["embedding_cosine_min"] <= agree["embedding_cosine_mean"]
    assert 0 < agree["embedding_l2_max"] < 0.15
    assert results["aesthetic_fp8_compiled_plus_alignment_clips_per_s"] > 0
    # the stage's form: biases in the GEMMs and the patch embedding as a GEMM; then the baseline without
    assert fp8["converted"]["patch_embedding"] == 1 and "patch embedding as a GEMM" in fp8["model"]
    unfused = results["stages"]["aesthetic_fp8_unfused_compiled"]
    assert unfused["converted"]["patch_embedding"] == 0 and "biases added after the GEMMs" in unfused["model"]
    assert unfused["clips_per_s"] > 0 and unfused["agreement_with_fp16"]["embedding_cosine_min"] > 0.99
    assert "aesthetic_fp8_compiled_graph" not in results["stages"]  # CUDA graphs: on a GPU only
    printed = capsys.readouterr().out
    assert "aesthetic_fp8_compiled vs the fp16 tower on 24 smooth random images" in printed
    assert "aesthetic_fp8_unfused_compiled + alignment together" in printed
    assert results["stages"]["aesthetic_2_per_forward"]["frames_per_forward"] == 2
    assert results["stages"]["aesthetic_2_per_forward"]["clips_per_s"] > 0
    compiled = results["stages"]["aesthetic_compiled"]
    assert "torch.compile eager" in compiled["model"] and compiled["clips_per_s"] > 0
    assert compiled["first_call_s"] > 0 and results["aesthetic_compiled_plus_alignment_clips_per_s"] > 0
    # more clips per call: the fastest form measured (here fp8 compiled: no CUDA graph on a CPU), both stages
    per_call = results["stages"]["aesthetic_3_per_call"]
    assert per_call["batch_size"] == 3 and per_call["form"] == "aesthetic_fp8_compiled"
    assert per_call["model"] == fp8["model"] and per_call["clips_per_s"] > 0
    assert results["stages"]["alignment_3_per_call"]["batch_size"] == 3
    assert results["3_per_call_plus_alignment_clips_per_s"] > 0
    assert "3 clips per call, the fastest aesthetic form + alignment together" in printed
    # the fastest forms together (the text tower's compiled forms need open_clip's tower: not here)
    assert "alignment_compiled" not in results["stages"]
    best = results["fastest_forms_together"]
    assert best["alignment"] == "alignment" and best["clips_per_s"] > 0
    assert best["aesthetic"] in results["stages"] and "the fastest forms at the stages' own" in printed


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--frames-per-forward=0", "positive integers"),
        ("--compile=nope", "unknown torch.compile"),
        ("--clips-per-call=64,x", "--clips-per-call: expected positive integers"),
    ],
)
def test_bench_rejects_bad_options_before_building_models(flag, message, capsys):
    from pipeline.bench_models_gpu import main

    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", "--tiny", flag])
    assert exc.value.code == 2 and message in capsys.readouterr().err


# the aesthetic stage alone at the tiny size on the CPU, with its fp8 rows
FP8_AESTHETIC = ["--device", "cpu", "--tiny", "--fallbacks", "--stages", "aesthetic", "--fp8"]


def test_a_failing_fp8_compile_is_a_row_and_fp8_runs_eager(tmp_path, capsys, monkeypatch):
    """A lent GPU gets one run of the bench: if compiling the fp8 tower fails there, the error is
    kept as a row, fp8 is measured eager instead, and every row was printed as soon as it was measured."""
    from pipeline import bench_models_gpu

    real = bench_models_gpu._measure_fp8

    def fails_compiled(*args):
        if args[5]:  # the backend
            raise RuntimeError("no fp8 kernel for this card")
        return real(*args)

    monkeypatch.setattr(bench_models_gpu, "_measure_fp8", fails_compiled)
    out = tmp_path / "bench.json"
    assert bench_models_gpu.main([*FP8_AESTHETIC, "--compile", "eager", "--out", str(out)]) == 0
    stages = json.loads(out.read_text())["stages"]
    assert stages["aesthetic_fp8_compiled"]["error"] == "RuntimeError: no fp8 kernel for this card"
    assert (
        stages["aesthetic_fp8"]["clips_per_s"] > 0 and "torch.compile" not in stages["aesthetic_fp8"]["model"]
    )
    assert stages["aesthetic_fp8"]["agreement_with_fp16"]["embedding_cosine_min"] > 0.99
    printed = capsys.readouterr().out
    assert re.search(r"aesthetic_fp8_compiled +failed: RuntimeError: no fp8 kernel", printed)
    # then the baseline (biases after the GEMMs, the patch embedding a convolution): also eager here
    assert "biases added after the GEMMs" in stages["aesthetic_fp8_unfused"]["model"]
    assert "biases added by the GEMMs" in stages["aesthetic_fp8"]["model"]
    assert stages["aesthetic_fp8_unfused"]["clips_per_s"] > 0
    assert printed.index("measured aesthetic: ") < printed.index("measured aesthetic_fp8: ")


def test_the_fp8_forms_wide_reductions_fall_back_to_loops_when_they_fail(tmp_path, capsys, monkeypatch):
    """With inductor, the stage's fp8 form compiles with persistent wide reductions (multi-kernel); if
    that fails on the lent GPU, the error is a row of its own and the same form is measured without
    them, before the baseline (which never has them). Inductor is stood in for by eager here."""
    from pipeline import bench_models_gpu

    calls = []
    real = bench_models_gpu.compile_image_tower

    def spy(net, backend, wide_reductions=False):
        calls.append((backend, wide_reductions))
        if wide_reductions:
            raise RuntimeError("multi-kernel failed")
        real(net, "eager" if backend == "inductor" else backend)

    monkeypatch.setattr(bench_models_gpu, "compile_image_tower", spy)
    out = tmp_path / "bench.json"
    assert bench_models_gpu.main([*FP8_AESTHETIC, "--compile", "inductor", "--out", str(out)]) == 0
    # the fp16 tower, the fp8 form with and then without wide reductions, the baseline without
    assert calls == [("inductor", False), ("inductor", True), ("inductor", False), ("inductor", False)]
    stages = json.loads(out.read_text())["stages"]
    failed = stages["aesthetic_fp8_compiled_wide_reductions"]
    assert failed["error"] == "RuntimeError: multi-kernel failed" and "multi-kernel" in failed["model"]
    form = stages["aesthetic_fp8_compiled"]
    assert form["clips_per_s"] > 0 and "multi-kernel" not in form["model"]
    assert "biases added by the GEMMs" in form["model"]
    baseline = stages["aesthetic_fp8_unfused_compiled"]
    assert baseline["clips_per_s"] > 0 and "multi-kernel" not in baseline["model"]
    assert re.search(r"aesthetic_fp8_compiled_wide_reductions +failed: RuntimeError", capsys.readouterr().out)


def test_text_tower_forms_label_the_per_call_rows_and_a_failed_compile_leaves_it_eager(tmp_path):
    """The per-call alignment rows name the form the stage was left in; a text-tower compile that fails
    is an error row and the stage goes back to the eager tower (it raised again in the per-call rows,
    and the bench stopped without its JSON)."""
    from torch._dynamo import register_backend

    from pipeline.bench_models_gpu import main

    @register_backend(name="inbetweener_test_broken")
    def broken(graph, example_inputs):
        raise RuntimeError("backend broke")

    args = [
        "--device",
        "cpu",
        "--tiny",
        "--stages",
        "alignment",
        "--clips-per-call",
        "3",
    ]  # open_clip's tower
    for backend, form in (("eager", "alignment_compiled"), ("inbetweener_test_broken", "alignment")):
        out = tmp_path / f"{backend}.json"
        assert main([*args, "--compile", backend, "--out", str(out)]) == 0
        stages = json.loads(out.read_text())["stages"]
        per_call = stages["alignment_3_per_call"]
        assert per_call["form"] == form and per_call["model"] == stages[form]["model"], backend
        assert per_call["clips_per_s"] > 0
    assert "backend broke" in stages["alignment_compiled"]["error"]
