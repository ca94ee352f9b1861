"""Pictures in and out of the interpolate and evaluate jobs: keyframes, sketches, frame geometry, writers.

Frames are numpy uint8 `[H, W, 3]` (videos `[T, H, W, 3]`) at the edges of the program and float tensors in
[-1, 1], `c h w`, inside the model. Pillow reads and writes images and GIFs; PyAV (imported only when an mp4
is written or read) encodes and decodes mp4.

Geometry (`frame_size`, `fit_frame`): the reference resizes the short side to 320 and centre-crops
320x512 (MODEL.md 2.1). Here the crop box follows the keyframes' aspect instead of being fixed at 512x320:
the short side goes to `short_side`, the long side to the multiple of the model's size step (64 for
toon-512) nearest to the keyframes' aspect, and the image is scaled to cover that box and centre-cropped
(only the rounding residue is cut). A 512x320 (or any 16:10) keyframe therefore gives exactly the
reference's 320x512 input. `--size HxW` fixes the box; for inputs narrower than the box the reference pads
with black bars (torchvision's CenterCrop on a too-small image), this code scales to cover instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manifests.files import atomic_path, make_writable_folder

log = logging.getLogger("inbetweener.media")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# pictures of formats not read here (painting programs' own, newer codecs): a sketch saved as one is named
# as not used rather than silently left out
OTHER_PICTURES = (
    ".psd",
    ".kra",
    ".clip",
    ".xcf",
    ".ora",
    ".avif",
    ".heic",
    ".heif",
    ".jxl",
    ".svg",
    ".tga",
    ".exr",
)


DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}  # --dtype of interpolate, evaluate


class InputError(ValueError):
    """A user input that cannot be used; the message names it and says why."""


# --- reading ---------------------------------------------------------------------------------------------------


# Pillow refuses images over twice its MAX_IMAGE_PIXELS (89 Mpx: a guard against decompression bombs from
# the web) with a traceback; keyframes are the user's own files, and a 1200 dpi scan of a drawing is ~180 Mpx.
# Here the limit is what decodes in a few GB of memory, and passing it is an InputError naming the file.
MAX_IMAGE_PIXELS = 512_000_000


_PIXEL_LIMIT_LOCK = threading.RLock()  # the limit is Pillow's global: one image read under another at a time


@contextlib.contextmanager
def _pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's pixel limit set to `limit` for the block (plugins check it when they decode, too), and put
    back after; reads in other threads wait, so none sees the other's limit."""
    from PIL import Image

    with _PIXEL_LIMIT_LOCK:
        before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


