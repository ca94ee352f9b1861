"""Feature extractors: weights saved in their real on-disk formats, loaded through the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from manifests.weights import WeightsError
from training.features import (
    CLIP_FILE,
    I3D_FILE,
    LPIPS_FILES,
    MODELS_DIR_ENV,
    MissingWeightsError,
    OpenClipEncoder,
    WeightFile,
    load_i3d,
    load_open_clip,
    models_dir,
)
from training.metrics.lpips import LPIPS, load_lpips, lpips_frames


def test_models_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    assert models_dir() == Path("~/.cache/inbetweener/models").expanduser()
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "env"))
    assert models_dir() == tmp_path / "env"
    assert models_dir(tmp_path / "explicit") == tmp_path / "explicit"


@pytest.mark.parametrize(
    ("load", "relpath"),
    [
        (load_i3d, "i3d/i3d_torchscript.pt"),
        (load_open_clip, "clip/ViT-H-14-laion2b_s32b_b79k/open_clip_pytorch_model.bin"),
        (load_lpips, "lpips/alex.pth"),
    ],
)
def test_missing_weights_name_the_file_and_the_folder(load, relpath, tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        load()
    message = str(err.value)
    assert relpath in message and str(tmp_path) in message and MODELS_DIR_ENV in message
    assert "http" in message  # where it comes from
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize(
    ("load", "weight"), [(load_i3d, I3D_FILE), (load_lpips, LPIPS_FILES["alex"][1])], ids=["i3d", "lpips"]
)
def test_truncated_weights_name_the_file(load, weight, tmp_path, monkeypatch):
    """Half of a weight file (an interrupted download): a WeightsError naming the file and its size."""
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path))
    for present in (I3D_FILE, *LPIPS_FILES["alex"]):
        (tmp_path / present.relpath).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.zeros(4096)}, tmp_path / present.relpath)
    path = tmp_path / weight.relpath
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated or wrong file") as err:
        load()
    assert f"{path} ({path.stat().st_size:,} bytes)" in str(err.value)


def test_lpips_rejects_another_backbone_by_its_keys(tmp_path):
    """The VGG backbone's file where AlexNet's belongs: the mismatch listed, before any weight is copied."""
    lin_file, backbone_file = (tmp_path / w.relpath for w in LPIPS_FILES["alex"])
    lin_file.parent.mkdir(parents=True)
    torch.save({}, lin_file)
    torch.save({f"features.{k}": v for k, v in LPIPS("vgg").features.state_dict().items()}, backbone_file)
    with pytest.raises(WeightsError, match="alexnet-owt-7be5be79.pth: not the expected weights: .*missing"):
        load_lpips(tmp_path)


def test_lpips_names_both_of_its_missing_files_at_once(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        load_lpips(tmp_path, net="vgg")
    assert "lpips/vgg.pth" in str(err.value) and "lpips/vgg16-397923af.pth" in str(err.value)


def test_lpips_needs_its_backbone_file_too(tmp_path):
    lin_file = tmp_path / LPIPS_FILES["alex"][0].relpath
    lin_file.parent.mkdir(parents=True)
    torch.save({}, lin_file)
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        load_lpips(tmp_path)


class _TinyI3D(torch.nn.Module):
    """The TorchScript I3D's call signature; rescale/resize change the output so the test sees them."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 400)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ):
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 8, 8), mode="trilinear", align_corners=False)
        logits = self.proj(x.mean(dim=(2, 3, 4))) + x.shape[-1]  # the size shows whether it resized
        return logits if return_features else logits.softmax(-1)


@pytest.mark.filterwarnings("ignore:`torch.jit")  # TorchScript is the I3D file's format
def test_i3d_loads_torchscript_and_is_called_as_the_protocol_says(tmp_path):
    torch.manual_seed(0)
    tiny = _TinyI3D()
    path = tmp_path / I3D_FILE.relpath
    path.parent.mkdir(parents=True)
    torch.jit.save(torch.jit.script(tiny), str(path))
    extractor = load_i3d(tmp_path, batch_size=2)
    videos = torch.rand(5, 3, 4, 16, 16) * 255  # N 3 T H W, uint8 range
    feats = extractor(videos)
    assert feats.shape == (5, 400) and feats.dtype == torch.float64
    expected = tiny(videos, rescale=True, resize=True, return_features=True).double()
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="N, 3, T, H, W"):
        extractor(videos.permute(0, 2, 1, 3, 4))


def _torchvision_alexnet_features(seed: int = 0) -> torch.nn.Sequential:
    """torchvision's own AlexNet feature stack, randomly initialised (its 54M-parameter classifier skipped)."""
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.alexnet(weights=None)
    features = net.features.to_empty(device="cpu")
    torch.manual_seed(seed)
    for layer in features:
        if isinstance(layer, torch.nn.Conv2d):
            layer.reset_parameters()
    return features


