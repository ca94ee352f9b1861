"""aesthetic + alignment: a tiny open_clip model and the predictor MLP, randomly initialised, saved
in the real on-disk formats into a temporary models dir and loaded through the real loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import samples
from pipeline.models import WeightsError, aesthetic_file, check_weights, clip_path
from pipeline.stages.aesthetic import AestheticStage, build_aesthetic_mlp, clip_preprocess, mlp_shapes
from pipeline.stages.alignment import AlignmentStage

TINY = "tiny-clip-test"
TAG = "random"
TINY_CFG = {  # open_clip's model config format; vocab and context as ViT-L-14 so its tokenizer fits
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_clip_models(tmp_path_factory.mktemp("models"))


def save_tiny_clip_models(root):
    """A tiny open_clip model and the aesthetic MLP, saved as the real files into a models dir."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    (root / "open_clip").mkdir()
    (root / "open_clip" / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / "open_clip" / f"{TINY}.json")
    torch.manual_seed(0)
    net = open_clip.create_model(TINY, pretrained=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, root / clip_path(TINY, TAG))
    head = build_aesthetic_mlp(TINY_CFG["embed_dim"])
    (root / "aesthetic").mkdir()
    torch.save(head.state_dict(), root / aesthetic_file().path)
    return root


def frames(shot, n=3):
    it = samples.shot_frames(shot, 0, (512, 320), 24)
    out = [next(it) for _ in range(24)]
    return [out[0], out[len(out) // 2], out[-1]][:n]


def clip_rows():
    return [
        {"row_kind": "clip", "clip_id": "a", "keyframes": frames(samples.EPISODES["episode_01.mp4"][1])},
        {"row_kind": "clip", "clip_id": "b", "keyframes": frames(samples.TITLE)},
        {"row_kind": "clip", "clip_id": "short", "status": "rejected"},  # no keyframes: untouched
    ]


def test_predictor_has_the_released_layout():
    shapes = mlp_shapes(768)
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }


def test_aesthetic_matches_open_clip_own_pipeline(models):
    import open_clip
    import torch
    from PIL import Image

    stage = AestheticStage(clip_model=TINY, clip_pretrained=TAG, models_dir=str(models), device="cpu")
    assert check_weights([stage]) == []
    stage.setup()
    rows = clip_rows()
    out = list(stage.process_rows(rows))
    assert out[2] == rows[2]
    a = out[0]
    assert a["clip_image_emb"].shape == (3, 32) and a["clip_image_emb"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a["clip_image_emb"], axis=1), 1.0, rtol=1e-5)
    assert a["aesthetic_min"] == min(a["aesthetic_first"], a["aesthetic_mid"], a["aesthetic_last"])
    lineage = json.loads(a["models"])["aesthetic"]
    assert len(lineage["sha256"]) == 64 and len(lineage["clip_sha256"]) == 64

    # the reference: open_clip's own loader and eval transform, the MLP applied as the release does
    ref, _, preprocess = open_clip.create_model_and_transforms(
        TINY, pretrained=str(models / clip_path(TINY, TAG))
    )
    head = build_aesthetic_mlp(32)
    head.load_state_dict(torch.load(models / aesthetic_file().path, weights_only=True))
    keyframes = rows[0]["keyframes"]
    pil = torch.stack([preprocess(Image.fromarray(f)) for f in keyframes])
    mine = clip_preprocess(torch.from_numpy(np.stack(keyframes)), ref.visual.preprocess_cfg)
    assert mine.shape == pil.shape == (3, 3, 32, 32)
    # PIL rounds to 8 bits between its two resize passes: a few levels apart on outlines, ~0 elsewhere
    assert (mine - pil).abs().max() < 0.1 and (mine - pil).abs().mean() < 0.002
    with torch.no_grad():
        emb = torch.nn.functional.normalize(ref.eval().encode_image(mine), dim=-1)
        scores = head.eval().layers(emb)[:, 0].numpy()
    np.testing.assert_allclose(a["clip_image_emb"], emb.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        [a["aesthetic_first"], a["aesthetic_mid"], a["aesthetic_last"]], scores, atol=1e-5
    )


