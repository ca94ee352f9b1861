"""The models directory, `inbetweener models` (list / check / download offline) and the lineage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from inbetweener_cli import main as cli
from pipeline.models import (
    AESTHETIC_FILE,
    CRAFT_FILE,
    ENV_VAR,
    add_lineage,
    check_weights,
    file_sha256,
    resolve_models_dir,
    safetensors_header,
)


def test_models_dir_is_the_flag_then_the_env_var_then_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_models_dir() == Path.home() / ".cache" / "inbetweener" / "models"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_models_dir() == tmp_path / "env"
    assert resolve_models_dir(tmp_path / "flag") == tmp_path / "flag"


def test_list_shows_every_stage_file_and_where_it_comes_from(tmp_path, capsys, monkeypatch):
    import torch

    from pipeline.stages.aesthetic import build_aesthetic_mlp

    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    (tmp_path / "aesthetic").mkdir()
    torch.save(build_aesthetic_mlp(768).state_dict(), tmp_path / AESTHETIC_FILE)  # the released layout
    assert cli(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"models directory: {tmp_path} (${ENV_VAR})" in out
    assert f"{CRAFT_FILE}  missing (optional)" in out  # auto falls back to the embedded PP-OCR
    assert "[embedded]" in out and "ch_PP-OCRv4_det_infer.onnx" in out
    digest = file_sha256(tmp_path / AESTHETIC_FILE)
    assert f"{AESTHETIC_FILE}  present  3.5 MB  sha256 {digest}" in out
    assert (
        "open_clip/ViT-L-14.openai.safetensors  MISSING  <- huggingface.co/timm/vit_large_patch14_clip_224.openai"
        in out
    )
    assert "hf/Salesforce/blip2-opt-2.7b  MISSING  <- huggingface.co/Salesforce/blip2-opt-2.7b" in out
    assert json.loads((tmp_path / ".sha256.json").read_text())  # hashes are cached


def test_list_shows_the_other_jobs_weights_and_accepts_converted_copies(tmp_path, capsys):
    """interpolate, evaluate and train look their files up in the same folder: the listing names each with
    its source, and finds the converted copy `inbetweener convert` writes in the original's place."""
    (tmp_path / "tooncrafter").mkdir()
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(500)}, str(tmp_path / "tooncrafter" / "model.safetensors"))  # 2,000 + header
    assert cli(["models", "--models-dir", str(tmp_path), "list", "--no-hashes"]) == 0
    out = capsys.readouterr().out
    jobs = [line for line in out.splitlines() if line.startswith("job ")]
    assert jobs[:4] == ["job curate", "job interpolate", "job evaluate", "job train"]
    assert "tooncrafter/model.safetensors  present  2.0 KB  (ToonCrafter" in out
    assert "tooncrafter/sketch_encoder.ckpt  missing  (the sketch encoder, for --sketch" in out
    assert (
        "i3d/i3d_torchscript.pt  missing  (Kinetics-400 I3D as TorchScript, for FVD and KVD)  <- https://"
        in out
    )
    assert "lpips/vgg.pth  missing" in out and "--init" in out
    assert cli(["models", "--models-dir", str(tmp_path), "list", "text", "--no-hashes"]) == 0
    assert "job interpolate" not in capsys.readouterr().out  # asked for one stage: that stage only


def test_check_names_each_missing_file_and_the_command_that_fetches_it(tmp_path, capsys):
    assert cli(["models", "--models-dir", str(tmp_path), "check", "caption", "alignment"]) == 1
    err = capsys.readouterr().err
    assert f"caption: missing weights: {tmp_path}/hf/Salesforce/blip2-opt-2.7b" in err
    assert f"inbetweener models --models-dir {tmp_path} download caption" in err
    assert "alignment: missing weights" in err and "ViT-L-14.openai.safetensors" in err
    assert check_weights(["text"], tmp_path) == []  # auto text backend: nothing required


def test_download_fails_at_once_and_clearly_when_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli(["models", "--models-dir", str(tmp_path), "download", "aesthetic"]) == 1
    assert "offline mode (HF_HUB_OFFLINE=1)" in capsys.readouterr().err
    assert not (tmp_path / AESTHETIC_FILE).exists()
    assert cli(["models", "download", "nonsense"]) == 2


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        cli(["models", "--help"])
    assert "inbetweener models download aesthetic" in capsys.readouterr().out


def test_truncated_safetensors_header_is_detected(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipeline.models import WeightsError

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(10, 10), "b": torch.ones(3)}, path)
    assert {k: v["shape"] for k, v in safetensors_header(path).items()} == {"a": [10, 10], "b": [3]}
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="truncated"):
        safetensors_header(path)


def test_a_pickle_where_safetensors_go_and_safetensors_where_a_pickle_goes_are_told_apart(tmp_path):
    """A torch.save file under the CLIP safetensors name was 'truncated or not a safetensors file (header
    of 578712552184433488 bytes)'; the same tensors as safetensors under the MLP's .pth name were
    'cannot be read as a PyTorch state dict: Unsupported operand 168'."""
    import torch
    from safetensors.torch import save_file

    from pipeline.models import WeightsError, load_torch_state_dict

    tensors = {"a": torch.zeros(10, 10), "b": torch.ones(3)}
    pickled = tmp_path / "w.safetensors"
    torch.save(tensors, pickled)
    with pytest.raises(
        WeightsError, match=r"w.safetensors: a PyTorch file \(torch.save.*\), not safetensors"
    ):
        safetensors_header(pickled)
    safe = tmp_path / "w.pth"
    save_file(tensors, safe)
    assert {k: tuple(v.shape) for k, v in load_torch_state_dict(safe).items()} == {"a": (10, 10), "b": (3,)}
    safe.write_bytes(safe.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="w.pth: truncated"):
        load_torch_state_dict(safe)


