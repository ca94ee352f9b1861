"""caption: BLIP-2 (transformers) captions of a clip's keyframes, batched.

The model is a Hugging Face snapshot folder in the models directory (default
MODELS_DIR/hf/Salesforce/blip2-opt-2.7b: config.json, safetensors shards, tokenizer, processor),
loaded with `Blip2Processor` + `Blip2ForConditionalGeneration.from_pretrained(folder,
local_files_only=True)`; the folder is checked first (config, every shard whole, tokenizer,
processor), so a broken download is a WeightsError naming the file, not a crash in a worker.

Defaults and why: the middle keyframe only (the paper captions one frame; `frames` takes
first,mid,last and joins distinct captions with "; "); no prompt (plain captioning, what BLIP-2 was
tuned for; with a prompt only the generated continuation is kept); greedy decoding with at most 30
new tokens (captions are one sentence); bf16 on a GPU (fp16 where bf16 is missing; OPT overflows
less in bf16) and fp32 on CPU; 32 clips per call and half a GPU per worker (2.7B parameters in bf16
are ~7.5 GB, so two workers share a card and keep it busy while the other decodes).
The caption is a score-like column: `alignment` scores it, nothing rejects on it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.models import (
    WeightFile,
    WeightsError,
    add_lineage,
    blip2_folder,
    check_hf_snapshot,
    file_sha256,
    pick_device,
    pick_dtype,
    resolve_models_dir,
)
from pipeline.stages.base import Stage
from pipeline.stages.text import FRAME_INDEX


def load_blip2(folder: Path, device, dtype):
    """(processor, model) from a checked snapshot folder; nothing is fetched from the hub."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    problems = check_hf_snapshot(folder)
    if problems:
        raise WeightsError("; ".join(problems))
    processor = Blip2Processor.from_pretrained(folder, local_files_only=True)
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return processor, model.eval().to(device)


@dataclass
class CaptionStage(Stage):
    model: str = "Salesforce/blip2-opt-2.7b"  # hub id (folder MODELS_DIR/hf/<id>) or an absolute folder
    frames: str = "mid"  # keyframes to caption (comma-separated: first, mid, last)
    prompt: str = ""  # text the caption continues; "" = plain captioning
    max_new_tokens: int = 30
    num_beams: int = 1  # 1 = greedy
    models_dir: str | None = None  # None: $INBETWEENER_MODELS, else ~/.cache/inbetweener/models
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # auto = bf16 (fp16) on GPU, fp32 on CPU
    batch_size: int = 32  # clips per call (x frames through generate at once)
    num_gpus: float = 0.5  # two workers per card; set 0 on machines without GPU

    name = "caption"
    reads = ("keyframes",)
    num_cpus = 1.0

    def folder(self) -> Path:
        if Path(self.model).is_absolute():
            return Path(self.model)
        return resolve_models_dir(self.models_dir) / blip2_folder(self.model).path

    def weight_files(self) -> list[WeightFile]:
        return [blip2_folder(self.model)]

    def frame_indices(self) -> list[int]:
        names = [n.strip() for n in self.frames.split(",") if n.strip()]
        if not names or any(n not in FRAME_INDEX for n in names):
            raise ValueError(f"caption.frames: expected some of first,mid,last, got {self.frames!r}")
        return [FRAME_INDEX[n] for n in names]

    def setup(self) -> None:
        self._frames = self.frame_indices()
        self._device = pick_device(self.device)
        self._dtype = pick_dtype(self.precision, self._device, gpu_default="bf16")
        folder = self.folder()
        self._processor, self._model = load_blip2(folder, self._device, self._dtype)
        self._sha256 = file_sha256(folder, resolve_models_dir(self.models_dir))

    def captions(self, images: list) -> list[str]:
        """RGB uint8 frames -> one caption each (greedy / beam search, new tokens only)."""
        import torch

        inputs = self._processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
        inputs = {k: v.to(self._device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
        with torch.inference_mode():
            out = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
            )
        new = out[:, inputs["input_ids"].shape[1] :]  # decoder-only: the prompt comes back first
        return [text.strip() for text in self._processor.batch_decode(new, skip_special_tokens=True)]

    def process_rows(self, rows: list[dict]):
        todo = [
            i for i, r in enumerate(rows) if r.get("row_kind") == "clip" and r.get("keyframes") is not None
        ]
        images = [rows[i]["keyframes"][k] for i in todo for k in self._frames]
        texts = self.captions(images) if images else []
        per_clip = len(self._frames)
        done = {i: j for j, i in enumerate(todo)}
        for i, row in enumerate(rows):
            if i not in done:
                yield row
                continue
            mine = texts[done[i] * per_clip : (done[i] + 1) * per_clip]
            caption = "; ".join(dict.fromkeys(t for t in mine if t))  # distinct, in frame order
            yield {**row, "caption": caption, **add_lineage(row, self.name, self.model, self._sha256)}