def test_alignment_reuses_the_image_embeddings(models):
    aesthetic = AestheticStage(clip_model=TINY, clip_pretrained=TAG, models_dir=str(models), device="cpu")
    aesthetic.setup()
    rows = [{**r, "caption": "a cartoon character walking"} for r in aesthetic.process_rows(clip_rows())]
    stage = AlignmentStage(clip_model=TINY, clip_pretrained=TAG, models_dir=str(models), device="cpu")
    stage.setup()
    calls = []
    stage._clip.visual.register_forward_hook(lambda *args: calls.append(1))
    out = list(stage.process_rows(rows))
    assert calls == []  # the image tower never ran: the stored embeddings were used
    text = stage.text_embeddings(["a cartoon character walking"])[0]
    a = out[0]
    np.testing.assert_allclose(
        [a["clip_sim_first"], a["clip_sim_mid"], a["clip_sim_last"]],
        rows[0]["clip_image_emb"] @ text,
        rtol=1e-5,
    )
    assert a["clip_sim_min"] == min(a["clip_sim_first"], a["clip_sim_mid"], a["clip_sim_last"])
    assert "clip_sim_min" not in out[2]  # no keyframes, no caption: not scored

    # without the column (aesthetic skipped) the same numbers come from one image forward here
    bare = {k: v for k, v in rows[0].items() if k != "clip_image_emb"}
    again = next(stage.process_rows([bare]))
    assert calls == [1]
    assert again["clip_sim_mid"] == pytest.approx(a["clip_sim_mid"], abs=1e-5)
    assert next(stage.process_rows([{**rows[0], "caption": None}])).get("clip_sim_min") is None


def test_text_tower_runs_only_up_to_the_longest_caption_with_open_clip_results(models):
    import torch

    stage = AlignmentStage(clip_model=TINY, clip_pretrained=TAG, models_dir=str(models), device="cpu")
    stage.setup()
    captions = ["a cat", "a cartoon character walks across a sunny meadow at noon", "word " * 100]
    seen = []
    stage._clip.transformer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    tokens = stage._tokenizer(captions)
    from pipeline.stages.clip_tokens import FastClipTokenizer

    assert isinstance(stage._tokenizer, FastClipTokenizer)  # open_clip's ids, its BPE in Rust
    with torch.inference_mode():
        full = torch.nn.functional.normalize(stage._clip.encode_text(tokens), dim=-1).numpy()
    assert seen == [77]
    for batch in ([0], [0, 1], [0, 1, 2]):  # the longest caption sets how far the tower runs
        got = stage.text_embeddings([captions[i] for i in batch])
        np.testing.assert_allclose(got, full[batch], atol=2e-6)
    longest_short = int(tokens[:2].argmax(dim=-1).max()) + 1
    assert seen[1:] == [int(tokens[0].argmax()) + 1, longest_short, 77]
    assert longest_short < 20