def test_lineage_merges_stages():
    row = add_lineage({}, "text", "ppocr:det.onnx", "aa")
    row = add_lineage(row, "aesthetic", "laion", "bb", clip_sha256="cc")
    assert json.loads(row["models"]) == {
        "aesthetic": {"model": "laion", "sha256": "bb", "clip_sha256": "cc"},
        "text": {"model": "ppocr:det.onnx", "sha256": "aa"},
    }


def test_the_other_jobs_broken_files_are_not_called_present(tmp_path, capsys):
    """A cut model.ckpt (its zip directory gone), a folder under a file's name, a 0-byte I3D and a Git LFS
    pointer were all listed as 'present'; a models dir that is a file listed everything as missing."""
    import torch

    (tmp_path / "tooncrafter").mkdir()
    torch.save({"w": torch.zeros(4096)}, tmp_path / "whole.ckpt")
    whole = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "tooncrafter" / "model.ckpt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "tooncrafter" / "sketch_encoder.ckpt").mkdir()
    (tmp_path / "i3d").mkdir()
    (tmp_path / "i3d" / "i3d_torchscript.pt").write_bytes(b"")
    (tmp_path / "lpips").mkdir()
    (tmp_path / "lpips" / "alex.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    # bytes of no weight format, and a safetensors file cut inside its header, were "present" too
    (tmp_path / "lpips" / "vgg.pth").write_bytes(random.Random(0).randbytes(4096))
    from safetensors.torch import save_file

    save_file({f"w{i}": torch.zeros(8) for i in range(50)}, str(tmp_path / "whole.safetensors"))
    cut = (tmp_path / "whole.safetensors").read_bytes()[:200]
    (tmp_path / "lpips" / "vgg16-397923af.pth").write_bytes(cut)
    assert cli(["models", "--models-dir", str(tmp_path), "list", "--no-hashes"]) == 0
    out = capsys.readouterr().out
    assert "tooncrafter/model.ckpt  BROKEN: truncated: the zip directory" in out
    assert "tooncrafter/sketch_encoder.ckpt  BROKEN: a folder, not a weight file" in out
    assert "i3d/i3d_torchscript.pt  BROKEN: an empty file (0 bytes)" in out
    assert "lpips/alex.pth  BROKEN: a Git LFS pointer" in out
    assert "lpips/vgg.pth  BROKEN: its first bytes are neither a safetensors header nor a PyTorch file" in out
    assert "lpips/vgg16-397923af.pth  BROKEN: truncated: a safetensors header of" in out
    assert cli(["models", "--models-dir", str(tmp_path / "whole.ckpt"), "list"]) == 2
    assert "whole.ckpt is a file, not a models folder" in capsys.readouterr().err
    assert check_weights(["aesthetic"], tmp_path / "whole.ckpt") == [
        f"the models dir {tmp_path / 'whole.ckpt'} is a file, not a folder (set by --models-dir or ${ENV_VAR})"
    ]


def test_a_folders_hash_leaves_out_hidden_paths(tmp_path):
    """huggingface_hub's download records (.cache/huggingface/download/*.metadata) hold a timestamp: two
    identical downloads had two lineage hashes."""
    for name, stamp in (("a", "1700000000"), ("b", "1800000000")):
        folder = tmp_path / name
        (folder / ".cache" / "huggingface" / "download").mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text(
            f"etag\n{stamp}\n"
        )
    assert file_sha256(tmp_path / "a", tmp_path) == file_sha256(tmp_path / "b", tmp_path)


def test_a_clip_model_name_that_names_no_model_is_a_problem_not_a_traceback(tmp_path):
    """aesthetic.clip_model with a typo: a ValueError traceback out of the pre-check (and --dry-run)."""
    import torch
    from safetensors.torch import save_file

    from pipeline.stages.aesthetic import AestheticStage

    stage = AestheticStage(models_dir=str(tmp_path), clip_model="ViT-L-14-typo")
    for wf in stage.weight_files():
        (tmp_path / wf.path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.zeros(1)}, str(tmp_path / wf.path))  # readable: its keys are compared next
    problems = check_weights([stage], tmp_path)
    assert any("unknown open_clip model 'ViT-L-14-typo'" in p for p in problems), problems


def test_building_a_clip_model_says_nothing_of_random_weights(tmp_path, caplog):
    """open_clip's 'No pretrained weights loaded ... Model initialized randomly' came twice with every models
    check and curate run, though our loader loads the weights next."""
    import logging

    from pipeline.stages.aesthetic import clip_shapes

    with caplog.at_level(logging.WARNING):
        assert clip_shapes("ViT-B-32", "openai", tmp_path)
    assert "initialized randomly" not in caplog.text
