"""The whole curate job with every model stage, on Ray local, with tiny random models saved in the
real on-disk formats and loaded through the real loaders (no downloadable weights needed)."""

from __future__ import annotations

import json

import pytest
from test_models_caption import REPO, save_tiny_blip2
from test_models_clip import TAG, TINY, save_tiny_clip_models

from manifests import read_manifest
from manifests.io import list_shards
from pipeline import samples
from pipeline.cli import curate_main, report_main
from pipeline.models import craft_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    import torch
    from easyocr.craft import CRAFT

    root = save_tiny_clip_models(tmp_path_factory.mktemp("models"))
    craft = root / craft_file().path
    craft.parent.mkdir(parents=True)
    torch.save(
        {f"module.{k}": v for k, v in CRAFT(pretrained=False, freeze=False).state_dict().items()}, craft
    )
    save_tiny_blip2(root / "hf" / REPO)
    return root


def test_curate_with_every_model_stage(models_dir, tmp_path, capsys):
    footage = tmp_path / "footage"
    samples.generate_footage(footage)
    out = tmp_path / "out"
    sets = [
        f"aesthetic.clip_model={TINY}", f"aesthetic.clip_pretrained={TAG}",
        f"alignment.clip_model={TINY}", f"alignment.clip_pretrained={TAG}",
        f"caption.model={REPO}", "caption.max_new_tokens=4",
        "text.backend=craft", "text.canvas_size=320",
        # random models give arbitrary scores: no threshold on them, the plumbing is what is tested
        "aesthetic.min=null", "alignment.min=null", "text.max=null",
        "split.by_source=false", "split.eval_size=2", "split.max_eval_fraction=0.5",
    ]  # fmt: skip
    args = [str(footage), "--out", str(out), "--models-dir", str(models_dir), "--quiet"]
    assert curate_main(args + [a for s in sets for a in ("--set", s)]) == 0
    rows = read_manifest(out / "manifest.parquet").to_pylist()
    clips = [r for r in rows if r["status"] != "error"]
    assert clips and all(
        r["text_backend"] == "craft" and r["text_area"] is not None and r["aesthetic_min"] is not None
        and isinstance(r["caption"], str) and r["clip_sim_min"] is not None
        for r in clips
    )  # fmt: skip
    assert all(set(r["stages_run"]) >= {"text", "aesthetic", "caption", "alignment"} for r in clips)
    lineage = json.loads(clips[0]["models"])
    assert set(lineage) >= {"text", "aesthetic", "caption", "alignment"}
    kept = [r for r in rows if r["status"] == "kept"]
    assert sum(r["split"] == "eval" for r in kept) == 2
    assert len(list_shards(out / "shards" / "eval")) == 1
    import webdataset as wds

    texts = {
        s["__key__"]: s["txt"].decode()
        for s in wds.WebDataset([str(p) for p in list_shards(out / "shards" / "train")], shardshuffle=False)
    }
    by_key = {r["key"]: r for r in kept}
    assert texts and all(texts[k] == by_key[k]["caption"] for k in texts)
    assert report_main([str(out), "--leaks"]) == 0

    # the aesthetic MLP replaced under its name (another download): a rerun mixed two models' scores
    import torch

    from pipeline import models as models_module
    from pipeline.models import aesthetic_file

    def no_hashing(*args, **kwargs):
        raise AssertionError("a rerun hashed the unchanged weights (15 GB of BLIP-2 on every run)")

    real_sha = models_module.file_sha256
    models_module.file_sha256 = no_hashing
    try:  # nothing changed: the rerun is a no-op and hashes nothing
        assert curate_main(args + [a for s in sets for a in ("--set", s)]) == 0
    finally:
        models_module.file_sha256 = real_sha
    mlp = models_dir / aesthetic_file().path
    original = mlp.read_bytes()
    state = torch.load(mlp, weights_only=True)
    torch.save({k: v + 0.01 for k, v in state.items()}, mlp)
    try:
        assert curate_main(args + [a for s in sets for a in ("--set", s)]) == 2
    finally:
        mlp.write_bytes(original)
    assert "holds work scored with other weights: aesthetic:" in capsys.readouterr().err


def test_missing_weights_stop_the_job_before_any_work(tmp_path, capsys):
    footage = tmp_path / "footage"
    samples.generate_footage(footage)
    out = tmp_path / "out"
    code = curate_main([str(footage), "--out", str(out), "--models-dir", str(tmp_path / "empty"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "sac+logos+ava1-l14-linearMSE.pth" in err and "--skip" in err
    assert f"inbetweener models --models-dir {tmp_path / 'empty'} download STAGE" in err  # where it looked
    assert not (out / ".work" / "sources").exists()
    # the advice taken: the same --out runs with those stages skipped, without --restart (nothing was scored)
    skips = ["--skip", "aesthetic,caption,alignment"]
    code = curate_main([str(footage), "--out", str(out), "--models-dir", str(tmp_path / "empty"), "--quiet",
                        "--limit", "1", *skips])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    # scored work is still protected: another scoring config on it stops, naming what changed
    code = curate_main([str(footage), "--out", str(out), "--quiet", "--limit", "1", "--skip", "alignment"])
    assert (
        code == 2
        and "holds work scored with a different config (aesthetic, caption)" in capsys.readouterr().err
    )
    # work scored by an earlier version (without probe.ivtc, which changes what some sources give) is
    # not mixed with this version's: the run stops and says so, and --dry-run says the same
    state = out / ".work" / "state.json"
    saved = json.loads(state.read_text())
    del saved["scoring"]["probe"]["ivtc"]
    state.write_text(json.dumps(saved))
    args = [
        str(footage),
        "--out",
        str(out),
        "--models-dir",
        str(tmp_path / "empty"),
        "--quiet",
        "--limit",
        "1",
        *skips,
    ]
    assert curate_main(args) == 2
    assert (
        "holds work scored with an earlier version of inbetweener, without probe.ivtc"
        in capsys.readouterr().err
    )
    assert curate_main([*args, "--dry-run"]) == 0
    assert "an earlier version of inbetweener, without probe.ivtc: run would stop" in capsys.readouterr().out