@contextlib.contextmanager
def _opened_image(path: str | os.PathLike) -> Iterator[Any]:
    """A Pillow image of `path`; InputError naming the file when it is missing, a folder or unreadable
    (also when reading fails inside the block)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image file")
    try:
        with _pixel_limit(None), Image.open(path) as image:
            pixels = image.size[0] * image.size[1]
            if pixels > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"{path} is {image.size[0]}x{image.size[1]} ({pixels / 1e6:.0f} megapixels), more than the"
                    f" {MAX_IMAGE_PIXELS / 1e6:.0f} read here; scale it down first (the model sees a keyframe"
                    " 320 pixels high)"
                )
            yield image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise InputError(
            f"{path} is not an image file that Pillow can read ({exc.__class__.__name__}"
            + (f": {detail})" if detail else ")")
        ) from exc


def read_image(path: str | os.PathLike, grey: bool = False) -> np.ndarray:
    """An image file -> uint8 `[H, W, 3]` RGB (or `[H, W]` grey), upright as an image viewer shows it (the
    EXIF orientation of a scan or a phone photo applied). Transparency is composited onto white, the paper
    colour of a drawing; 16-bit and float greyscale are scaled to 8 bits (Pillow's own conversion clips
    them, which turns a 16-bit line drawing white)."""
    from PIL import Image, ImageOps

    with _opened_image(path) as image:
        if getattr(image, "n_frames", 1) > 1:
            log.warning("%s has %d frames (animated or multi-page); its first is used", path, image.n_frames)
        image.load()
        image = ImageOps.exif_transpose(image)
        key = image.info.get("transparency")  # a colour key (PNG tRNS): the pixels of that value are clear
        if image.mode.startswith("I") or image.mode == "F":
            values = np.asarray(image)
            image = Image.fromarray(grey_to_uint8(values, image.mode), "L")
            if isinstance(key, int):  # the key is in the 16-bit values: carry it over as an alpha plane
                alpha = np.where(values == key, 0, 255).astype(np.uint8)
                image = Image.merge("LA", (image, Image.fromarray(alpha, "L")))
        if image.mode in ("RGBA", "LA", "PA") or (key is not None and image.mode in ("P", "L", "RGB", "1")):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("L" if grey else "RGB")
        return np.asarray(image, dtype=np.uint8).copy()


def grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Pillow's high-depth greyscale modes -> uint8: "I;16*" (and "I" holding values past 255) as 16-bit
    (65535 -> 255), "F" as 0..1 when nothing exceeds 1, else as 0..255."""
    if mode == "F":
        values = np.nan_to_num(values.astype(np.float64))
        full = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
    values = values.astype(np.int64)
    if mode.startswith("I;16") or values.max(initial=0) > 255:
        return ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return np.clip(values, 0, 255).astype(np.uint8)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file as `read_image` returns it (EXIF orientation applied), from its
    header: no pixels are decoded, so a batch of thousands of rows is checked in moments. The same errors
    as `read_image` for missing and unreadable files."""
    with _opened_image(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)  # 5-8: turned a quarter


ASPECT_TOLERANCE = 0.01  # keyframes whose width/height ratios differ by less are one framing at two sizes


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two (height, width) sizes are one framing: width/height ratios within ASPECT_TOLERANCE."""
    ra, rb = a[1] / a[0], b[1] / b[0]
    return max(ra, rb) <= min(ra, rb) * (1 + ASPECT_TOLERANCE)


def _one_aspect(paths: Sequence[str | os.PathLike], sizes: Sequence[tuple[int, int]]) -> None:
    """Keyframes may differ in size (each is scaled to the model's frame) but not in aspect: another aspect
    would be cropped differently, so the same content would not sit at the same place."""
    if not all(same_aspect(sizes[0], size) for size in sizes[1:]):
        listed = ", ".join(f"{Path(p).name} is {w}x{h}" for p, (h, w) in zip(paths, sizes))
        raise InputError(
            f"keyframes differ in size and aspect ({listed}); give keyframes of one aspect ratio (width x "
            "height), e.g. frames exported from the same scene (one size at two resolutions is fine)"
        )


def check_keyframe_files(paths: Sequence[str | os.PathLike]) -> tuple[int, int]:
    """What `read_keyframes` checks, from the files' headers: at least two, readable, one aspect ratio; the
    first one's (height, width) is returned."""
    if len(paths) < 2:
        raise InputError(f"need at least two keyframes, got {len(paths)}")
    sizes = [image_size(p) for p in paths]
    _one_aspect(paths, sizes)
    return sizes[0]


