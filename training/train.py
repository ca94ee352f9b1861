"""`inbetweener train {rectify,decoder,sketch}`: the three ToonCrafter training stages on curated shards.

The command line and the run's config (its layers: defaults <- the stage's paper settings <- the preset's
profile <- --config <- --set) are read in run_config.py; every setting and input the run was given (shards,
--init, --resume, the stage's weights, --out) is checked before any work in run_checks.py. The resolved
config is printed, and saved with every checkpoint.

One process, or many under torchrun (DDP; `--set train.fsdp=true` shards the UNet with FSDP2). The loop
below reads top to bottom: batches -> forward under autocast -> backward (gradient accumulation to the
global batch) -> clip -> step -> EMA -> logs, sample videos, eval, checkpoints. `--resume` continues from
OUT/checkpoints/latest exactly: weights, optimizer, EMA, step, data position and RNG states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from manifests.files import curate_out_of, folder_lock
from training import compilation, engine, float8, run_checkpoints
from training.data import DataState, collate, eval_windows, make_loader, to_model_range
from training.engine import TrainConfig
from training.models.layout import set_channels_last
from training.models.vae import resnet_blocks
from training.roles import format_role_table
from training.run_checks import _input_errors, check_inputs
from training.run_config import STAGES, parse_args
from training.shards import TRAIN_INDEX, DataError, write_train_index
from training.stages import decoder
from training.stages.common import unet_blocks

log = logging.getLogger("training.train")


def initial_model(cfg: TrainConfig):
    """The ToonCrafter the stage starts from, identical on every rank: the init checkpoint (a plain
    DynamiCrafter decoder becomes a dual-reference one that starts as the plain one), or a seeded random
    init when there is none (tests, benchmarks)."""
    from training.checkpoint import load_model
    from training.models.tooncrafter import build_tooncrafter

    torch.manual_seed(cfg.seed)
    if cfg.init_checkpoint:
        return load_model(cfg.init_checkpoint, preset=cfg.preset, dual_ref_decoder=True)
    log.warning("no train.init_checkpoint: starting from a random %s model (tests, benchmarks)", cfg.preset)
    return build_tooncrafter(cfg.preset)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


_RUN_OUT: list[Path] = []  # the run's --out, once parsed: what to say after Ctrl-C


def main(argv: list[str] | None = None) -> int:
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, for the whole run
            return _main(argv, held)
    except KeyboardInterrupt:
        last = run_checkpoints.latest_checkpoint(_RUN_OUT[-1]) if _RUN_OUT else None
        hint = (
            f"run it again with --resume to go on from {last}"
            if last is not None
            else "no checkpoint was written yet: run the same command again (without --resume) to start over"
        )
        print(f"\ninbetweener train: interrupted; {hint}", file=sys.stderr)
        return 130  # the shell's code for a SIGINT


def _main(argv: list[str] | None, held: contextlib.ExitStack) -> int:
    args = parse_args(argv)
    _RUN_OUT.append(Path(args.out))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _input_errors():  # everything the user gave is checked before a model is built
        run, resume_from, shards, eval_shards = check_inputs(args)
    tc, stage_name = run.train, args.stage
    out = Path(args.out)
    models_dir = Path(args.models_dir) if args.models_dir else None

    # --- processes, device, precision: decided here and nowhere else -------------------------------------
    d = engine.init_distributed(tc.device)
    if not d.main:  # the settings' and the loading's warnings are the same on every rank: rank 0 says them
        for name in ("training.train", "training.checkpoint", "training.stages"):
            logging.getLogger(name).setLevel(logging.ERROR)
    device = engine.pick_device(tc, d)
    amp = engine.autocast_dtype(tc, device)  # train.precision was checked with the other settings
    with _input_errors():  # the number of ranks is known only now
        accum = engine.accumulation_steps(tc, d.world)
    if d.main:
        with _input_errors():  # one run per folder: a second one would write the same checkpoints
            held.enter_context(folder_lock(out, f"inbetweener train {stage_name}"))
            data = curate_out_of(run.data.train)  # and no `select` swaps the shards under the run
            if data is not None:
                held.enter_context(folder_lock(data, f"inbetweener train {stage_name}", shared=True))
        for stale in run_checkpoints.remove_stale_tmp(out):
            log.info("removed %s, a checkpoint an earlier run left half-written", stale)
        if write_train_index(shards, out / TRAIN_INDEX) is None:  # what evaluate checks its clips against
            log.info("no shard index beside the shards: %s not written", out / TRAIN_INDEX)
        print(json.dumps(run.for_stage(stage_name), indent=1))
        print(
            f"{d.world} rank(s) on {device.type}, autocast {amp}, {accum} micro-batch(es) of {tc.micro_batch} "
            f"per step -> global batch {tc.global_batch}",
            flush=True,
        )

    # --- model and stage ------------------------------------------------------------------------------------
    with _input_errors():
        model = initial_model(tc)
        model.unet.set_gradient_checkpointing(tc.gradient_checkpointing, tc.checkpoint_levels)
        set_channels_last(model, tc.channels_last)  # the UNet and the VAE encoder
        stage = STAGES[stage_name].build(model, run, models_dir)
        if tc.float8:
            float8.check_device(device)
        fp8_layers = float8.convert_unet(model.unet, tc.float8, tc.float8_layers)
        compiled = compilation.compile_unet_blocks(
            model.unet, unet_blocks(model)[:-1], tc.compile, tc.recompute_budget
        )
    frozen = compilation.compile_blocks(
        resnet_blocks(model.vae.encoder), tc.compile
    )  # frozen, run every step
    if d.main:
        print(format_role_table(stage.roles), flush=True)
        if tc.float8:
            print(f"fp8 GEMMs ({tc.float8}, torchao): {len(fp8_layers)} UNet transformer linears", flush=True)
            if not fp8_layers:
                log.warning(
                    "train.float8: no UNet linear of preset %s is large enough to gain from fp8 on a GPU;"
                    " train.float8_layers=all converts them anyway",
                    tc.preset,
                )
            if device.type == "cuda" and not tc.compile:
                log.warning("train.float8 without train.compile: each fp8 cast runs as its own pass (slow)")
        if tc.channels_last and device.type == "cuda" and not tc.compile:
            log.warning(
                "train.channels_last without train.compile: eager GroupNorm converts each activation"
                " to contiguous and back (slower, not faster)"
            )
        if compiled:
            print(
                f"torch.compile ({tc.compile}): {compiled} UNet blocks and {frozen} VAE encoder blocks, "
                "compiled on first use",
                flush=True,
            )
    stage.net.to(device)
    fsdp = tc.fsdp and bool(stage.shard_blocks)
    if tc.fsdp and not fsdp and d.main:
        log.warning(
            "train.fsdp: the %s stage has no UNet blocks to shard; it runs replicated (DDP)", stage_name
        )
    net = engine.wrap(stage.net, d, device, stage.shard_blocks if fsdp else None)
    trainable = {n: p for n, p in stage.net.named_parameters() if p.requires_grad}
    optimizers = {"model": engine.adamw(trainable.values(), tc, device)}
    disc = disc_net = None
    if stage.discriminator is not None:
        disc = stage.discriminator.to(device).train()
        disc_net = engine.wrap(disc, d, device)
        trainable.update({f"discriminator.{n}": p for n, p in disc.named_parameters()})
        disc_lr = run.decoder.disc_lr or tc.lr
        optimizers["discriminator"] = engine.adamw(
            disc.parameters(), tc, device, lr=disc_lr, betas=(0.5, 0.9)
        )
    ema_params = {n: p for n, p in trainable.items() if not n.startswith("discriminator.")}
    ema = engine.EMA(ema_params, tc.ema_decay) if tc.ema_decay > 0 else None

    # --- where to start: fresh, or exactly where the last checkpoint stopped ---------------------------------
    step, data_state = 0, None
    if resume_from is not None:
        folder = resume_from
        with _input_errors():  # a damaged checkpoint, or another number of ranks
            step, rank_state = run_checkpoints.load_checkpoint(
                folder, d, trainable=trainable, optimizers=optimizers, ema=ema, restart_data=args.restart_data
            )
        # the config's optimizer settings, not the saved ones (lr is set every step)
        run_checkpoints.set_hyperparameters(
            optimizers["model"], betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay
        )
        if "discriminator" in optimizers:
            run_checkpoints.set_hyperparameters(
                optimizers["discriminator"], lr=run.decoder.disc_lr or tc.lr, weight_decay=tc.weight_decay
            )
        data_state = DataState.from_dict(rank_state["data"])
        if args.restart_data:
            data_state = data_state.restarted(d.world)
        if data_state.world == d.world and rank_state.get("rank") in (None, d.rank):
            engine.restore_rng(rank_state["rng"], device)
        else:  # on another number of ranks: each rank's noise seeded anew, from the step
            torch.manual_seed(tc.seed + d.rank + 1_000_003 * step)
        if d.main:
            changed = run_checkpoints.config_changes(folder, run.for_stage(stage_name))
            print(
                f"resumed from {folder} at step {step}" + (f"; config changed: {changed}" if changed else ""),
                flush=True,
            )
            if step >= tc.steps:
                print(
                    f"train.steps={tc.steps}: the run is at step {step} already, nothing to train", flush=True
                )
    else:
        torch.manual_seed(tc.seed + d.rank)  # noise differs per rank, identically on every run
    with _input_errors():  # e.g. resuming with another number of ranks or data workers
        loader = make_loader(shards, run.data, tc.micro_batch, tc.seed, d.rank, d.world, data_state)
    data_state = loader.dataset.state
    batches = iter(loader)
    sample_batch = None
    samples_here = d.main or (fsdp and d.active)  # sharded weights: every rank takes part in sampling
    if samples_here and tc.sample_every > 0:
        windows = eval_windows(eval_shards or shards, run.data, tc.sample_clips)
        if not windows and eval_shards:  # an eval split of short clips: there were no sample videos, unsaid
            log.warning(
                "no clip of the eval split (%s) gives a window of data.frames=%d: sample videos from the"
                " training shards",
                run.data.eval,
                run.data.frames,
            )
            windows = eval_windows(shards, run.data, tc.sample_clips)
        sample_batch = collate(windows) if windows else None

    logger = engine.Logger(out, d.main, first_step=step + 1)  # a resume's logs replace what followed
    bar = None
    if d.main:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc=f"train {stage_name}", unit="step", dynamic_ncols=True)
        held.callback(bar.close)  # closed before Ctrl-C's line is said (it was redrawn after it)
    t_last, step_last = time.perf_counter(), step
    nonfinite_run, nonfinite_steps = 0, 0  # updates skipped for a gradient that is not finite

    # --- the loop ---------------------------------------------------------------------------------------------
    while step < tc.steps:
        lr = lr_at(step, tc)
        for group in optimizers["model"].param_groups:
            group["lr"] = lr
        use_disc = disc is not None and run.decoder.disc_start >= 0 and step >= run.decoder.disc_start
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = _next_batch(batches, bar)
            data_state.consume(batch)
            batch = to_device(batch, device)
            last = micro == accum - 1
            if disc is not None:
                disc.requires_grad_(False)  # the generator's loss must not train the discriminator
            with engine.no_sync(net, not last), engine.autocast(device, amp):
                outputs = net(batch, disc) if use_disc else net(batch)
            (outputs["loss"] / accum).backward()
            if use_disc:
                disc.requires_grad_(True)
                with engine.no_sync(disc_net, not last), engine.autocast(device, amp):
                    fake = outputs["recon"]  # [(b t), 3, H, W], detached
                    real = rearrange(to_model_range(batch["video"]), "b c t h w -> (b t) c h w")
                    logits = disc_net(torch.cat([real.to(fake.dtype), fake]))  # one pass: real, then fake
                    d_loss = decoder.hinge_d_loss(*logits.float().chunk(2))
                (d_loss / accum).backward()
                outputs["d_loss"] = d_loss.detach()
            for k, v in outputs.items():
                if torch.is_tensor(v) and v.ndim == 0:
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(list(ema_params.values()), tc.grad_clip or math.inf)
        # The same norm on every rank (the gradients are reduced): all skip together. A NaN update would
        # make every weight NaN, and the checkpoints written after it would push the good ones out.
        finite = math.isfinite(float(grad_norm))
        if finite:
            optimizers["model"].step()
            if use_disc:
                optimizers["discriminator"].step()
            if ema is not None:
                ema.update(ema_params)
            nonfinite_run = 0
        else:
            nonfinite_run, nonfinite_steps = nonfinite_run + 1, nonfinite_steps + 1
        optimizers["model"].zero_grad(set_to_none=True)
        if use_disc:
            optimizers["discriminator"].zero_grad(set_to_none=True)
        step += 1
        if not finite:
            if d.main:
                log.warning("step %d: gradient norm %s: the update is skipped", step, float(grad_norm))
            if nonfinite_run >= tc.max_nonfinite_steps:
                if bar is not None:
                    bar.close()
                if d.main:
                    print(
                        f"inbetweener train: error: the gradient has not been finite for {nonfinite_run} steps"
                        f" in a row (to step {step}; the weights were left as they were): the run stops."
                        f" Lower train.lr, or check the data; --resume continues from"
                        f" {run_checkpoints.latest_checkpoint(out) or 'the start (no checkpoint yet)'}",
                        file=sys.stderr,
                    )
                raise SystemExit(1)

        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            skipped = data_state.skipped()
            values = {
                **{f"train/{k}": v for k, v in sums.items()},
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "train/skipped_updates": float(nonfinite_steps),
                "train/samples_per_s": tc.global_batch * (step - step_last) / max(now - t_last, 1e-9),
                **{f"data/{k}": v for k, v in skipped.items()},
            }
            values = _reduce_over_ranks(values, d, device)
            values["data/bad_shards"] = _distinct_bad_shards(data_state, d)
            logger.scalars(step, values)
            t_last, step_last = now, step
            if bar is not None:
                bar.set_postfix(
                    loss=f"{values['train/loss']:.4f}",
                    lr=f"{lr:.2e}",
                    sps=f"{values['train/samples_per_s']:.2f}",
                )
        if bar is not None:
            bar.update(1)
        if sample_batch is not None and tc.sample_every > 0 and step % tc.sample_every == 0:
            _log_samples(stage, stage.net, ema, ema_params, sample_batch, device, amp, logger, step, tc.seed)
        if stage.evaluate is not None and tc.eval_every > 0 and step % tc.eval_every == 0 and d.main:
            with _ema_applied(ema, ema_params), _eval_mode(stage.net), engine.autocast(device, amp):
                logger.scalars(step, stage.evaluate())
        if (tc.ckpt_every > 0 and step % tc.ckpt_every == 0) or step == tc.steps:
            metadata = {
                "inbetweener.stage": stage_name,
                "inbetweener.step": str(step),
                "inbetweener.run_config": json.dumps(run.for_stage(stage_name)),
            }

            def export(folder: Path, metadata: dict[str, str] = metadata) -> None:
                with _ema_applied(ema, ema_params):
                    stage.export(folder, metadata)

            rank_state = {"data": data_state.to_dict(), "rng": engine.capture_rng(device)}
            try:
                run_checkpoints.save_checkpoint(
                    out,
                    step,
                    d,
                    trainable=trainable,
                    optimizers=optimizers,
                    ema=ema,
                    rank_state=rank_state,
                    config=run.for_stage(stage_name),
                    export=export,
                    keep=tc.keep_checkpoints,
                    sharded=fsdp and d.active,
                )
            except run_checkpoints.CheckpointWriteError as exc:
                if bar is not None:
                    bar.close()
                print(f"inbetweener train: error: {exc}", file=sys.stderr)
                raise SystemExit(1) from exc

    if bar is not None:
        bar.close()
    logger.close()
    skipped = _reduce_over_ranks({f"data/{k}": v for k, v in data_state.skipped().items()}, d, device)
    skipped["data/bad_shards"] = _distinct_bad_shards(data_state, d)
    if d.main:  # the skipped samples of every rank
        skipped = {k.removeprefix("data/"): int(v) for k, v in skipped.items()}
        print(f"done: {step} steps; checkpoint {run_checkpoints.latest_checkpoint(out)}; skipped {skipped}")
    engine.barrier(d)
    if d.active:
        torch.distributed.destroy_process_group()
    return 0


def _next_batch(batches: Iterator[dict], bar: Any) -> dict:
    """The next batch; shards that give no training data at all stop the run with one line, exit code 2."""
    try:
        return next(batches)
    except DataError as exc:
        if bar is not None:
            bar.close()  # the error goes on a line of its own
        # a DataLoader worker's error arrives re-raised with its traceback as text: keep the message
        message = str(exc).rstrip().rsplit("DataError: ", 1)[-1]
        print(f"inbetweener train: error: {message}", file=sys.stderr)
        raise SystemExit(2) from exc


def _distinct_bad_shards(data_state: DataState, d: engine.Dist) -> int:
    """Unreadable shards met by any rank, each once (summed per rank, one bad shard counted N times)."""
    names = data_state.bad_shard_names()
    if d.active:
        every: list[Any] = [None] * d.world
        torch.distributed.all_gather_object(every, sorted(names))
        names = set().union(*(set(n) for n in every))
    return len(names)


def _reduce_over_ranks(values: dict[str, float], d: engine.Dist, device: torch.device) -> dict[str, float]:
    """Losses and throughput averaged over ranks, data counts summed (every rank calls this).

    `train/samples_per_s` is the global batch's rate as each rank timed it, so it is averaged, not summed."""
    if not d.active:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    summed = {k for k in keys if k.startswith("data/")}
    out = {k: v if k in summed else v / d.world for k, v in zip(keys, t.tolist())}
    if "train/lr" in values:
        out["train/lr"] = values["train/lr"]
    return out


class _ema_applied:  # noqa: N801 (a context manager used like a function)
    def __init__(self, ema: engine.EMA | None, params: dict[str, torch.nn.Parameter]):
        self.cm = ema.applied(params) if ema is not None else None

    def __enter__(self) -> None:
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


class _eval_mode:  # noqa: N801
    def __init__(self, net: torch.nn.Module):
        self.net = net

    def __enter__(self) -> None:
        self.net.eval()

    def __exit__(self, *exc: Any) -> None:
        self.net.train()


def _log_samples(stage, net, ema, ema_params, batch, device, amp, logger, step: int, seed: int) -> None:
    """Sample videos with the EMA weights, from a generator of their own (the training RNG is untouched)."""
    generator = torch.Generator(device).manual_seed(seed + step)
    with _ema_applied(ema, ema_params), _eval_mode(net), engine.autocast(device, amp), torch.no_grad():
        videos = stage.samples(to_device(batch, device), generator)
    for tag, video in videos.items():
        logger.videos(step, tag, video)


if __name__ == "__main__":
    sys.exit(main())