def _random_lpips_files(root: Path) -> tuple[torch.nn.Sequential, dict]:
    """An AlexNet file in torchvision's key layout and LPIPS linear layers in the alex.pth layout."""
    features = _torchvision_alexnet_features()
    backbone = {f"features.{k}": v for k, v in features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(4, 9216)  # the real file has the classifier: it is skipped
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    lin_file, backbone_file = LPIPS_FILES["alex"]
    (root / "lpips").mkdir(parents=True)
    torch.save(backbone, root / backbone_file.relpath)
    torch.save(lins, root / lin_file.relpath)
    return features, lins


def _lpips_reference(
    features: torch.nn.Sequential, lins: dict, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """LPIPS v0.1 as the authors' code runs it: torchvision AlexNet features sliced after each ReLU stage."""
    slices = [features[0:2], features[2:5], features[5:8], features[8:10], features[10:12]]
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fx, fy = (x - shift) / scale, (y - shift) / scale
    total = torch.zeros(x.shape[0])
    for k, block in enumerate(slices):
        fx, fy = block(fx), block(fy)
        nx = fx / (torch.sqrt(torch.sum(fx**2, dim=1, keepdim=True)) + 1e-10)
        ny = fy / (torch.sqrt(torch.sum(fy**2, dim=1, keepdim=True)) + 1e-10)
        weighted = F.conv2d((nx - ny) ** 2, lins[f"lin{k}.model.1.weight"])
        total += weighted.mean(dim=(2, 3))[:, 0]
    return total


@torch.no_grad()
def test_lpips_loads_standard_files_and_matches_the_reference_computation(tmp_path):
    features, lins = _random_lpips_files(tmp_path)
    model = load_lpips(tmp_path)
    x, y = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    got = model(x, y)
    torch.testing.assert_close(got, _lpips_reference(features, lins, x, y), rtol=1e-5, atol=1e-6)
    assert (got > 0).all()
    torch.testing.assert_close(model(y, x), got)
    assert model(x, x).abs().max() < 1e-6

    videos = torch.rand(2, 4, 3, 64, 64) * 2 - 1  # b t c h w
    other = videos.flip(1)
    per_frame = lpips_frames(model, videos, other, batch_size=3)
    assert per_frame.shape == (2, 4)
    torch.testing.assert_close(per_frame[1, 2], model(videos[1, 2][None], other[1, 2][None])[0])


def test_lpips_vgg_backbone_has_torchvision_keys():
    from torchvision.models.vgg import cfgs, make_layers

    expected = {k: v.shape for k, v in make_layers(cfgs["D"]).state_dict().items()}
    ours = {k: v.shape for k, v in LPIPS("vgg").features.state_dict().items()}
    assert ours == expected


class _FakeClip(torch.nn.Module):
    """OpenCLIP's encode_image/encode_text API; the image embedding is the mean normalised colour."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.image_size = (32, 32)
        self.text = torch.nn.Embedding(100, 3)
        self.seen: list[tuple[int, ...]] = []

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return x.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens).sum(1)


def test_clip_encoder_preprocesses_whole_frames_and_batches():
    model = _FakeClip()
    tokenizer = lambda texts: torch.tensor([[len(t) % 100, 1] for t in texts])
    encoder = OpenClipEncoder(model, tokenizer, batch_size=2)
    assert encoder.image_size == 32
    images = torch.rand(5, 3, 40, 64)  # not square: resized whole, not cropped
    emb = encoder(images)
    assert emb.shape == (5, 3) and emb.dtype == torch.float64 and model.seen[0] == (2, 3, 32, 32)
    grey = torch.full((1, 3, 40, 64), 0.5)
    mean, std = np.array((0.48145466, 0.4578275, 0.40821073)), np.array((0.26862954, 0.26130258, 0.27577711))
    np.testing.assert_allclose(encoder(grey)[0].numpy(), (0.5 - mean) / std, rtol=1e-5)
    texts = encoder.embed_texts(["a cat", "a dog running", "x"])
    assert texts.shape == (3, 3)


def test_open_clip_loader_reads_a_local_checkpoint(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    config_file = tmp_path / "inbetweener-test-tiny-clip.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    reference = open_clip.create_model("inbetweener-test-tiny-clip", device="cpu")
    weight = WeightFile("clip/tiny/open_clip_pytorch_model.bin", "a test", "a tiny CLIP")
    (tmp_path / "clip" / "tiny").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / weight.relpath)

    encoder = load_open_clip(tmp_path, model_name="inbetweener-test-tiny-clip", weight=weight)
    images = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        expected = reference.eval().encode_image(encoder.preprocess(images)).double()
        expected_text = reference.encode_text(
            open_clip.get_tokenizer("inbetweener-test-tiny-clip")(["a cat"])
        )
    torch.testing.assert_close(encoder(images), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder.embed_texts(["a cat"]), expected_text.double(), rtol=1e-5, atol=1e-6)
    assert CLIP_FILE.relpath.endswith("open_clip_pytorch_model.bin")
    path = tmp_path / weight.relpath  # an interrupted download: the file named, not torch's internals
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated or wrong file") as err:
        load_open_clip(tmp_path, model_name="inbetweener-test-tiny-clip", weight=weight)
    assert str(path) in str(err.value)
