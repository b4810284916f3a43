"""The console script, run as a user runs it."""

import os
import subprocess
import sys

import pytest

from cam2seg.config import ConfigError, load_config

CAM2SEG = os.path.join(os.path.dirname(sys.executable), "cam2seg")


def run(*args, cwd=None):
    return subprocess.run([CAM2SEG, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def run_all(*argvs) -> list[subprocess.CompletedProcess]:
    """Several independent commands at once (each one's start-up is mostly imports)."""
    procs = [subprocess.Popen([CAM2SEG, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_synth_writes_archive_and_stats(tmp_path):
    out = tmp_path / "arch"
    r = run("synth", str(out), "--images", "30", "--height", "64", "--width", "400", "--seed", "2", "--stats")
    assert r.returncode == 0, r.stderr
    assert "wrote 30 images (64x400)" in r.stdout and "images/s" in r.stdout
    assert "real Severstal" in r.stdout
    assert (out / "train.csv").exists() and (out / "labels.csv").exists()
    assert len(os.listdir(out / "train_images")) == 30
    r = run("stats", str(out), "--limit", "5")
    assert r.returncode == 0 and "comp_height" in r.stdout


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("synth:\n  images: 12\n  height: 32\n  width: 128\n")
    out = tmp_path / "a"
    r = run("synth", str(out), "--config", str(cfg), "--images", "5")
    assert r.returncode == 0, r.stderr
    assert "wrote 5 images (32x128)" in r.stdout


def test_script_help_and_strict_config(tmp_path):
    # the console script: generated flags show the config's defaults; a duplicate key is one line, exit 2
    dup, export = tmp_path / "c.yaml", tmp_path / "e.yaml"
    dup.write_text("classifier:\n  epochs: 3\n  epochs: 4\n")
    export.write_text("export:\n  format: rle\n")
    ev, tc, bad, ex = run_all(
        ("evaluate", "--help"), ("train-classifiers", "--help"),
        ("train-classifiers", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "--config", str(dup)),
        ("export-coco", "--store", str(tmp_path / "no-store"), "--out", str(tmp_path / "o.json"), "--config",
         str(export)))
    assert ev.returncode == 0 and "(default: 8)" in ev.stdout and "--no-guided" in ev.stdout
    assert tc.returncode == 0 and "(default: 64)" in tc.stdout and "(default: 256x1600)" in tc.stdout
    assert bad.returncode == 2 and "duplicate key 'epochs'" in bad.stderr and str(dup) in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert ex.returncode == 2 and "unrecognized arguments" not in ex.stderr and "Traceback" not in ex.stderr, ex.stderr


def call(capsys, *args) -> tuple[int, str]:
    """In-process (the console script is ``main``; one subprocess check below covers the script)."""
    from cam2seg.cli import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("synth:\n  imagez: 12\n")
    r = run("synth", str(tmp_path / "a"), "--config", str(cfg))
    assert r.returncode == 2 and "synth.imagez" in r.stderr and "Traceback" not in r.stderr
    rc, err = call(capsys, "synth", str(tmp_path / "a"), "--images", "0")
    assert rc == 2 and "images" in err
    rc, err = call(capsys, "synth", str(tmp_path / "a"), "--height", "8")
    assert rc == 2 and "height" in err
    rc, err = call(capsys, "stats", str(tmp_path / "missing"))
    assert rc == 2 and "no train.csv or labels.csv" in err
    rc, err = call(capsys, "synth", str(tmp_path / "a"), "--config", str(tmp_path / "nope.yaml"))
    assert rc == 2 and "config file not found" in err
    cfg.write_text("synth:\n  images: true\n")
    rc, err = call(capsys, "synth", str(tmp_path / "a"), "--config", str(cfg))
    assert rc == 2 and "synth.images" in err and not (tmp_path / "a").exists()


def test_label_errors_before_any_work(tmp_path, random_artifact, capsys):
    (tmp_path / "images").mkdir()
    label = ("label", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "store"))
    rc, err = call(capsys, *label, "--model", str(tmp_path / "no-model"))
    assert rc == 2 and "no model artifact" in err
    random_artifact(str(tmp_path / "model"))
    rc, err = call(capsys, *label, "--model", str(tmp_path / "model"))
    assert rc == 2 and "no images under" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("label:\n  image_size: big\n")
    rc, err = call(capsys, *label, "--model", str(tmp_path / "model"), "--config", str(cfg))
    assert rc == 2 and "label.image_size" in err


def test_segmenter_and_evaluate_errors_before_any_work(tmp_path, small_archive, capsys):
    def err(*args):
        return call(capsys, *args)

    seg = ("train-segmenter", "--data", str(small_archive), "--out", str(tmp_path / "seg"))
    rc, e = err(*seg, "--masks", str(tmp_path / "no-store"))
    assert rc == 2 and "no committed labeling run" in e and "Traceback" not in e
    rc, e = err(*seg, "--masks", "truth", "--encoder", "no-such-encoder")
    assert rc == 2 and "no-such-encoder" in e
    rc, e = err("train-segmenter", "--data", str(small_archive / "labels.csv"), "--out", str(tmp_path / "seg"),
                "--masks", "truth")
    assert rc == 2 and "has no masks" in e
    cfg = tmp_path / "c.yaml"
    cfg.write_text("segmenter:\n  present_empty: maybe\n")
    rc, e = err(*seg, "--masks", "truth", "--config", str(cfg))
    assert rc == 2 and "segmenter.present_empty" in e
    rc, e = err("evaluate", "--truth", str(small_archive))
    assert rc == 2 and "give --model" in e
    assert not (tmp_path / "seg").exists()


def test_load_config_precedence_and_validation(tmp_path):
    assert load_config().synth.images == 1000
    p = tmp_path / "c.yaml"
    p.write_text("synth:\n  seed: 7\n")
    cfg = load_config(str(p), {"synth": {"seed": None, "images": 3}})
    assert cfg.synth.seed == 7 and cfg.synth.images == 3
    p.write_text("unknown_section: {}\n")
    with pytest.raises(ConfigError, match="unknown_section"):
        load_config(str(p))
    p.write_text("synth:\n  images: many\n")
    with pytest.raises(ConfigError, match="synth.images"):
        load_config(str(p))
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(p))


def test_demo_preset_file_and_unknown_preset(tmp_path):
    # a preset is the base, the config file overrides it key by key, unknown keys are still refused
    from cam2seg.pipeline.demo import PRESETS

    p = tmp_path / "c.yaml"
    p.write_text("classifier:\n  epochs: 3\n")
    cfg = load_config(str(p), base=PRESETS["small"])
    assert cfg.classifier.epochs == 3 and cfg.classifier.encoder == PRESETS["small"]["classifier"]["encoder"]
    assert cfg.segmenter.decoder_channels == PRESETS["small"]["segmenter"]["decoder_channels"]
    p.write_text("classifier:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="epoch"):
        load_config(str(p), base=PRESETS["small"])
    r = run("demo", "--workdir", str(tmp_path / "w"), "--preset", "huge")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert not (tmp_path / "w").exists()

