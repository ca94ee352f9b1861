"""alignment: CLIP similarity between a clip's caption and its first, middle and last keyframes.

The image side is not recomputed: the aesthetic stage leaves the normalised CLIP image embeddings
of the three keyframes in the heavy column `clip_image_emb` ([3, D] float32), so this stage runs
only CLIP's text tower (one image forward per frame in the whole job, not two). Where that column
is absent (the aesthetic stage was skipped) the embeddings are computed here from the keyframes,
with the same code. A row without a caption gets no score (the caption stage did not run).

Scores are plain cosine similarities in [-1, 1] (not CLIPScore's 2.5 x or logit scale);
`clip_sim_min` is the minimum over the three frames.

Defaults and why: the same CLIP as the aesthetic stage (`ViT-L-14`, `openai`; configure both
alike, the embeddings must come from one model), fp16 on a GPU and fp32 on CPU, 128 captions per
call (text-only forwards are cheap). The reject threshold ALIGNMENT_MIN = 0.18: with ViT-L/14 a
caption written for a frame typically scores 0.25-0.35 against it and an unrelated one about
0.1-0.15; a clip whose first or last frame no longer matches its caption (a cut the shot detector
missed, a fade) falls below it. It sits nearer the unrelated end because BLIP-2's captions of
cartoon frames are short and generic ("a cartoon of a man walking"), which scores lower than a
written caption of the same frame; raise it with `select`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.models import (
    WeightFile,
    add_lineage,
    clip_file,
    file_sha256,
    pick_device,
    pick_dtype,
    resolve_models_dir,
)
from pipeline.stages.aesthetic import (
    _padded,
    check_compile_backend,
    clip_weight_file,
    encode_frames,
    load_clip,
    text_features,
    text_positions,
)
from pipeline.stages.base import Stage
from pipeline.stages.clip_tokens import clip_tokenizer

TEXT_POSITIONS = 16  # a compiled or graphed text tower runs over a multiple of this many positions
ALIGNMENT_MIN = 0.18  # default alignment.min: reject clips whose worst frame/caption cosine is below this


@dataclass
class AlignmentStage(Stage):
    clip_model: str = "ViT-L-14"  # must match the aesthetic stage's (its embeddings are reused)
    clip_pretrained: str = "openai"
    models_dir: str | None = None  # None: $INBETWEENER_MODELS, else ~/.cache/inbetweener/models
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # auto = fp16 on GPU, fp32 on CPU
    batch_size: int = 128  # clips (captions) per call
    num_gpus: float = 0.25  # the text tower is small; set 0 on machines without GPU
    compile: str = ""  # a torch.compile backend for the text tower ("inductor" on GPU); "": eager
    cuda_graph: bool = False  # GPU only: replay each text-tower forward as a CUDA graph

    name = "alignment"
    _graphed = None  # set by tune_text_tower(): the CUDA-graph replay of each text forward
    reads = ("clip_image_emb", "keyframes")  # keyframes only where the aesthetic stage did not run
    num_cpus = 1.0

    def weight_files(self) -> list[WeightFile]:
        return [clip_weight_file(self.clip_model, self.clip_pretrained, resolve_models_dir(self.models_dir))]

    def setup(self) -> None:
        root = resolve_models_dir(self.models_dir)
        self._device = pick_device(self.device)
        self._dtype = pick_dtype(self.precision, self._device)
        self._clip = load_clip(self.clip_model, self.clip_pretrained, root, self._device, self._dtype)
        self._tokenizer = clip_tokenizer(self.clip_model)  # open_clip's ids, its BPE in Rust
        self._model = f"open_clip {self.clip_model}/{self.clip_pretrained}"
        self._sha256 = file_sha256(root / clip_file(self.clip_model, self.clip_pretrained).path, root)
        self.tune_text_tower()

    def tune_text_tower(self) -> None:
        """`compile`: the text transformer torch.compile'd in place with static shapes; `cuda_graph` on a
        CUDA device: each text forward recorded once per shape and replayed (one launch instead of
        ~200: the tower's GPU work for a batch of captions is well under a millisecond, its launches are
        not). Either way a forward sees `batch_size` captions (a short batch padded) over a multiple of
        TEXT_POSITIONS positions: a few shapes in all (5 for CLIP's 77)."""
        from inference.cuda_graph import GraphedCall

        tower = self._clip.transformer
        if self.compile and getattr(tower, "_compiled_call_impl", None) is None:  # once per tower
            check_compile_backend(self.compile, "alignment.compile")
            tower.compile(backend=self.compile, dynamic=False)
        self._graphed = None
        if self.cuda_graph and GraphedCall.applies(self._device):
            self._graphed = GraphedCall(functools.partial(_text_embedding, self._clip))

    def text_embeddings(self, captions: list[str], trim: bool = True) -> np.ndarray:
        """Captions -> L2-normalised CLIP text embeddings, float32 [n, D]. `trim=False` runs the text
        tower over every position (open_clip's own path: the benchmark's baseline)."""
        import torch

        with torch.inference_mode():
            tokens = self._tokenizer(captions)  # [n, context_length], on the host
            fixed = bool(self.compile) or self._graphed is not None
            n = text_positions(self._clip, tokens, TEXT_POSITIONS if fixed else 1) if trim else None
            if n is None:  # every position (the baseline), or a tower of another kind
                emb = self._clip.encode_text(tokens.to(self._device))
                return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
            tokens = tokens[:, :n].to(self._device)
            if not fixed:
                return _text_embedding(self._clip, tokens).cpu().numpy()
            embed = self._graphed or functools.partial(_text_embedding, self._clip)
            size = self.batch_size
            parts = []
            for i in range(0, len(tokens), size):
                part = tokens[i : i + size]
                parts.append(embed(_padded(part, size))[: len(part)])
            return torch.cat(parts).cpu().numpy()

    def process_rows(self, rows: list[dict]):
        todo = [
            i
            for i, r in enumerate(rows)
            if r.get("row_kind") == "clip"
            and r.get("caption")
            and (r.get("clip_image_emb") is not None or r.get("keyframes") is not None)
        ]
        images = {i: rows[i].get("clip_image_emb") for i in todo}
        recompute = [i for i in todo if images[i] is None]
        if recompute:  # the aesthetic stage did not run: one image forward per frame here instead
            frames = [f for i in recompute for f in rows[i]["keyframes"][:3]]
            emb = encode_frames(self._clip, frames, self._device, self._dtype)
            images.update({i: emb[3 * j : 3 * j + 3] for j, i in enumerate(recompute)})
        text = self.text_embeddings([rows[i]["caption"] for i in todo]) if todo else None
        done = {i: j for j, i in enumerate(todo)}
        for i, row in enumerate(rows):
            if i not in done:
                yield row
                continue
            image = np.asarray(images[i], np.float32)  # [3, D]
            caption = text[done[i]]  # [D]
            if image.shape[-1] != caption.shape[-1]:
                raise ValueError(
                    f"clip_image_emb has {image.shape[-1]} dims, {self.clip_model} text embeddings "
                    f"{caption.shape[-1]}: configure the aesthetic and alignment stages with one CLIP"
                )
            first, mid, last = (float(s) for s in image @ caption)
            yield {
                **row,
                "clip_sim_first": first,
                "clip_sim_mid": mid,
                "clip_sim_last": last,
                "clip_sim_min": min(first, mid, last),
                **add_lineage(row, self.name, self._model, self._sha256),
            }


def _text_embedding(net, tokens):
    """Tokens cut to the positions that matter -> L2-normalised text embeddings, float32 [n, D]."""
    import torch

    return torch.nn.functional.normalize(text_features(net, tokens).float(), dim=-1)