def read_keyframes(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """Read keyframes and check that they share one aspect ratio (the model interpolates one frame geometry;
    each keyframe is scaled to it, so sizes may differ)."""
    if len(paths) < 2:
        raise InputError(f"need at least two keyframes, got {len(paths)}")
    images = [read_image(p) for p in paths]
    _one_aspect(paths, [img.shape[:2] for img in images])
    return images


_INDEX = re.compile(r"(\d+)(?!.*\d)")  # the last integer in a name


def sketch_index(name: str) -> int | None:
    """The frame index a sketch file is for: the last integer of its stem (`frame_07.png` -> 7)."""
    match = _INDEX.search(Path(name).stem)
    return int(match.group(1)) if match else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def parse_sketch_args(items: Sequence[str], keyframes: Sequence[Path] = ()) -> dict[int, Path]:
    """`--sketch` values -> {frame index: file}. Each item is a folder (every image in it whose name ends in
    a number, that number being the frame index; hidden files and the `keyframes` left out), `INDEX=FILE`,
    or a FILE whose name ends in its index."""
    out: dict[int, Path] = {}

    def add(index: int, path: Path) -> None:
        if index in out and out[index] != path:
            raise InputError(f"two sketches for frame {index}: {out[index]} and {path}")
        out[index] = path

    def is_keyframe(p: Path) -> bool:
        return any(p.name == k.name and _same_file(p, k) for k in keyframes)

    for item in items:
        spec, sep, file = item.partition("=")
        if sep and spec.strip().isdigit():
            add(int(spec), Path(file.strip()))
            continue
        path = Path(item)
        if path.is_dir():
            # hidden files (macOS's ._NAME beside each file copied to a USB disk) and the keyframes, when the
            # sketches sit beside them, are not sketches
            files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
            files = [p for p in files if not is_keyframe(p)]
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            numbered = [(sketch_index(p.name), p) for p in images]
            if not any(i is not None for i, _ in numbered):
                raise InputError(
                    f"sketch folder {path} holds no image named by its frame index (e.g. 00.png, frame_07.png)"
                )
            for index, p in numbered:
                if index is not None:
                    add(index, p)
            unnumbered = [p.name for i, p in numbered if i is None]
            if unnumbered:  # said, so that a sketch named without its index is not silently left out
                log.warning(
                    "sketch folder %s: %s not used (no frame index at the end of the name)",
                    path,
                    ", ".join(unnumbered),
                )
            others = [p.name for p in files if p.suffix.lower() in OTHER_PICTURES]
            if others:  # a .psd or .avif sketch is not silently left out either
                log.warning(
                    "sketch folder %s: %s not used (export sketches as %s)",
                    path,
                    ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else ""),
                    "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES),
                )
        else:
            index = sketch_index(path.name)
            if index is None:
                raise InputError(
                    f"cannot tell which frame sketch {path} is for: name it by its frame index "
                    f"(e.g. sketch_07.png) or pass INDEX={path}"
                )
            add(index, path)
    return out


# --- geometry --------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """`HxW` (e.g. `320x512`) -> (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"size must be HEIGHTxWIDTH, e.g. 320x512, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def frame_size(height: int, width: int, short_side: int = 320, multiple: int = 64) -> tuple[int, int]:
    """The model's frame for keyframes of height x width: short side `short_side`, long side the multiple of
    `multiple` closest to the keyframes' aspect (both sides multiples of `multiple`)."""
    short = max(multiple, round(short_side / multiple) * multiple)
    long = max(multiple, round(short * max(height, width) / min(height, width) / multiple) * multiple)
    return (short, long) if height <= width else (long, short)


def check_size(size: tuple[int, int], multiple: int) -> None:
    h, w = size
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise InputError(f"frame size {h}x{w} must be positive multiples of {multiple} for this model")


def fit_frame(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale `image` ([H, W, 3] or [H, W]) to cover `size` = (height, width) and centre-crop it.

    Bilinear with Pillow's antialiasing (what torchvision's Resize does on the reference's PIL images); the
    crop offset is round((excess) / 2), torchvision's CenterCrop rule."""
    from PIL import Image

    th, tw = size
    h, w = image.shape[:2]
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        image = image[top : top + th, left : left + tw]
    return np.ascontiguousarray(image)


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 `[..., H, W, 3]` -> float32 `[..., 3, H, W]` in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.array(frames, dtype=np.float32)) / 127.5 - 1.0
    return x.movedim(-1, -3)


