"""Training data: 16-frame windows streamed from the curate job's WebDataset shards, resumable exactly.

Where the shards are and how a tar is read is `training.shards`; what a sample holds and how one window
is decoded from it (the window policy: frames, stride, crop, the `fs` condition) is
`training.shard_samples`. Here: the stream over them, its batches and its position, and the interpolation
conditioning.

The stream (one per reading slot = rank x DataLoader worker) is a pure function of (seed, epoch, slot):
    shards, permuted per epoch -> this slot's part (whole shards when there are at least as many shards
    as slots, else every slots-th sample of every shard) -> tar members grouped by key -> a shuffle
    buffer -> decode one window per clip (crop/stride drawn from a per-clip seed) -> batches.
Its position is (epoch, samples out of the shuffle buffer). A checkpoint stores each slot's position;
a resumed stream re-reads the current epoch's tar bytes up to that position without decoding them, so
the batches after a resume equal those of an uninterrupted run. Workers are rotated on resume so that
the DataLoader's round-robin continues with the worker whose turn it was.

Nothing here is fatal for bad input: an unreadable or truncated shard, a sample without a readable
video, a clip shorter than one window are skipped and counted (`SlotState.counts`; each sample is said
once, with its shard), and the trainer logs the counts, until a reading slot can never get a usable clip
(`_Fruitless`: then a DataError, one line). webdataset (the library) is not used: its pipeline exposes no
position to resume from, and the GPU machines have only torch.

Interpolation conditioning (MODEL.md 2.8): `interp_concat` keeps the first and last frames' latents in
the concat channels and zeros between; `conditioning_dropout` draws DynamiCrafter's 5/5/5 % events.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.shard_samples import SampleError, decode_window
from training.shards import DataError, iter_tar_samples, open_shard, shards_digest

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    train: str = (
        ""  # train shards (folder, glob, brace pattern, list file, pipe:CMD, fsspec URL); set by --data
    )
    eval: str = ""  # eval shards, same forms; empty: the `eval` split beside `train` when there is one
    frames: int = 16  # frames per window (the UNet's temporal_length)
    height: int = 320  # window height in pixels
    width: int = 512  # window width in pixels
    stride_min: int = 1  # smallest frame stride (DynamiCrafter: random stride 1..6)
    stride_max: int = 6  # largest frame stride
    fs_mode: str = "fps"  # frame-stride condition: "fps" = clip fps // stride (the reference), "stride"
    crop: str = "center"  # "center" or "random" (one offset per clip)
    shuffle_buffer: int = 100  # samples held by the shuffle buffer of each reading slot
    shuffle_shards: bool = True  # permute the shard order every epoch
    num_workers: int = 4  # DataLoader worker processes per rank (0: read in the training process)
    prefetch_factor: int = 2  # batches prefetched per worker


# --- windows -> batches ------------------------------------------------------------------------------------


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows -> a batch: video uint8 [b, 3, t, H, W], first/last uint8 [b, 3, H, W] (the keyframes),
    fs/stride long [b], fps float [b], caption/key lists."""
    video = torch.stack([it["video"] for it in items])
    return {
        "video": video,
        "first": video[:, :, 0].clone(),
        "last": video[:, :, -1].clone(),
        "caption": [it["caption"] for it in items],
        "fs": torch.tensor([it["fs"] for it in items], dtype=torch.long),
        "stride": torch.tensor([it["stride"] for it in items], dtype=torch.long),
        "fps": torch.tensor([it["fps"] for it in items], dtype=torch.float32),
        "key": [it["key"] for it in items],
    }


def to_model_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (on the tensor's device)."""
    return video.float() / 127.5 - 1.0


# --- the resumable stream ----------------------------------------------------------------------------------


@dataclass
class SlotState:
    """Position of one reading slot: everything it emitted up to (epoch, pos) went into yielded batches."""

    slot: int = 0
    epoch: int = 0
    pos: int = 0  # samples out of the shuffle buffer in this epoch (decoded or skipped)
    counts: dict[str, int] = field(default_factory=dict)  # corrupt / too_short samples since the start
    bad_shards: list[str] = field(default_factory=list)  # "epoch:url" of shards that failed to read

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "epoch": self.epoch,
            "pos": self.pos,
            "counts": dict(self.counts),
            "bad_shards": list(self.bad_shards),
        }


