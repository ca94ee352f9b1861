"""text: the fraction of the frame covered by text boxes (credits, title cards, signs, subtitles).

Two detectors, one geometry. A detector network gives a per-pixel text score map; the map is
thresholded, its connected components become axis-aligned boxes (grown by the detector's own rule,
since both networks mark a shrunk text kernel), and `text_area` is the fraction of the frame covered
by the union of the boxes, the maximum over the sampled keyframes.

- craft: easyocr's CRAFT network only (craft_mlt_25k.pth, the paper's choice). Region and link
  maps at half the input size; a component is text when its peak region score reaches 0.7
  (easyocr's text_threshold), pixels count when region > 0.4 or link > 0.4 (low_text,
  link_threshold); a box grows by sqrt(area * min(w, h) / (w * h)), easyocr's dilation.
- ppocr: the PP-OCRv4 detector (DB) whose ONNX weights ship inside the rapidocr-onnxruntime wheel,
  run with onnxruntime in the `max` limit mode (frames are only ever shrunk, never upscaled).
  Pixels count when prob > 0.3, a component when its mean prob >= 0.5, boxes grow by DB's unclip
  distance area * 1.6 / perimeter (rapidocr's defaults).
- auto (default): craft when its weights are in the models directory, else ppocr.

Defaults and why: all three keyframes (first, mid, last), because a title or a subtitle may cover
only part of a clip; canvas 960 px on the long side (the 512x320 keyframes run at their own size);
the reject threshold TEXT_MAX = 0.02 (2% of the frame): with ppocr on 512x320 keyframes one
subtitle line (cv2 font scale 0.4-0.8) covers 3-8% after the box growth, two lines 5-12%, the
sample title card 21-22%, a small sign 0.7% and flat cartoon frames 0%; 0.05 would let single small
subtitle lines through (a 33-character line at scale 0.4-0.5 covers 3.0-3.6%, see the tests). A
short exclamation ("Wait for me", 1-2%) still passes, as does a sign. `text_area` is written for every clip; `select` applies text.max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.models import (
    WeightFile,
    add_lineage,
    craft_file,
    file_sha256,
    load_verified,
    pick_device,
    pick_dtype,
    ppocr_det_model,
    resolve_models_dir,
)
from pipeline.stages.base import Stage

TEXT_MAX = 0.02  # default text.max: reject clips whose text boxes cover more of a frame than this
FRAME_INDEX = {"first": 0, "mid": 1, "last": 2}  # positions in row["keyframes"]

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in map pixels (x1, y1 exclusive)


# --------------------------------------------------------------------------- geometry


def component_boxes(
    mask: np.ndarray, score: np.ndarray, min_score: float, reduce: str, grow: str, unclip_ratio: float = 1.6
) -> list[Box]:
    """Connected components of a boolean mask -> axis-aligned boxes, grown by the detector's rule.

    A component is kept when `reduce` ("max" or "mean") of `score` over it reaches min_score.
    grow: "craft" (easyocr's dilation, sqrt(area * min(w, h) / (w * h)) per side), "db" (DB's unclip
    distance area * ratio / perimeter of the box) or "none".
    """
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    boxes = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < 3:  # specks
            continue
        inside = score[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i]
        value = inside.max() if reduce == "max" else inside.mean()
        if value < min_score:
            continue
        if grow == "craft":
            pad = math.sqrt(area * min(w, h) / (w * h))
        elif grow == "db":
            pad = w * h * unclip_ratio / (2 * (w + h))
        else:
            pad = 0.0
        boxes.append((x - pad, y - pad, x + w + pad, y + h + pad))
    return boxes


def box_coverage(boxes: list[Box], height: int, width: int) -> float:
    """Fraction of a height x width map covered by the union of boxes (clipped, rounded outward)."""
    if not boxes:
        return 0.0
    covered = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        r0, r1 = max(0, math.floor(y0)), min(height, math.ceil(y1))
        c0, c1 = max(0, math.floor(x0)), min(width, math.ceil(x1))
        covered[r0:r1, c0:c1] = True
    return float(covered.mean())


def detector_size(height: int, width: int, canvas: int, multiple: int = 32) -> tuple[int, int]:
    """Input size for a detector: long side at most `canvas` (never upscaled), sides multiples of 32."""
    scale = min(1.0, canvas / max(height, width))
    return (
        max(multiple, round(height * scale / multiple) * multiple),
        max(multiple, round(width * scale / multiple) * multiple),
    )


def _resize_batch(frames: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    out = [f if f.shape[:2] == size else cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames]
    return np.stack(out)  # [n, h, w, 3] uint8


# --------------------------------------------------------------------------- detectors


class PPOCRDetector:
    """PP-OCRv4 DB text detector (ONNX, inside the rapidocr-onnxruntime wheel) on onnxruntime."""

    thresh, box_thresh, unclip_ratio = 0.3, 0.5, 1.6  # rapidocr's config.yaml (Det)

    def __init__(self, path: Path, canvas: int, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.canvas = canvas
        self.path = path

    def score_maps(self, frames: list[np.ndarray]) -> np.ndarray:
        """RGB frames of one size -> text probability maps [n, h, w] at the network's input size."""
        batch = _resize_batch(frames, detector_size(*frames[0].shape[:2], self.canvas))
        x = batch[..., ::-1].astype(np.float32) / 255.0  # PP-OCR is trained on BGR (cv2) images
        x = ((x - 0.5) / 0.5).transpose(0, 3, 1, 2)  # [n, 3, h, w]
        return self.session.run(None, {self.input: np.ascontiguousarray(x)})[0][:, 0]

    def boxes(self, score_map: np.ndarray) -> list[Box]:
        mask = score_map > self.thresh
        return component_boxes(mask, score_map, self.box_thresh, "mean", "db", self.unclip_ratio)