def to_uint8_frames(video: torch.Tensor, what: str = "", dtype: torch.dtype | None = None) -> np.ndarray:
    """A generated clip `[3, T, H, W]` in [-1, 1] -> uint8 `[T, H, W, 3]`, clamped and rounded (the reference
    truncates instead of rounding: at most one grey level apart). InputError naming `what` when the clip holds
    NaN or inf, which the cast would turn into black frames written (or scored) as the model's output."""
    if not torch.isfinite(video).all():
        precision = f" at {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
        raise InputError(
            f"{what + ': ' if what else ''}the model's output holds NaN or inf{precision}: a checkpoint with"
            " non-finite weights (damaged, or saved from a diverged run), or an fp16 overflow (--dtype bf16 or fp32)"
        )
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).numpy()


def sketch_hint(image: np.ndarray) -> np.ndarray:
    """A sketch as `read_sketch` gives it (grey uint8 [H, W], lines light on dark) -> the encoder's hint in
    [0, 1], lines ~1 on 0 (MODEL.md 4)."""
    return image.astype(np.float32) / 255.0


SKETCH_BLANK = 16  # a sketch none of whose pixels is this far (of 255) from the others has no visible line


def paper_is_light(grey: np.ndarray) -> bool:
    """Whether a grey drawing [H, W] is dark lines on light paper. Two views of the paper: the median of a
    ring along the edges (5% of the short side), where drawings seldom reach, and the most common grey
    level. Light by either is light: a drawing of more ink than paper (a dense, shaded sketch) has a light
    edge and a dark commonest level, a photo of a sheet on a desk (a scan with the lid's dark margin) a
    dark edge and a light commonest level; only a light-on-dark drawing is dark by both. (The mean took
    the first for an inverted drawing.)"""
    ring = max(1, round(0.05 * min(grey.shape[:2])))
    edges = np.concatenate(
        [grey[:ring].ravel(), grey[-ring:].ravel(), grey[:, :ring].ravel(), grey[:, -ring:].ravel()]
    )
    counts = np.bincount((grey.ravel() // 16).astype(np.int64), minlength=16)
    commonest = 16 * int(np.argmax(counts)) + 8
    return float(np.median(edges)) > 127.5 or commonest > 127.5


def read_sketch(path: str | os.PathLike) -> np.ndarray:
    """A sketch file -> grey uint8 [H, W] in the encoder's polarity: lines light on dark. Dark-on-light and
    light-on-dark drawings are told apart by their paper (`paper_is_light`). A line layer exported on
    transparency (most of the picture clear) is read by its opacity, whatever the colour of its lines:
    composited onto white, white lines would vanish. A sketch with no line at all is warned about."""

    with _opened_image(path) as image:
        image.load()
        clear = None
        if image.mode in ("RGBA", "LA", "PA") or (
            "transparency" in image.info and image.mode in ("P", "L", "RGB", "1")
        ):
            from PIL import ImageOps

            alpha = np.asarray(ImageOps.exif_transpose(image).convert("RGBA"), dtype=np.uint8)[..., 3]
            clear = alpha if (alpha < 128).mean() > 0.5 else None
    if clear is not None:
        lines = clear.copy()  # opaque = ink
    else:
        grey = read_image(path, grey=True)
        lines = 255 - grey if paper_is_light(grey) else grey
    if int(lines.max(initial=0)) - int(lines.min(initial=0)) < SKETCH_BLANK:
        log.warning("sketch %s shows no line (a blank or nearly uniform page): check the file", path)
    return lines


# --- writing ---------------------------------------------------------------------------------------------------

OUTPUT_FORMATS = ("mp4", "gif", "png")


def write_pngs(frames: np.ndarray, folder: Path, first_index: int = 0) -> list[Path]:
    """frames [T, H, W, 3] -> folder/0000.png, 0001.png, ... (numbered from `first_index`)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        path = folder / f"{first_index + i:04d}.png"
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        paths.append(path)
    return paths


def remove_stale(
    out_dir: Path, written: dict[str, Path | list[Path]], keep: Iterable[str | os.PathLike] = ()
) -> list[Path]:
    """Remove the outputs an earlier run recorded in `out_dir/meta.json` that this run did not write again:
    its numbered frames past this run's count (an image-sequence import would take them as part of this
    clip), its mp4/gif when this run was not asked for them (made from other frames). Only files that run
    listed, inside `out_dir`, are touched, and never one in `keep` (this run's keyframes and sketches).
    -> the removed paths."""
    import json

    try:
        earlier = json.loads((out_dir / "meta.json").read_text()).get("outputs", {})
        listed = [Path(p) for v in earlier.values() for p in (v if isinstance(v, list) else [v])]
    except (OSError, ValueError, AttributeError, TypeError):  # no earlier run, or not this program's file
        return []
    kept = {Path(p).resolve() for v in written.values() for p in (v if isinstance(v, list) else [v])}
    kept |= {Path(p).resolve() for p in keep}
    inside = out_dir.resolve()
    removed = []
    for path in listed:
        real = path.resolve()
        if real in kept or inside not in real.parents or not real.is_file():
            continue
        real.unlink()
        removed.append(path)
    return removed


def write_gif(frames: np.ndarray, path: Path, fps: float) -> Path:
    """An endlessly looping GIF (Pillow; one adaptive palette per frame)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path, suffix=".gif") as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
        )
    return path