@dataclass
class DataState:
    """What a rank's trainer consumed: batches so far and the latest position of every slot."""

    world: int = 1
    workers: int | None = 0  # None: a restarted position, which any number of workers may take
    batches: int = 0
    slots: dict[int, SlotState] = field(default_factory=dict)
    shards: str = ""  # shards_digest of the shards read ("": a checkpoint from before it was recorded)
    first_epoch: int = 0  # where a slot without a saved position starts (a data restart: a new order)

    def consume(self, batch: dict[str, Any]) -> None:
        self.batches += 1
        state = batch["state"]
        self.slots[state.slot] = state

    def skipped(self) -> dict[str, int]:
        """Totals over this rank's slots: corrupt and too_short samples, distinct unreadable shards."""
        out = {"corrupt": 0, "too_short": 0}
        for s in self.slots.values():
            for k, v in s.counts.items():
                out[k] = out.get(k, 0) + v
        out["bad_shards"] = len(self.bad_shard_names())
        return out

    def bad_shard_names(self) -> set[str]:
        """The distinct unreadable shards this rank's slots met."""
        return {b.split(":", 1)[1] for s in self.slots.values() for b in s.bad_shards}

    def to_dict(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "workers": self.workers,
            "batches": self.batches,
            "slots": {str(k): v.to_dict() for k, v in self.slots.items()},
            "shards": self.shards,
            "first_epoch": self.first_epoch,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataState:
        slots = {int(k): SlotState(**v) for k, v in d["slots"].items()}
        return cls(
            world=d["world"],
            workers=d["workers"],
            batches=d["batches"],
            slots=slots,
            shards=d.get("shards", ""),
            first_epoch=d.get("first_epoch", 0),
        )

    def restarted(self, world: int | None = None) -> DataState:
        """A fresh position for `world` ranks (default: the same), in an order not read before (the epoch
        after the furthest any slot reached): `--restart-data`, after the shards, workers or ranks changed."""
        epoch = max((s.epoch for s in self.slots.values()), default=self.first_epoch - 1) + 1
        return DataState(world=world or self.world, workers=None, first_epoch=epoch)

    def check_resumable(self, shards: list[str], world: int, workers: int) -> None:
        """ValueError when this position cannot continue on `shards` with `world` ranks x `workers` workers:
        the same samples in the same order need the same shards and reading slots."""
        if self.world != world:  # each rank's reading slots continue where that rank stopped
            raise ValueError(
                f"the data position was saved by {self.world} rank(s); resume with the same number (now {world})"
                " to continue the same sample order, or pass --restart-data to go on with the weights,"
                " optimizer and step on these ranks, reading the data in a new order"
            )
        if self.workers is not None and max(1, self.workers) != max(1, workers):
            raise ValueError(
                f"the data position was saved with {self.workers} DataLoader worker(s) per rank; resume with"
                f" the same (now {workers}) to continue the same sample order, or pass --restart-data to read"
                " the data in a new order from here"
            )
        if self.shards and self.shards != shards_digest(shards):
            raise ValueError(
                "the shards differ from those the data position was saved on (other files, or the same names"
                " at other sizes: a curate rerun?); pass --restart-data to read the new shards in a new order"
                " from here (the weights, optimizer and step continue), or give the same --data"
            )


def slot_shards(shards: list[str], slot: int, slots: int) -> tuple[list[str], int | None]:
    """(the shards a slot reads in one epoch's order, which of every `slots` samples it takes: None = all).
    Whole shards per slot when there are at least as many shards as slots, else every slots-th sample of
    every shard."""
    if len(shards) >= slots:
        return shards[slot::slots], None
    return shards, slot


def _raw_samples(
    shards: list[str], slot: int, slots: int, epoch: int, bad: list[str], why: dict[str, str] | None = None
) -> Iterator[dict]:
    """This slot's samples of one epoch; an unreadable shard is tagged in `bad` (and its error kept in
    `why`) and skipped."""
    mine, take = slot_shards(shards, slot, slots)
    index = 0
    for url in mine:
        try:
            with open_shard(url) as stream:
                for sample in iter_tar_samples(stream):
                    if take is None or index % slots == take:
                        sample["__url__"] = url  # which shard, for the message of a sample skipped
                        yield sample
                    index += 1
        except DataError:  # a setup error (a missing fsspec backend): stop
            raise
        except Exception as exc:  # tarfile, OSError, and fsspec backends' own types (botocore's, aiohttp's)
            tag = f"{epoch}:{url}"
            if why is not None:
                why.setdefault(url, f"{type(exc).__name__}: {exc}")
            if tag not in bad:
                bad.append(tag)
                log.warning("skipping the rest of unreadable shard %s: %s", url, exc)


def _shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle buffer (webdataset's `shuffle`): emit a random held sample per new one."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], sample = sample, buffer[j]
        yield sample
    order = rng.permutation(len(buffer))
    for j in order:
        yield buffer[j]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The window draws of one clip in one epoch: independent of the reading history."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


class ClipStream(IterableDataset):
    """Endless batches of windows for one rank; each DataLoader worker is one reading slot."""

    def __init__(
        self,
        shards: list[str],
        cfg: DataConfig,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        state: DataState | None = None,
    ):
        if not shards:
            raise ValueError("no training shards: pass --data (a curate OUT folder, a shard folder or a URL)")
        self.shards, self.cfg, self.batch_size, self.seed = shards, cfg, batch_size, seed
        self.rank, self.world = rank, world
        if state is not None:
            state.check_resumable(shards, world, cfg.num_workers)
        state = state or DataState(world=world)
        state.workers, state.shards = cfg.num_workers, shards_digest(shards)
        self.state = state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(1, self.cfg.num_workers)
        physical = info.id if info is not None else 0
        worker = (physical + self.state.batches) % workers  # whose turn it was when the state was saved
        slot, slots = self.rank * workers + worker, self.world * workers
        start = self.state.slots.get(slot, SlotState(slot=slot, epoch=self.state.first_epoch))
        counts = {"corrupt": 0, "too_short": 0, **start.counts}
        bad = list(start.bad_shards)
        epoch, skip = start.epoch, start.pos
        pending: list[dict[str, Any]] = []
        # (shard, key) of the skipped samples warned of: each once, not every epoch
        said: set[tuple[str, str]] = set()
        # An epoch in which this slot's shards give no usable clip (they are the bad ones this time) is not
        # an error: the next epoch deals it other shards. Only when the slot's fruitless epochs have covered
        # every shard is there no training data at all.
        fruitless = _Fruitless(self.shards, slots, self.cfg.shuffle_shards)
        while True:
            order = list(self.shards)
            if self.cfg.shuffle_shards:
                order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
            rng = np.random.default_rng([self.seed, epoch, slot])
            unreadable: dict[str, str] = {}
            raw = _raw_samples(order, slot, slots, epoch, bad, unreadable)
            pos = good = 0
            for sample in _shuffled(raw, self.cfg.shuffle_buffer, rng):
                pos += 1
                if pos <= skip:
                    continue  # replaying up to the saved position: bytes read, nothing decoded
                try:
                    item = decode_window(sample, self.cfg, sample_rng(self.seed, epoch, sample["__key__"]))
                except Exception as exc:  # an input no one foresaw too: that sample is lost, not the run
                    reason = exc.reason if isinstance(exc, SampleError) else "corrupt"
                    counts[reason] = counts.get(reason, 0) + 1
                    where = (sample.get("__url__", ""), sample["__key__"])
                    if where not in said:
                        said.add(where)
                        detail = str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}"
                        log.warning("skipping sample %s of shard %s (%s)", where[1], where[0], detail)
                    continue
                good += 1
                pending.append(item)
                if len(pending) == self.batch_size:
                    batch = collate(pending)
                    batch["state"] = SlotState(slot, epoch, pos, dict(counts), list(bad))
                    pending = []
                    yield batch
            if good or skip:
                fruitless = _Fruitless(self.shards, slots, self.cfg.shuffle_shards)
            else:
                fruitless.add(slot_shards(order, slot, slots)[0], pos, unreadable)
                if fruitless.covered():
                    raise DataError(fruitless.message(slot, counts))
            epoch, skip = epoch + 1, 0


class _Fruitless:
    """A reading slot's run of epochs without a usable clip: the shards they dealt it and what they gave.

    It ends (`covered`) when reading on cannot help: whole shards per slot, shuffled, and every shard dealt
    to this slot without a usable clip (then no shard has one); a fixed deal (data.shuffle_shards=false:
    each epoch gives the slot what the last one did); or EPOCHS in a row (the bound when fewer shards than
    slots make each epoch take other samples of every shard)."""

    EPOCHS = 64

    def __init__(self, shards: list[str], slots: int, shuffled: bool):
        self.shards, self.slots, self.shuffled = shards, slots, shuffled
        self.tried: set[str] = set()
        self.epochs = self.samples = 0
        self.unreadable: dict[str, str] = {}

    def add(self, dealt: list[str], samples: int, unreadable: dict[str, str]) -> None:
        self.tried.update(dealt)
        self.epochs += 1
        self.samples += samples
        self.unreadable.update(unreadable)

    def _whole_shards(self) -> bool:
        return len(self.shards) >= self.slots

    def covered(self) -> bool:
        if self.epochs >= self.EPOCHS or not self.shuffled:
            return True
        if not self._whole_shards():  # every epoch reads every shard; no sample at all stays so
            return self.samples == 0
        return self.tried >= set(self.shards)

    def message(self, slot: int, counts: dict[str, int]) -> str:
        example = next(iter(self.unreadable), None) or min(self.tried, default=self.shards[0])
        everything = self._whole_shards() and self.tried >= set(self.shards) or len(self.shards) < self.slots
        if everything and self.samples == 0 and len(self.unreadable) == len(self.shards):
            return (
                f"no shard could be read ({len(self.unreadable)} of {len(self.shards)} unreadable, e.g. {example}:"
                f" {self.unreadable[example]}); --data takes a curate OUT folder, a folder of .tar shards, a glob,"
                " a list file or a URL"
            )
        if len(self.shards) < self.slots and self.samples == 0:
            return (
                f"reading slot {slot} of {self.slots} gets no samples from {len(self.shards)} shard(s): fewer"
                " samples than ranks x workers? lower data.num_workers"
            )
        found = (
            f"{self.samples} samples over {self.epochs} epoch(s); {counts['corrupt']} corrupt and"
            f" {counts['too_short']} too short in all; {len(self.unreadable)} shard(s) unreadable"
        )
        if self._whole_shards() and self.tried >= set(self.shards):
            # every clip shorter than a window: the setting to change, not only the count
            short = counts["too_short"] and counts["too_short"] >= self.samples - counts["corrupt"]
            hint = (
                ": every clip is shorter than a window; lower data.frames (or data.stride_min)"
                if short
                else ""
            )
            return f"no usable clip in any of the {len(self.shards)} shard(s) ({found}), e.g. {example}{hint}"
        fixed = " (the same every epoch: data.shuffle_shards=false)" if not self.shuffled else ""
        return (
            f"reading slot {slot} of {self.slots} found no usable clip in what it was dealt: {len(self.tried)} of"
            f" {len(self.shards)} shard(s){fixed} ({found}), e.g. {example}; other slots may have clips, but"
            " every slot must give batches: lower data.num_workers"
            + (" or set data.shuffle_shards=true" if not self.shuffled else "")
        )


def make_loader(
    shards: list[str],
    cfg: DataConfig,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    state: DataState | None = None,
) -> DataLoader:
    """The rank's DataLoader: workers build whole batches; in-order round-robin over workers.

    The loader gets its own generator so that creating it never draws from the training RNG.
    """
    dataset = ClipStream(shards, cfg, batch_size, seed, rank, world, state)
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_windows(shards: list[str], cfg: DataConfig, count: int) -> list[dict[str, Any]]:
    """The first `count` usable eval windows in shard order (stride_min, start 0, centre crop)."""
    out: list[dict[str, Any]] = []
    for sample in _raw_samples(shards, 0, 1, 0, []):
        try:
            out.append(decode_window(sample, cfg, None))
        except Exception as exc:  # as in the training stream: that sample is lost, not the run
            detail = str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "no eval window from sample %s of shard %s (%s)", sample["__key__"], sample["__url__"], detail
            )
            continue
        if len(out) >= count:
            break
    return out


# --- the interpolation conditioning (MODEL.md 2.2, 2.8) ----------------------------------------------------


def interp_concat(z: torch.Tensor) -> torch.Tensor:
    """Concat condition from clip latents z [b, c, t, h, w]: the first and last frames' latents, zeros
    between (DynamiCrafter's `interp_mode`; ToonCrafter's release dropped this training branch)."""
    cond = torch.zeros_like(z)
    cond[:, :, 0] = z[:, :, 0]
    cond[:, :, -1] = z[:, :, -1]
    return cond


def conditioning_dropout(
    batch: int, p: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamiCrafter's classifier-free-guidance dropout: r ~ U(0, 1) per clip; text dropped if r < 2p,
    image dropped if p <= r < 3p; so text only, both, image only are three disjoint events of p each
    (uncond_prob p = 0.05 in config_interp.yaml). -> (drop_text [b] bool, drop_image [b] bool)."""
    r = torch.rand(batch, device=device)
    return r < 2 * p, (r >= p) & (r < 3 * p)
