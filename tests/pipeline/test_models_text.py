"""text stage: real PP-OCR weights on drawn frames, the coverage geometry on known score maps, and
CRAFT's loading through the real loader (a randomly initialised CRAFT in the released layout)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import samples
from pipeline.models import WeightsError, check_file, check_weights, craft_file
from pipeline.stages.text import TEXT_MAX, TextStage, box_coverage, component_boxes

SIZE = (512, 320)  # the config's default keyframe size (width, height)


def clip_row(frames, **more) -> dict:
    return {"row_kind": "clip", "clip_id": "c", "keyframes": list(frames), **more}


@pytest.fixture(scope="module")
def ppocr(tmp_path_factory):
    stage = TextStage(backend="ppocr", models_dir=str(tmp_path_factory.mktemp("models")))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def craft_models(tmp_path_factory):
    """A models dir holding a random CRAFT saved like the release: a state dict with 'module.' keys."""
    import torch
    from easyocr.craft import CRAFT

    root = tmp_path_factory.mktemp("craft_models")
    torch.manual_seed(0)
    net = CRAFT(pretrained=False, freeze=False)
    path = root / craft_file().path
    path.parent.mkdir(parents=True)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    return root


def test_ppocr_scores_a_title_card_high_and_a_flat_cartoon_frame_low(ppocr):
    title = next(samples.shot_frames(samples.TITLE, 0, SIZE, 24))
    walk = samples.shot_frames(samples.EPISODES["episode_01.mp4"][1], 0, SIZE, 24)
    flat = [next(walk) for _ in range(3)]
    rows = [clip_row([title] * 3), clip_row(flat), {"row_kind": "source_end", "clips_emitted": 2}]
    out = list(ppocr.process_rows(rows))
    assert out[0]["text_area"] > 0.15 > TEXT_MAX  # the title lines fill most of the frame's middle
    assert out[1]["text_area"] < 0.005 < TEXT_MAX
    assert out[0]["text_backend"] == out[1]["text_backend"] == "ppocr"
    assert json.loads(out[0]["models"])["text"]["model"].startswith("ppocr:")
    assert out[2] == rows[2]  # not a clip: unchanged


def _subtitled(frame: np.ndarray, line: str, scale: float) -> np.ndarray:
    """A subtitle as fansubs and broadcasts burn it in: white, a dark outline, centred near the bottom."""
    import cv2

    out = frame.copy()
    (w, _), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = (frame.shape[1] - w) // 2, frame.shape[0] - 20
    cv2.putText(out, line, (x + 1, y + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.putText(out, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def test_the_default_text_max_rejects_a_clip_with_one_subtitle_line(ppocr):
    """The measured reason behind TEXT_MAX: one ordinary subtitle line covers 3-4% of a 512x320 frame.
    The job's default threshold must reject it (it was 0.05, which let such a clip into training)."""
    from pipeline.config import CurateConfig
    from pipeline.select import decide_row, rules

    walk = samples.shot_frames(samples.EPISODES["episode_01.mp4"][1], 0, SIZE, 24)
    frames = [next(walk) for _ in range(3)]
    line = "I told you never to open that door!"
    subtitled = [frames[0], _subtitled(frames[1], line, 0.45), frames[2]]  # on the middle keyframe only
    scored = list(ppocr.process_rows([clip_row(subtitled), clip_row(frames)]))
    assert 0.02 < scored[0]["text_area"] < 0.05  # the band the old default let through
    active = rules(CurateConfig())
    assert decide_row({**scored[0], "status": "kept"}, active)[0] == "rejected"
    assert decide_row({**scored[1], "status": "kept"}, active) == ("kept", None)


def test_ppocr_does_not_upscale_small_frames(ppocr):
    import cv2

    title = next(samples.shot_frames(samples.TITLE, 0, SIZE, 24))
    maps = ppocr._detector.score_maps([cv2.resize(title, (256, 160), interpolation=cv2.INTER_AREA)])
    assert maps.shape == (1, 160, 256)  # `max` limit mode: a small frame runs at its own size
    assert ppocr.frame_areas([cv2.resize(title, (256, 160))])[0] > 0.1