def mp4_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def write_mp4(frames: np.ndarray, path: Path, fps: float, crf: int = 10) -> Path:
    """H.264 (libx264, crf 10 as the reference's save_videos; MPEG-4 part 2 where PyAV lacks libx264),
    yuv420p, constant frame rate. Odd sizes are padded by one edge pixel (yuv420p needs even sizes)."""
    import av

    t, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    try:
        av.codec.Codec("libx264", "w")
        codec = "libx264"
    except Exception:  # PyAV builds without GPL codecs
        codec = "mpeg4"
    with atomic_path(path, suffix=".mp4") as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":  # mbtree=0: the same frames give the same bytes (pipeline/video_encode.py)
            stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_outputs(
    frames: np.ndarray,
    out_dir: Path,
    fps: float,
    formats: Iterable[str] = OUTPUT_FORMATS,
    stem: str = "inbetween",
    keep: Iterable[str | os.PathLike] = (),
) -> dict[str, Path | list[Path]]:
    """Write a clip [T, H, W, 3] as out_dir/{stem}.mp4, {stem}.gif and frames/0000.png ... (as asked); the
    outputs an earlier run into out_dir listed in its meta.json and this one did not write again are
    removed (`remove_stale`; `keep`: files never to remove)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | list[Path]] = {}
    formats = set(formats)
    if "png" in formats:
        written["png"] = write_pngs(frames, out_dir / "frames")
    if "gif" in formats:
        written["gif"] = write_gif(frames, out_dir / f"{stem}.gif", fps)
    if "mp4" in formats:
        written["mp4"] = write_mp4(frames, out_dir / f"{stem}.mp4", fps)
    removed = remove_stale(out_dir, written, keep)
    if removed:
        log.info(
            "%s: removed %d file(s) an earlier run left there (%s)", out_dir, len(removed), removed[0].name
        )
    return written


def check_writable_folder(path: Path, create: bool) -> None:
    """InputError, before any model loads, when `path` cannot be the output folder: a file stands at it or
    above it, or it (or the folder it would be made in) is not writable. create=True makes it (a real run);
    create=False (a dry run) writes nothing."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--out {path}: {existing} is a file, not a folder")
    if not create:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"--out {path}: the folder {existing} is not writable")
        return
    problem = make_writable_folder(path)
    if problem:
        raise InputError(f"--out {path}: {problem}")


def decode_video(source: bytes | str | os.PathLike) -> np.ndarray:
    """An mp4 (bytes or a path) -> uint8 [T, H, W, 3], every frame in order."""
    import io

    import av

    handle = io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)
    with av.open(handle) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise InputError("the video holds no frames")
    return np.stack(frames)