class CraftDetector:
    """easyocr's CRAFT network: region and link score maps at half the input size."""

    text_threshold, low_text, link_threshold = 0.7, 0.4, 0.4  # easyocr's readtext defaults
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as easyocr's imgproc

    def __init__(self, net, canvas: int, device, dtype=None):
        self.net, self.canvas, self.device, self.dtype = net, canvas, device, dtype

    def score_maps(self, frames: list[np.ndarray]) -> np.ndarray:
        """RGB frames of one size -> [n, h/2, w/2, 2] (region, link) score maps."""
        import torch

        batch = _resize_batch(frames, detector_size(*frames[0].shape[:2], self.canvas))
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0  # [n, 3, h, w]
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        half = self.dtype is not None and self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=half):
            y, _ = self.net((x - mean) / std)  # [n, h/2, w/2, 2]
        return y.float().cpu().numpy()

    def boxes(self, score_map: np.ndarray) -> list[Box]:
        region, link = score_map[..., 0], score_map[..., 1]
        mask = (region > self.low_text) | (link > self.link_threshold)
        return component_boxes(mask, region, self.text_threshold, "max", "craft")


def craft_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of easyocr's CRAFT (without the file's 'module.' prefix), built on meta."""
    import torch
    from easyocr.craft import CRAFT

    with torch.device("meta"):
        net = CRAFT(pretrained=False, freeze=False)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def load_craft(models_dir: Path, device="cpu"):
    """CRAFT from MODELS_DIR/easyocr/craft_mlt_25k.pth, keys and shapes checked (WeightsError)."""
    from easyocr.craft import CRAFT

    state = load_verified(craft_file(craft_shapes), models_dir)
    net = CRAFT(pretrained=False, freeze=False)  # weights=None: torchvision downloads nothing
    net.load_state_dict(state)
    return net.eval().to(device)


# --------------------------------------------------------------------------- the stage


@dataclass
class TextStage(Stage):
    backend: str = "auto"  # auto | craft | ppocr; auto = craft when its weights exist, else ppocr
    frames: str = "first,mid,last"  # keyframes to scan (comma-separated: first, mid, last)
    canvas_size: int = 960  # detector input: long side at most this (frames are never upscaled)
    models_dir: str | None = None  # None: $INBETWEENER_MODELS, else ~/.cache/inbetweener/models
    device: str = "auto"  # craft: auto = cuda when available, else cpu (ppocr always runs on CPU)
    precision: str = "auto"  # craft: auto = fp16 autocast on GPU, fp32 on CPU
    threads: int = 1  # ppocr: onnxruntime threads per worker
    batch_size: int = 16  # clips per call (x frames per clip through the detector at once)
    num_gpus: float = 0.25  # craft on a GPU; set 0 for ppocr or on machines without GPU

    name = "text"
    reads = ("keyframes",)
    num_cpus = 1.0

    def resolved_backend(self) -> str:
        if self.backend not in ("auto", "craft", "ppocr"):
            raise ValueError(f"text.backend must be auto, craft or ppocr, got {self.backend!r}")
        if self.backend != "auto":
            return self.backend
        return "craft" if (resolve_models_dir(self.models_dir) / craft_file().path).exists() else "ppocr"

    def weight_files(self) -> list[WeightFile]:
        if self.backend == "ppocr":
            return []  # the detector ships inside the rapidocr-onnxruntime wheel
        return [craft_file(craft_shapes, optional=self.backend == "auto")]

    def frame_indices(self) -> list[int]:
        names = [n.strip() for n in self.frames.split(",") if n.strip()]
        bad = [n for n in names if n not in FRAME_INDEX]
        if bad or not names:
            raise ValueError(f"text.frames: expected some of first,mid,last, got {self.frames!r}")
        return [FRAME_INDEX[n] for n in names]

    def setup(self) -> None:
        self._frames = self.frame_indices()
        self._backend = self.resolved_backend()
        models_dir = resolve_models_dir(self.models_dir)
        if self._backend == "craft":
            import torch

            device = pick_device(self.device)
            dtype = pick_dtype(self.precision, device)
            torch.backends.cudnn.benchmark = True  # one keyframe size all job long: tune the convs once
            self._detector = CraftDetector(load_craft(models_dir, device), self.canvas_size, device, dtype)
            path = models_dir / craft_file().path
            self._model = "craft_mlt_25k"
            self._sha256 = file_sha256(path, models_dir)
        else:
            path = ppocr_det_model()
            if path is None:
                raise RuntimeError(
                    "text: rapidocr-onnxruntime is not installed (its wheel holds the PP-OCR detector)"
                )
            self._detector = PPOCRDetector(path, self.canvas_size, self.threads)
            self._model = f"ppocr:{path.name}"
            self._sha256 = file_sha256(path, models_dir)

    def frame_areas(self, frames: list[np.ndarray]) -> list[float]:
        """Text coverage of each frame; frames of one size go through the network together."""
        areas = [0.0] * len(frames)
        by_shape: dict[tuple, list[int]] = {}
        for i, frame in enumerate(frames):
            by_shape.setdefault(frame.shape, []).append(i)
        for idx in by_shape.values():
            maps = self._detector.score_maps([frames[i] for i in idx])
            for i, score_map in zip(idx, maps):
                h, w = score_map.shape[:2]
                areas[i] = box_coverage(self._detector.boxes(score_map), h, w)
        return areas

    def process_rows(self, rows: list[dict]):
        todo = [
            i for i, r in enumerate(rows) if r.get("row_kind") == "clip" and r.get("keyframes") is not None
        ]
        frames = [rows[i]["keyframes"][k] for i in todo for k in self._frames]
        areas = self.frame_areas(frames) if frames else []
        per_clip = len(self._frames)
        scores = {i: max(areas[j * per_clip : (j + 1) * per_clip]) for j, i in enumerate(todo)}
        for i, row in enumerate(rows):
            if i not in scores:
                yield row
                continue
            yield {
                **row,
                "text_area": scores[i],
                "text_backend": self._backend,
                **add_lineage(row, self.name, self._model, self._sha256),
            }