def test_coverage_of_a_known_score_map_is_the_exact_box_area(ppocr, monkeypatch):
    h, w = 320, 512
    score = np.zeros((1, h, w), np.float32)
    score[0, 100:140, 100:300] = 0.9  # one text kernel, 200 x 40 px
    monkeypatch.setattr(ppocr._detector, "score_maps", lambda frames: np.repeat(score, len(frames), 0))
    row = next(ppocr.process_rows([clip_row([np.zeros((h, w, 3), np.uint8)] * 3)]))
    pad = 200 * 40 * 1.6 / (2 * (200 + 40))  # DB's unclip distance: area * ratio / perimeter
    y0, y1 = np.floor(100 - pad), np.ceil(140 + pad)  # boxes are rounded outward to whole pixels
    x0, x1 = np.floor(100 - pad), np.ceil(300 + pad)
    expected = (y1 - y0) * (x1 - x0) / (h * w)
    assert row["text_area"] == pytest.approx(expected, abs=1e-12)
    score[0, 100:140, 100:300] = 0.4  # above the pixel threshold but a weak component: no text
    assert next(ppocr.process_rows([clip_row([np.zeros((h, w, 3), np.uint8)] * 3)]))["text_area"] == 0.0


def test_box_union_is_counted_once_and_clipped_to_the_frame():
    assert box_coverage([(0, 0, 10, 10), (5, 5, 15, 15)], 100, 100) == pytest.approx(175 / 10000)
    assert box_coverage([(-5, -5, 10, 10)], 100, 100) == pytest.approx(100 / 10000)
    mask = np.zeros((50, 80), bool)
    mask[10:20, 30:60] = True
    score = mask.astype(np.float32)
    assert component_boxes(mask, score, 0.5, "max", "none") == [(30, 10, 60, 20)]
    (box,) = component_boxes(mask, score, 0.5, "max", "craft")  # easyocr's dilation: sqrt(area*min/(w*h))
    assert box[0] == pytest.approx(30 - np.sqrt(10))


def test_auto_backend_is_craft_only_when_its_weights_exist(tmp_path, craft_models):
    assert TextStage(models_dir=str(tmp_path)).resolved_backend() == "ppocr"
    assert TextStage(models_dir=str(craft_models)).resolved_backend() == "craft"
    assert check_weights([TextStage(models_dir=str(tmp_path))]) == []  # auto: missing CRAFT is fine
    (problem,) = check_weights([TextStage(backend="craft", models_dir=str(tmp_path))])
    assert "craft_mlt_25k.pth" in problem and "inbetweener models" in problem and "download text" in problem


def test_craft_loads_through_the_real_loader_and_scores(craft_models):
    assert check_weights([TextStage(backend="craft", models_dir=str(craft_models))]) == []
    stage = TextStage(backend="craft", models_dir=str(craft_models), device="cpu", frames="mid")
    stage.setup()
    frame = np.full((64, 96, 3), 200, np.uint8)
    maps = stage._detector.score_maps([frame])
    assert maps.shape == (1, 32, 48, 2)  # region and link at half the input size
    row = next(stage.process_rows([clip_row([frame] * 3)]))
    assert row["text_backend"] == "craft" and 0.0 <= row["text_area"] <= 1.0
    assert json.loads(row["models"])["text"]["model"] == "craft_mlt_25k"
    # not the released file: its md5 (as easyocr states it) is reported by the hash check
    (problem,) = check_file(craft_file(), craft_models, verify_hashes=True)
    assert "md5" in problem and "2f8227d2def4037cdb3b34389dcf9ec1" in problem


def test_truncated_or_wrong_craft_file_is_a_clear_error(craft_models, tmp_path):
    import torch

    bad = tmp_path / "easyocr" / "craft_mlt_25k.pth"
    bad.parent.mkdir()
    bad.write_bytes((craft_models / craft_file().path).read_bytes()[:100_000])
    stage = TextStage(backend="craft", models_dir=str(tmp_path), device="cpu")
    with pytest.raises(WeightsError, match=r"craft_mlt_25k\.pth.*truncated"):
        stage.setup()
    (problem,) = check_weights([stage])
    assert "craft_mlt_25k.pth" in problem
    torch.save({"module.conv.weight": torch.zeros(3)}, bad)  # readable, but not CRAFT
    with pytest.raises(WeightsError, match="missing keys"):
        stage.setup()
