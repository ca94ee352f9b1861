"""training.profile_unet (the UNet forward's GPU profile) runs end to end in its CPU smoke mode."""

from __future__ import annotations

import json

import pytest
import torch

from training import profile_unet
from training.models.unet import TEMPORAL_CONV_IMPLS, UNET_PRESETS, TemporalConvBlock, UNet3D


def test_profile_smoke_mode_times_parts_and_temporal_conv_variants(tmp_path):
    out = tmp_path / "unet.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--frames", "4", "--height", "8", "--width", "8",
            "--repeats", "1", "--kernels", "5", "--json", str(out)]  # fmt: skip
    assert profile_unet.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["forward_s"]) == set(TEMPORAL_CONV_IMPLS)
    assert report["temporal_conv"] == min(report["forward_s"], key=report["forward_s"].get)
    parts = report["parts_s"]
    total = parts.pop("total")
    assert total > 0
    for name in ("temporal conv blocks", "resblocks' spatial layers", "spatial transformers",
                 "temporal transformers", "init attention", "attention kernels: spatial self"):  # fmt: skip
        assert 0 < parts[name] < total, name
    top_level = [v for k, v in parts.items() if not k.startswith("attention kernels")]
    assert abs(sum(top_level) - total) <= 1e-3 * total + 1e-4  # the parts and the rest add up to the forward
    blocks = sum(isinstance(m, TemporalConvBlock) for m in UNet3D(UNET_PRESETS["tiny"]).modules())
    rows = report["temporal_conv_s"]
    assert sum(r["blocks"] for r in rows) == blocks  # every block's shape is timed
    assert all(r[v]["forward_s"] > 0 for r in rows for v in ("conv3d", "conv3d channels_last_3d", "conv2d"))
    assert "Name" in report["kernels"]


