"""caption: a tiny BLIP-2 (tiny ViT, Q-Former and OPT) with a tiny word-level tokenizer, saved with
`save_pretrained` into a temporary models dir and loaded through the stage's real loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.models import WeightsError, check_weights
from pipeline.stages.caption import CaptionStage

REPO = "test/tiny-blip2"
WORDS = ["<pad>", "</s>", "<unk>", "<image>", "a", "cartoon", "of", "cat", "dog", "in", "the", "park"]
QUERIES = 4


def save_tiny_blip2(folder) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Blip2Config(
        vision_config={**small, "image_size": 32, "patch_size": 8},
        qformer_config={**small, "encoder_hidden_size": 32, "vocab_size": len(WORDS)},
        text_config={
            "model_type": "opt",
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": len(WORDS),
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
            **{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1},
        },
        num_query_tokens=QUERIES,
        image_token_index=WORDS.index("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    # Make greedy decoding predictable: the last hidden state is all ones and only "cartoon"'s
    # (tied) output row answers it, so every new token is "cartoon", whatever the image.
    with torch.no_grad():
        decoder = model.language_model.model.decoder
        decoder.final_layer_norm.weight.zero_()
        decoder.final_layer_norm.bias.fill_(1.0)
        model.language_model.get_output_embeddings().weight[WORDS.index("cartoon")] = 5.0
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, QUERIES)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny_blip2(root / "hf" / REPO)
    return root


def clip_row(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (320, 512, 3), dtype=np.uint8) for _ in range(3)]
    return {"row_kind": "clip", "clip_id": f"c{seed}", "keyframes": frames}


def test_tiny_blip2_captions_each_clip_through_the_real_loader(models):
    import torch

    stage = CaptionStage(model=REPO, models_dir=str(models), device="cpu", max_new_tokens=3)
    assert check_weights([stage]) == []
    stage.setup()
    assert next(stage._model.parameters()).dtype == torch.float32  # fp32 on CPU
    rows = [clip_row(0), clip_row(1), {"row_kind": "clip", "clip_id": "short", "status": "rejected"}]
    out = list(stage.process_rows(rows))
    assert [r.get("caption") for r in out] == ["cartoon cartoon cartoon", "cartoon cartoon cartoon", None]
    assert json.loads(out[0]["models"])["caption"] == {"model": REPO, "sha256": stage._sha256}

    # a prompt is not part of the caption; several frames give distinct captions joined once
    prompted = CaptionStage(
        model=REPO,
        models_dir=str(models),
        device="cpu",
        max_new_tokens=2,
        prompt="a cat",
        frames="first,last",
    )
    prompted.setup()
    assert next(prompted.process_rows([clip_row(2)]))["caption"] == "cartoon cartoon"


def test_missing_or_broken_blip2_snapshot_is_named(models, tmp_path):
    stage = CaptionStage(model=REPO, models_dir=str(tmp_path), device="cpu")
    (problem,) = check_weights([stage])
    assert f"hf/{REPO}" in problem and "download caption" in problem
    with pytest.raises(WeightsError, match="missing"):
        stage.setup()

    import shutil

    folder = tmp_path / "hf" / REPO
    shutil.copytree(models / "hf" / REPO, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (problem,) = check_weights([stage])
    assert "model.safetensors" in problem and "truncated" in problem
    with pytest.raises(WeightsError, match="truncated"):
        stage.setup()
    (folder / "tokenizer_config.json").unlink()
    assert any("tokenizer_config.json" in p for p in check_weights([stage]))


def test_a_snapshot_whose_files_disagree_is_named_before_any_work(models, tmp_path):
    """A config.json of another size than its weights and a cut tokenizer.json passed `models check` and
    curate's pre-check, then crashed each caption actor with 300 lines of Ray traceback; a sharded snapshot
    without its index was 'model.safetensors: missing (named by the index)', with a wrong second line."""
    import shutil

    folder = tmp_path / "hf" / REPO
    shutil.copytree(models / "hf" / REPO, folder)
    stage = CaptionStage(model=REPO, models_dir=str(tmp_path), device="cpu")
    config = json.loads((folder / "config.json").read_text())
    config["qformer_config"]["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    (problem,) = check_weights([stage])
    assert "config.json: describes another model than its weights" in problem
    shutil.copy(models / "hf" / REPO / "config.json", folder / "config.json")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    (problem,) = check_weights([stage])
    assert "tokenizer.json: not readable JSON" in problem
    shutil.copy(models / "hf" / REPO / "tokenizer.json", folder / "tokenizer.json")
    assert check_weights([stage]) == []
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (problem,) = check_weights([stage])
    assert "model.safetensors.index.json: missing: the folder holds 1 safetensors shards" in problem


def test_a_snapshot_missing_a_weight_is_named_not_initialised_at_random(models, tmp_path):
    """A safetensors file without one of the model's parameters passed `models check` and curate's
    pre-check; transformers then initialised it at random and the job captioned on, silently."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hf" / REPO
    shutil.copytree(models / "hf" / REPO, folder)
    stage = CaptionStage(model=REPO, models_dir=str(tmp_path), device="cpu")
    assert check_weights([stage]) == []  # lm_head is tied to the embeddings: not in the file, not missing
    state = load_file(folder / "model.safetensors")
    del state["qformer.layernorm.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (problem,) = check_weights([stage])
    assert "1 weights missing from the safetensors files (e.g. qformer.layernorm.weight)" in problem
    with pytest.raises(WeightsError, match="qformer.layernorm.weight"):
        stage.setup()


def test_a_model_that_does_not_load_in_a_worker_is_one_line(tmp_path):
    """The stage's setup in a Ray actor: its exception arrives on the driver wrapped by Ray, the cause's
    type and message inside; the job says that one line."""
    from pipeline.runner import StageLoadError, _ActorUDF, stage_load_error

    class Broken(CaptionStage):
        def setup(self):
            raise RuntimeError("You set ignore_mismatched_sizes to False\nlook at the above report!")

    with pytest.raises(StageLoadError) as err:
        _ActorUDF(Broken(model=REPO, models_dir=str(tmp_path)), ())
    assert (
        str(err.value)
        == "caption: its model did not load (RuntimeError: You set ignore_mismatched_sizes to False)"
    )
    wrapped = RuntimeError(
        f"ray.exceptions.ActorDiedError: ... raise StageLoadError(\nStageLoadError: {err.value}\n"
    )
    assert stage_load_error(wrapped) == str(err.value)
    assert stage_load_error(ValueError("another failure")) is None
