"""The GPU check's script runs end to end in its CPU smoke mode (the numbers come from a GPU run)."""

from __future__ import annotations

import json

import torch

from inference import bench_gpu


def test_bench_smoke_mode_reports_time_per_sample(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--height", "32", "--width", "64",
            "--repeats", "1", "--compile", "off", "--no-clip", "--json", str(out),
            "--temporal-conv", "conv2d", "--profile", str(tmp_path / "kernels.txt"), "--profile-rows", "5",
            "--cudnn-benchmark", "--clip-resident"]  # fmt: skip
    assert bench_gpu.main(argv) == 0
    printed = capsys.readouterr().out
    # the warm-up sample's phases are printed as each ends: a run stopped mid-compile still tells where
    assert [
        p for p in ("context", "encode", "sampling", "decode") if f"eager first sample, {p}:" in printed
    ] == [
        "context",
        "encode",
        "sampling",
        "decode",
    ]
    report = json.loads(out.read_text())
    assert report["temporal_conv"] == "conv2d"
    assert "Name" in (tmp_path / "kernels.txt").read_text()  # the profiler's table of one more sample
    run = report["runs"]["eager"]
    assert report["shape"] == {"frames": 16, "height": 32, "width": 64} and report["dtype"] == "float32"
    assert run["seconds_per_sample"] > 0 and set(run["phases_s"]) == {
        "context",
        "encode",
        "sampling",
        "decode",
        "total",
    }
    assert "Resampler" in report["context"]
    # the same mode timed again with cuDNN's autotuning, after one untimed tuning sample; flag restored
    tuned = report["runs"]["eager, cudnn.benchmark"]
    assert tuned["tuning_sample_s"] > 0 and tuned["seconds_per_sample"] > 0 and tuned["repeats"] == 1
    assert set(tuned["phases_s"]) == set(run["phases_s"])
    assert torch.backends.cudnn.benchmark is False
    # and again with the CLIP towers kept on the device (on the CPU they never leave it)
    resident = report["runs"]["eager, CLIP towers on the device"]
    assert resident["seconds_per_sample"] > 0 and set(resident["phases_s"]) == set(run["phases_s"])
    assert "eager, CLIP towers on the device:" in printed


def test_staged_compile_times_the_unet_alone_then_with_the_decoder(tmp_path, monkeypatch, capsys):
    """--compile staged: the UNet compiled with the decoder eager first, then the decoder's blocks too,
    each mode written to the JSON as soon as it is timed (torch.compile's eager backend here: the
    plumbing is what is tested; inductor on a GPU)."""
    real = torch.compile

    def eager_backend(model=None, **kwargs):
        return real(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_backend)
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--height", "32", "--width", "64",
            "--repeats", "1", "--compile", "staged", "--no-clip", "--json", str(out)]  # fmt: skip
    try:
        assert bench_gpu.main(argv) == 0
    finally:
        torch._dynamo.reset()
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["compiled, UNet only", "compiled"]
    assert report["compiled_decoder_blocks"]["compiled, UNet only"] == 0
    assert report["compiled_decoder_blocks"]["compiled"] > 0
    assert all(run["seconds_per_sample"] > 0 for run in report["runs"].values())
    assert "compiled, UNet only first sample, sampling:" in capsys.readouterr().out


def test_cuda_graph_row_replays_the_unet_on_its_full_batch_of_inputs(tmp_path, monkeypatch):
    """--cuda-graph: after the mode's rows, the UNet call is wrapped (GraphedCall on a GPU), measured
    against the direct call on a real sample's inputs, and timed. On the CPU the wrapper below stands in
    for the CUDA graph: what is tested is that the bench hands it the sampler's own batch-2 UNet inputs."""
    seen = []

    class Direct:
        def __init__(self, fn):
            self.fn = fn

        @staticmethod
        def applies(device):
            return True

        def __call__(self, *a, **kw):
            seen.append(tuple(a[0].shape))
            return self.fn(*a, **kw)

        def max_difference(self, *a, **kw):
            return (self(*a, **kw) - self.fn(*a, **kw)).abs().max().item()

    monkeypatch.setattr(bench_gpu, "GraphedCall", Direct)
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--height", "32", "--width", "64",
            "--repeats", "1", "--compile", "off", "--no-clip", "--json", str(out), "--clip-resident",
            "--cuda-graph"]  # fmt: skip
    assert bench_gpu.main(argv) == 0
    report = json.loads(out.read_text())
    run = report["runs"]["eager, UNet as a CUDA graph, CLIP towers on the device"]
    assert run["max_abs_difference_to_direct_call"] == 0.0 and run["seconds_per_sample"] > 0
    # both guidance branches in one call, the input given once: 8 channels (latent + concat), 16 frames, 1/8 size
    assert seen and set(seen) == {(1, 8, 16, 4, 8)}
    assert len(seen) == 1 + 2  # the difference check, then one timed sample of 2 steps


def test_graphed_call_is_used_only_on_a_cuda_device():
    from inference.cuda_graph import GraphedCall
    from inference.sampler import InferenceModel
    from training.models.tooncrafter import build_tooncrafter

    assert GraphedCall.applies(torch.device("cuda", 0)) and not GraphedCall.applies(torch.device("cpu"))
    im = InferenceModel(build_tooncrafter("tiny"), "cpu", torch.float32, cuda_graph=True)
    assert im.cuda_graph is False and not isinstance(im.unet, GraphedCall)