def test_flops_by_level_adds_up_to_the_whole_forward(tmp_path, capsys):
    """The per-level split that train.checkpoint_levels trades: every block lands in one level, and
    the levels plus the rest are exactly FlopCounterMode's count of the whole forward."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = profile_unet.flops_by_level("tiny", 1, 2, 8, 8)
    assert [k for k in counts if k.startswith("level")] == ["level 0", "level 1", "level 2"]  # widths 8, 4, 2
    assert all(counts[f"level {i}"] > 0 for i in range(3)) and counts["rest"] > 0
    with torch.device("meta"):  # where the split is counted (attention counts as the reference's does)
        unet = UNet3D(UNET_PRESETS["tiny"]).eval()
    x, timesteps, context, fs = profile_unet.inputs(unet, 1, 2, 8, 8, torch.device("meta"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, timesteps, context, fs=fs)
    assert counts["total"] == counter.get_total_flops()
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    out = tmp_path / "levels.json"
    argv = ["--preset", "tiny", "--flops-by-level", "--batch", "1", "--frames", "2", "--height", "8",
            "--width", "8", "--json", str(out)]  # fmt: skip
    assert profile_unet.main(argv) == 0
    assert json.loads(out.read_text())["flops"] == counts
    assert "level 2" in capsys.readouterr().out


def test_layout_decisions_follow_inductors_rule_block_by_block(tmp_path, capsys):
    """--layout-decisions labels each training block with inductor's own verdict on its traced graph;
    for training graphs the heuristic's rule can be read off the block's convs: NCHW when a conv with
    a kernel longer than 1 has at least twice as many input as output channels, or when every conv is
    narrow (<= 64 channels each way), else channels-last."""
    from torch import nn

    out = tmp_path / "layout.json"
    argv = ["--preset", "tiny", "--layout-decisions", "--batch", "1", "--frames", "2", "--height", "8",
            "--width", "8", "--json", str(out)]  # fmt: skip
    assert profile_unet.main(argv) == 0
    report = json.loads(out.read_text())
    unet = UNet3D(UNET_PRESETS["tiny"])
    blocks = {f"input_blocks.{i}": b for i, b in enumerate(unet.input_blocks)}
    blocks |= {"middle_block": unet.middle_block}
    blocks |= {f"output_blocks.{i}": b for i, b in enumerate(unet.output_blocks)}
    assert list(report["training"]) == list(blocks)
    verdicts = set()
    for name, block in blocks.items():
        convs = [m.weight.shape for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        narrowing = any(w[0] * 2 <= w[1] and w[2] > 1 for w in convs)
        narrow = all(w[0] <= 64 and w[1] <= 64 for w in convs)
        expected = bool(convs) and not narrowing and not narrow
        assert report["training"][name] == [expected], name  # one graph each, no convs: NCHW
        verdicts.add(expected)
    assert verdicts == {True, False}  # the tiny preset has blocks of both kinds
    assert len(report["sampling"]) == 1  # the whole UNet is one graph
    printed = capsys.readouterr().out
    assert "sampling, whole UNet:" in printed and "training, output_blocks.1: channels-last" in printed


def test_kernel_kinds_sort_real_kernel_names_and_sum_shares():
    """The profile tables group kernels by what they do, from the names seen on the H100 profiles."""
    from training.profile_unet import kernel_kind, kernel_shares

    names = {
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16>": "layout conversion",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64": "attention",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x": "convolution",
        "sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT": "matmul",
        "triton_per_fused_native_group_norm_silu_0": "norm",
        "triton_poi_fused_convolution_convert_element_type_1": "fused (inductor triton)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<Adam>": "optimizer",
        "something new": "other",
    }
    for name, kind in names.items():
        assert kernel_kind(name) == kind, name
    lines = kernel_shares([("nvjet_a", 3.0), ("triton_poi_x", 1.0), ("nvjet_b", 1.0)]).splitlines()
    assert lines == ["  matmul: 4.0 ms (80.0%)", "  fused (inductor triton): 1.0 ms (20.0%)"]


def test_roofline_counts_attention_as_flash_runs_it():
    """Attention is one op each way that moves q, k, v and the output (and the gradients), never the
    L x L scores, and none of the math path's own ops (scaling, softmax) count; its backward's model FLOPs
    are twice the forward's, its time includes the recomputed scores. A linear moves its input, weight and
    output; a weight broadcast over a batched matmul is read once."""
    q, k, v = (torch.empty(1, 2, 32, 8, device="meta", requires_grad=True) for _ in range(3))
    with profile_unet.RooflineMode(peak=1e12, bandwidth=1e9) as mode:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.backward(torch.empty_like(out))
    forward = 2 * (2 * 2 * 32 * 32 * 8)  # QK^T and PV: 2 * M * N * K each
    ops, flops, moved, seconds, _ = mode.kinds["attention"]
    assert (ops, flops) == (2, forward + 2 * forward)
    # bf16 bytes: forward q, k, v, out; backward q, k, v, out, its gradient, and the three gradients
    assert moved == 2 * q.numel() * (4 + 8)
    assert seconds == pytest.approx(moved / 1e9)  # memory-bound at this bandwidth
    assert set(mode.kinds) == {"attention"}
    x, w = torch.empty(64, 16, device="meta"), torch.empty(32, 16, device="meta")
    with profile_unet.RooflineMode(peak=1e12, bandwidth=1e15) as mode:
        torch.nn.functional.linear(x, w)
        torch.bmm(torch.empty(4, 64, 16, device="meta"), w.t().expand(4, 16, 32))
    ops, flops, moved, seconds, bound = mode.kinds["matmul"]
    one = 2 * 64 * 16 * 32
    assert (ops, flops) == (2, 5 * one)
    assert moved == 2 * (64 * 16 + 32 * 16 + 64 * 32) + 2 * (4 * 64 * 16 + 32 * 16 + 4 * 64 * 32)
    assert seconds == pytest.approx(flops / 1e12) and bound == 0  # compute-bound at this bandwidth


def test_roofline_of_the_rectify_step_is_the_bench_numerator(tmp_path, capsys):
    """The step it traces is the one training.bench_gpu times: the same FLOPs per clip as MFU's numerator,
    and no kind runs faster than its FLOPs at the peak or its bytes at the bandwidth allow."""
    from training.bench_gpu import count_flops

    assert (
        profile_unet.main(
            ["--roofline", "--preset", "tiny", "--batch", "2", "--json", str(tmp_path / "r.json")]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["total_flops"] == 2 * count_flops("rectify", "tiny")
    for kind in report["kinds"].values():
        assert kind["roofline_s"] >= kind["flops"] / report["peak_flops"] * (1 - 1e-9)
        assert kind["roofline_s"] >= kind["bytes"] / report["bandwidth"] * (1 - 1e-9)
    assert report["floor_s"] <= report["unfused_s"]
    assert {"convolution", "matmul", "other (unfused)"} <= set(report["kinds"])
    assert "MFU at most" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--batch must be > 0"):
        profile_unet.main(["--roofline", "--preset", "tiny", "--batch", "0"])