def test_missing_truncated_and_wrong_clip_weights_are_named(models, tmp_path):
    stage = AestheticStage(clip_model=TINY, clip_pretrained=TAG, models_dir=str(tmp_path), device="cpu")
    problems = check_weights([stage])
    assert len(problems) == 2
    assert any("sac+logos+ava1-l14-linearMSE.pth" in p and "download aesthetic" in p for p in problems)
    assert any(clip_path(TINY, TAG) in p for p in problems)

    (tmp_path / "open_clip").mkdir()
    (tmp_path / "aesthetic").mkdir()
    (tmp_path / "open_clip" / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    (tmp_path / aesthetic_file().path).write_bytes((models / aesthetic_file().path).read_bytes())
    weights = (models / clip_path(TINY, TAG)).read_bytes()
    (tmp_path / clip_path(TINY, TAG)).write_bytes(weights[: len(weights) // 2])
    (problem,) = check_weights([stage])
    assert clip_path(TINY, TAG) in problem and "truncated" in problem
    with pytest.raises(WeightsError, match="truncated"):
        stage.setup()

    import torch
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(4, 4)}, tmp_path / clip_path(TINY, TAG))
    (problem,) = check_weights([stage])
    assert "missing keys" in problem and "shape mismatches" in problem and "visual.proj" in problem


def tiny_stage(models, **settings) -> AestheticStage:
    """The aesthetic stage on the tiny saved CLIP, on the CPU, set up."""
    stage = AestheticStage(
        clip_model=TINY, clip_pretrained=TAG, models_dir=str(models), device="cpu", **settings
    )
    stage.setup()
    return stage


def test_compiled_image_tower_scores_like_eager_and_compiles_once(models):
    """aesthetic.compile: short chunks are padded to frames_per_forward, so the compiled tower meets
    one input shape (a recompile per batch size would cost more than compiling saves); frames sent in
    several chunks give the embeddings of one forward."""
    import torch
    from torch._dynamo import register_backend

    shapes = []

    @register_backend(name="inbetweener_test_counting")
    def counting(graph, example_inputs):
        shapes.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph.forward  # run the captured graph as it is

    torch._dynamo.reset()
    eager = tiny_stage(models)
    compiled = tiny_stage(models, compile="inbetweener_test_counting", frames_per_forward=6)
    chunked = tiny_stage(
        models, frames_per_forward=4
    )  # eager, frames sent in chunks of 4 (the last one short)
    rows = clip_rows()
    for batch in (rows[:2], rows[:1], rows):  # 6, 3 and 6 frames (the third row has no keyframes)
        want = list(eager.process_rows(batch))
        for got in (list(compiled.process_rows(batch)), list(chunked.process_rows(batch))):
            for w, g in zip(want, got, strict=True):
                if "aesthetic_min" in w:
                    np.testing.assert_allclose(g["clip_image_emb"], w["clip_image_emb"], atol=1e-5)
                    assert g["aesthetic_min"] == pytest.approx(w["aesthetic_min"], abs=1e-5)
                else:
                    assert "aesthetic_min" not in g
    assert len(shapes) == 1 and (6, 3, 32, 32) in shapes[0]  # one graph, of frames_per_forward images

    with pytest.raises(ValueError, match="aesthetic.compile: unknown torch.compile backend 'nope'"):
        AestheticStage(clip_model=TINY, clip_pretrained=TAG, models_dir=str(models), compile="nope").setup()


def test_only_the_fp8_tower_compiled_by_inductor_gets_persistent_wide_reductions():
    """aesthetic.precision=fp8 with aesthetic.compile=inductor: the tower is compiled with inductor's
    multi-kernel option (its MLP's 4,096-wide rowwise amax then has a one-read kernel to pick); other
    backends and the fp16 tower compile as before, and this torch's inductor takes the option."""
    from types import SimpleNamespace

    import torch

    from pipeline.stages.aesthetic import WIDE_REDUCTIONS, compile_image_tower

    got = []
    net = SimpleNamespace(visual=SimpleNamespace(compile=lambda **kw: got.append(kw)))
    compile_image_tower(net, "inductor", wide_reductions=True)
    compile_image_tower(net, "inductor")
    compile_image_tower(net, "eager", wide_reductions=True)
    compile_image_tower(net, "", wide_reductions=True)
    assert [g["options"] for g in got] == [WIDE_REDUCTIONS, None, None]
    assert all(g["backend"] in ("inductor", "eager") and g["dynamic"] is False for g in got)
    x = torch.randn(3, 2048)
    amax = torch.compile(lambda t: t.abs().amax(-1), backend="inductor", options=WIDE_REDUCTIONS)(x)
    torch.testing.assert_close(amax, x.abs().amax(-1))


def test_cuda_graph_gets_one_input_shape_and_gives_the_eager_embeddings(models):
    """aesthetic.cuda_graph: each chunk of same-size frames goes to the replayed call whole (uint8
    frames on the device, preprocessing inside the graph), padded to frames_per_forward so one
    recorded graph serves every chunk. On the CPU the option does nothing (GPU only). Here a spy with
    GraphedCall's contract stands in for the CUDA graph."""
    from pipeline.stages.aesthetic import embed_frames

    eager = tiny_stage(models)
    graphed = tiny_stage(models, frames_per_forward=4, cuda_graph=True)
    assert graphed._graphed is None  # no CUDA device: the option does nothing
    shapes = []

    def replay(frames):
        shapes.append((tuple(frames.shape), str(frames.dtype)))
        return embed_frames(graphed._clip, graphed._dtype, frames)

    graphed._graphed = replay
    rows = clip_rows()
    want, got = list(eager.process_rows(rows)), list(graphed.process_rows(rows))
    for w, g in zip(want, got, strict=True):
        if "aesthetic_min" in w:
            np.testing.assert_allclose(g["clip_image_emb"], w["clip_image_emb"], atol=1e-5)
            assert g["aesthetic_min"] == pytest.approx(w["aesthetic_min"], abs=1e-5)
    h, w = rows[0]["keyframes"][0].shape[:2]
    assert shapes == [((4, h, w, 3), "torch.uint8")] * 2  # 6 frames: 4, then 2 padded to 4


def test_unknown_compile_backend_is_a_config_error_before_any_work():
    from pipeline.config import ConfigError, load_config

    for name in ("aesthetic", "alignment"):
        with pytest.raises(ConfigError, match=f"{name}.compile"):
            load_config(sets=[f"{name}.compile=nope"])
        assert getattr(load_config(sets=[f"{name}.compile=inductor"]), name).compile == "inductor"


def test_compiled_or_graphed_text_tower_meets_few_shapes_and_gives_the_eager_embeddings(models):
    """alignment.compile / alignment.cuda_graph: the text tower sees batch_size captions (a short batch
    padded, a long one in parts) over a multiple of 16 positions, so it compiles or records a few
    shapes, not one per batch and caption length; the embeddings are the eager ones. On the CPU the
    graph option does nothing; a spy with GraphedCall's contract stands in for it."""
    import torch
    from torch._dynamo import register_backend

    from pipeline.stages.alignment import _text_embedding

    shapes = []

    @register_backend(name="inbetweener_test_text_shapes")
    def counting(graph, example_inputs):
        shapes.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph.forward

    def stage(**settings) -> AlignmentStage:
        s = AlignmentStage(
            clip_model=TINY, clip_pretrained=TAG, models_dir=str(models), device="cpu", **settings
        )
        s.setup()
        return s

    captions = ["a cat", "a cartoon dog runs across a sunny meadow at noon with a red ball", "word " * 40]
    eager = stage()
    want = eager.text_embeddings(captions)
    torch._dynamo.reset()
    compiled = stage(compile="inbetweener_test_text_shapes", batch_size=2)
    graphed = stage(cuda_graph=True, batch_size=2)
    assert graphed._graphed is None  # no CUDA device: the option does nothing
    replayed = []

    def replay(tokens):
        replayed.append(tuple(tokens.shape))
        return _text_embedding(graphed._clip, tokens)

    graphed._graphed = replay
    for s in (compiled, graphed):
        for batch in ([0], [0, 1], [0, 1, 2]):
            got = s.text_embeddings([captions[i] for i in batch])
            np.testing.assert_allclose(got, want[batch], atol=2e-6)
    # 1 caption of 3 tokens -> 2 x 16; 2 captions (16 tokens) -> 2 x 16; 3 (the third 42) -> 2 x 48, twice
    assert replayed == [(2, 16), (2, 16), (2, 48), (2, 48)]
    compiled_shapes = sorted(
        {s for graph in shapes for s in graph if len(s) == 3}
    )  # [batch, positions, width]
    assert compiled_shapes == [(2, 16, 32), (2, 48, 32)]
