"""Configuration: YAML and --set override dataclass fields; bad keys and values fail early."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, CurateConfig, load_config, parse_set


def test_set_overrides_fields_with_types():
    config = load_config(sets=["motion.min=0.3", "write.fps=12", "shots.detector=content", "motion.max=null"])
    assert config.motion.min == 0.3
    assert config.write.fps == 12.0
    assert config.shots.detector == "content"
    assert config.motion.max is None


def test_yaml_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shots:\n  min_len_s: 0.5\n  max_len_s: 4\nwrite:\n  shard_bytes: 1000\n")
    config = load_config(path, ["shots.max_len_s=5"])
    assert (config.shots.min_len_s, config.shots.max_len_s, config.write.shard_bytes) == (0.5, 5.0, 1000)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["motion.mni=0.3"], r"motion.mni; did you mean motion.min\?"),
        (["moton.min=0.3"], r"'moton'; did you mean motion\?"),
        (["motion.flow=0.3"], r"motion.flow \(known"),  # nothing close enough: no guess
        (["motion.min=fast"], r"'motion.min': 'fast' is not a valid float$"),
        (["write.width=511"], "write.width"),
        (["shots.max_len_s=0.1"], "shots.max_len_s"),
        (["motionmin"], "stage.key=value"),
        (["write.crf=99"], "write.crf must be in 0..51 for libx264, got 99"),  # x264 clamped it, silently
        (["write.preset=quick"], "write.preset must be one of ultrafast, "),
        (["text.frames=0"], "text.frames must be a comma list of first, mid, last, got '0'"),
        (["caption.frames=mid,end"], "caption.frames must be a comma list"),
        (["motion.min=0.5", "motion.max=0.2"], "motion.max must be > motion.min"),
        (["probe.max_width=0"], "probe.max_width and probe.max_height must be >= 1"),  # was: all error rows
        (["aesthetic.batch_size=0"], "aesthetic.batch_size must be >= 1"),
        (["probe.min_width=8000"], "probe.min_width and probe.min_height must be >= 1 and at most"),
        (["motion.min=inf"], r"'motion.min': inf is not a finite number"),  # was saved, Infinity in JSON
        (["text.max=nan"], r"'text.max': nan is not a finite number"),  # NaN passes every comparison
        (["motion.min=-1"], r"motion.min must be >= 0 \(0 keeps still shots too\)$"),  # said "or null"
        (["text.max=-0.1"], r"text.max must be >= 0 .*, got -0.1$"),  # rejected every clip, exit 0
        (["alignment.min=1.5"], r"alignment.min must be in \[-1, 1\] .*, got 1.5$"),  # the same
    ],
)
def test_bad_keys_and_values_name_the_key(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sets=sets)


def test_a_saved_value_now_refused_is_corrected_by_select_and_shown_by_report(tmp_path, capsys):
    """A manifest written while text.max=-0.1 passed: select refused it even with `--set text.max=0.02`
    (the saved config was checked before the --set items were applied), and report would not draw it."""
    from manifests.io import write_manifest
    from manifests.schema import CLIP_SCHEMA
    from pipeline.cli import report_main, select_main

    saved = CurateConfig().to_dict()
    saved["text"]["max"] = -0.1
    out = tmp_path / "out"
    write_manifest(CLIP_SCHEMA.empty_table(), out / "manifest.parquet", saved)
    assert select_main([str(out), "--quiet"]) == 2
    assert "text.max must be >= 0" in capsys.readouterr().err
    assert report_main([str(out)]) == 0
    assert select_main([str(out), "--set", "text.max=0.02", "--quiet"]) == 0


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    path.write_text("motion:\n  min: [0.3\n")  # a typo: what and where on one line
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value) and "at line 3, column 1" in str(err.value)


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """PyYAML keeps the later of two equal keys without a word: `min` set twice under `motion` ran with
    whichever came last. A YAML merge (`<<: *base`) overridden by a key is not a duplicate."""
    path = tmp_path / "twice.yaml"
    path.write_text("motion:\n  min: 0.1\n  max_pairs: 3\n  min: 0.9\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: .*found duplicate key 'min' at line 4, column 3"):
        load_config(path)
    path.write_text("motion:\n  ? [1, 2]\n  : 3\n")  # a list as a key: a config error, not a TypeError
    with pytest.raises(ConfigError, match="twice.yaml: .*found unhashable key"):
        load_config(path)
    path.write_text("motion:\n  <<: {min: 0.1, max_pairs: 4}\n  min: 0.2\n")
    assert (load_config(path).motion.min, load_config(path).motion.max_pairs) == (0.2, 4)


def test_parse_set_reads_yaml_scalars():
    assert parse_set(["motion.min = 0.1"]) == {"motion": {"min": 0.1}}  # a quoted item with spaces
    assert parse_set(["run.fail_on_error=true", "motion.min=1e-2"]) == {
        "run": {"fail_on_error": True},
        "motion": {"min": 0.01},
    }
