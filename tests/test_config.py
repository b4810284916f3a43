"""The config-driven command line: flags generated from the config fields, --config on every
command, strict YAML, presets as package files (issue 15 item 3, issue 16 item 7)."""

import argparse
import os
import re
from importlib import resources

import pytest
import yaml

from cam2seg import cli
from cam2seg.config import (MAX_CONFIG_BYTES, ClassifierConfig, Config, ConfigError, LabelConfig, load_config,
                            load_yaml)

README = os.path.join(os.path.dirname(__file__), "..", "README.md")

# The demo presets as they were written in cam2seg/pipeline/demo.py before they became YAML files:
# the files must hold exactly these values (the demo's behaviour is unchanged), plus the fold health
# check that the small and paper presets turn on (classifier.min_fold_auc; it changes no weights).
_SMALL_UNET = {"encoder": "tu-mobilenetv3_small_100", "decoder_channels": [64, 32, 16, 16, 8]}
OLD_PRESETS = {
    "quick": {
        "synth": {"images": 48, "height": 32, "width": 200, "class_mix": "balanced", "clean_fraction": 0.25},
        "classifier": {"encoder": "mobilenetv3_small_100", "folds": 2, "epochs": 2, "size": [32, 200],
                       "batch_size": 8, "lr_encoder": 3e-3, "swa_epochs": 1, "load_threads": 2},
        "label": {"batch_size": 16},
        "segmenter": {**_SMALL_UNET, "epochs": 1, "size": [32, 200], "batch_size": 8, "lr": 2e-3},
    },
    "small": {
        "synth": {"images": 800, "height": 64, "width": 400, "class_mix": "balanced", "clean_fraction": 0.25},
        "classifier": {"encoder": "mobilenetv3_small_100", "folds": 2, "epochs": 30, "size": [64, 400],
                       "batch_size": 16, "lr_encoder": 3e-3, "load_threads": 2, "min_fold_auc": 0.6},
        "label": {"batch_size": 16},
        "segmenter": {**_SMALL_UNET, "epochs": 6, "size": [64, 400], "batch_size": 8, "lr": 2e-3},
    },
    "paper": {
        "synth": {"images": 4000, "height": 256, "width": 1600, "class_mix": "severstal"},
        "classifier": {"encoder": "efficientnet_b0", "folds": 5, "epochs": 20, "size": [256, 1600], "batch_size": 64,
                       "min_fold_auc": 0.6},
        "label": {},
        "segmenter": {"encoder": "efficientnet-b0", "epochs": 30, "batch_size": 16},
    },
}


@pytest.fixture(autouse=True)
def _fresh_progress_handler():
    """``cli.main`` points the cam2seg progress handler at the sys.stderr of the moment (capsys's
    here); drop it after each test so that the next test's main does not touch a closed capture."""
    import logging

    yield
    root = logging.getLogger("cam2seg")
    for h in list(root.handlers):
        if h.get_name() == "cam2seg-progress":
            root.removeHandler(h)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _help(capsys, monkeypatch, command: str) -> dict[str, str]:
    """``cam2seg COMMAND --help`` in-process: option as shown (``--batch-size N``) -> its help text."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options: dict[str, str] = {}
    last = None
    for line in out[out.index("\noptions:\n") + 10:].splitlines():
        m = re.match(r"^  (-\S.*?)(?: {2,}(.*))?$", line)
        if m:
            last = m.group(1)
            options[last] = m.group(2) or ""
        elif line.strip() and last:
            options[last] = (options[last] + " " + line.strip()).strip()
    return options


def _yaml(tmp_path, text: str, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --- flags generated from the config fields -------------------------------------------------


def test_help_shows_the_config_defaults(capsys, monkeypatch):
    h = _help(capsys, monkeypatch, "train-classifiers")
    assert h["--batch-size N"] == "images per training batch (default: 64)"
    assert h["--size HxW"] == "input HEIGHTxWIDTH (default: 256x1600)"
    assert h["--output-stride {8,16,32}"].endswith("(default: 32)")
    assert h["--data ARCHIVE"] == "archive folder or CSV (labels are enough)"  # hand-written: a path
    h = _help(capsys, monkeypatch, "evaluate")
    assert h["--batch-size N"] == "images per inference batch (default: 8)"
    assert h["--objective {kaggle,paper,positive}"].endswith("(default: kaggle)")
    assert h["--guided, --no-guided"].endswith("(default: True)")
    h = _help(capsys, monkeypatch, "train-segmenter")
    assert h["--batch-size N"] == "images per training batch (default: 16)"
    assert h["--epochs N"] == "epochs per fold (default: 30)"
    assert h["--folds K"] == "K; None: the classifier's folds when the masks name one, else 5"
    h = _help(capsys, monkeypatch, "synth")
    assert h["--images N"] == "number of images (default: 1000)"
    assert h["--clean-fraction F"] == "share of defect-free images (default: 0.45)"
    h = _help(capsys, monkeypatch, "report")
    assert h["--examples N"].startswith("gallery images per class") and h["--examples N"].endswith("(default: 3)")
    h = _help(capsys, monkeypatch, "export-coco")
    assert h["--order {confidence,id}"].endswith("(default: confidence)")
    h = _help(capsys, monkeypatch, "label")
    assert h["--method {gradcam,gradcam++,layercam,guided-gradcam,guided-gradcam++}"] == (
        "the fast engine's CAM method (default: gradcam++)")
    h = _help(capsys, monkeypatch, "nightly")
    assert h["--out STORE"] == "the label store the runs commit to (default: None)"


def test_help_follows_the_field(monkeypatch, capsys):
    # the help is read from the field, not typed next to the flag: change the field, the help follows
    info = ClassifierConfig.model_fields["batch_size"]
    monkeypatch.setattr(info, "default", 99)
    monkeypatch.setattr(info, "description", "a changed description")
    h = _help(capsys, monkeypatch, "train-classifiers")
    assert h["--batch-size N"] == "a changed description (default: 99)"


def test_every_generated_flag_matches_its_field():
    seen = 0
    for command, p in _subparsers().items():
        assert "--config" in p._option_string_actions, f"{command} takes no --config"
        fields = p.get_default("config_fields") or []
        by_dest = {a.dest: a for a in p._actions}
        for section, name in fields:
            info = Config.model_fields[section].annotation.model_fields[name]
            action = by_dest[name]
            assert action.default is None, (command, name)  # a flag not given leaves the file in charge
            assert info.description and info.description.replace("%", "%%") in action.help, (command, name)
            default = info.get_default(call_default_factory=True)
            if default is not None or "None" not in info.description:
                assert f"(default: {cli._default_text(default)})" in action.help, (command, name, action.help)
            seen += 1
    assert seen >= 30
    # the generated flags by command (the report lists them)
    generated = {c: [n for _, n in p.get_default("config_fields") or []] for c, p in _subparsers().items()}
    reading = ["classes", "clean"]  # how the command reads archives (the archive section)
    assert generated["evaluate"] == ["objective", "guided", "batch_size", "min_images", "min_positive_pairs", *reading]
    assert generated["nightly"] == ["model", "images", "store", "retrain_after", "data", "segmenter", "true_masks",
                                    *reading]
    assert generated["import-coco"] == ["unannotated", *reading]
    assert generated["export-coco"] == ["format", "order", "limit"]
    assert generated["report"] == ["examples", *reading] and generated["stats"] == ["limit", *reading]
    for command in ("train-classifiers", "train-segmenter", "label"):
        assert generated[command][-len(reading):] == reading, command
    assert "channels" in generated["train-classifiers"] and "channels" in generated["train-segmenter"]


def test_readme_flags_still_exist():
    text = open(README).read()
    block = text[text.index("## Command line"):]
    block = block[block.index("```") + 3:]
    block = block[: block.index("```")]
    parsers = _subparsers()
    want: dict[str, set] = {}
    command = None
    for line in block.splitlines():
        m = re.match(r"cam2seg ([a-z-]+)", line)
        if m:
            command = m.group(1)
        if command:
            want.setdefault(command, set()).update(re.findall(r"(--[a-z][a-z-]*)", line))
    assert {"synth", "evaluate", "report", "export-coco", "demo"} <= set(want)
    for command, flags in want.items():
        missing = flags - set(parsers[command]._option_string_actions)
        assert not missing, f"cam2seg {command}: README names {missing}"
    assert {"--preset", "--size"} <= set(parsers["demo"]._option_string_actions)
    args = cli.build_parser().parse_args(["evaluate", "--truth", "t", "--segmenter", "a", "--segmenter", "b",
                                          "--no-guided"])
    assert args.segmenter == ["a", "b"] and args.guided is False
    args = cli.build_parser().parse_args(["report", "--out", "r", "--segmenter", "a", "--segmenter", "b"])
    assert args.segmenter == ["a", "b"]
    args = cli.build_parser().parse_args(["nightly", "--out", "s"])
    assert cli.effective_config(args).nightly.store == "s"


def test_cam_methods_declared_once(capsys):
    from cam2seg.cam.engine import CAM_METHODS, DEFAULT_METHOD

    annotation = LabelConfig.model_fields["method"].annotation
    assert tuple(annotation.__args__) == tuple(CAM_METHODS) and LabelConfig().method == DEFAULT_METHOD
    action = _subparsers()["label"]._option_string_actions["--method"]
    assert tuple(action.choices) == tuple(CAM_METHODS)
    with pytest.raises(ConfigError, match="label.method"):
        load_config(overrides={"label": {"method": "scorecam"}})
    with pytest.raises(SystemExit) as e:
        cli.main(["label", "--model", "m", "--images", "i", "--out", "o", "--method", "scorecam"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


# --- --config on every command, flags over the file over the defaults ------------------------


@pytest.fixture
def fake_evaluation(monkeypatch):
    import cam2seg.evaluate.cams as cams
    import cam2seg.evaluate.segmenters as segmenters

    calls = []

    def evaluate_cams(model, truth, *, write, objective, batch_size, guided):
        calls.append(("cams", dict(model=model, write=write, objective=objective, batch_size=batch_size,
                                   guided=guided)))
        return {}, "TABLE 2"

    def evaluate_segmenters(truth, segs, store, *, objective, write, batch_size, classifier, floor, ceiling):
        calls.append(("segmenters", dict(segs=segs, store=store, objective=objective, write=write,
                                         batch_size=batch_size)))
        calls.append(("compose", dict(classifier=classifier, floor=floor, ceiling=ceiling)))
        return {}, "TABLE 3"

    monkeypatch.setattr(cams, "evaluate_cams", evaluate_cams)
    monkeypatch.setattr(segmenters, "evaluate_segmenters", evaluate_segmenters)
    return calls


def test_evaluate_flag_over_file_over_default(tmp_path, fake_evaluation, capsys):
    ev = ["evaluate", "--truth", str(tmp_path / "truth"), "--model", "M", "--segmenter", "S1", "--segmenter", "S2"]
    assert cli.main(ev) == 0
    assert fake_evaluation[0] == ("cams", dict(model="M", write=True, objective="kaggle", batch_size=8, guided=True))
    assert fake_evaluation[1][1] == dict(segs=["S1", "S2"], store=None, objective="kaggle", write=True, batch_size=8)
    # the composed rows gate with the evaluated classifier, under the compose section's bounds
    assert fake_evaluation[2][1] == dict(classifier="M", floor=0.8, ceiling=0.02)
    cfg = _yaml(tmp_path, "evaluate:\n  objective: positive\n  batch_size: 4\n  guided: false\n"
                          "compose:\n  floor: 0.7\n  ceiling: 0.05\n")
    fake_evaluation.clear()
    assert cli.main([*ev, "--config", cfg]) == 0
    assert fake_evaluation[0][1] == dict(model="M", write=True, objective="positive", batch_size=4, guided=False)
    assert fake_evaluation[1][1]["objective"] == "positive" and fake_evaluation[1][1]["batch_size"] == 4
    assert fake_evaluation[2][1] == dict(classifier="M", floor=0.7, ceiling=0.05)
    fake_evaluation.clear()
    assert cli.main([*ev, "--config", cfg, "--objective", "kaggle", "--batch-size", "2", "--guided", "--no-write"]) == 0
    assert fake_evaluation[0][1] == dict(model="M", write=False, objective="kaggle", batch_size=2, guided=True)
    assert fake_evaluation[1][1] == dict(segs=["S1", "S2"], store=None, objective="kaggle", write=False, batch_size=2)
    out = capsys.readouterr().out
    assert "TABLE 2" in out and "TABLE 3" in out
    # the effective config without running anything
    args = cli.build_parser().parse_args([*ev, "--config", cfg, "--batch-size", "16"])
    assert cli.effective_config(args).evaluate.model_dump() == {"objective": "positive", "batch_size": 16,
                                                                 "guided": False, "min_images": 16,
                                                                 "min_positive_pairs": 8}


def test_evaluate_config_is_validated(tmp_path, fake_evaluation, capsys):
    ev = ["evaluate", "--truth", "t", "--model", "M"]
    rc = cli.main([*ev, "--config", _yaml(tmp_path, "evaluate:\n  objective: best\n")])
    assert rc == 2 and "evaluate.objective" in capsys.readouterr().err
    rc = cli.main([*ev, "--batch-size", "0"])
    assert rc == 2 and "evaluate.batch_size" in capsys.readouterr().err
    assert fake_evaluation == []


def test_report_takes_config(tmp_path, monkeypatch, capsys):
    import cam2seg.review.report as report

    calls = []
    monkeypatch.setattr(report, "build_report", lambda out, **kw: calls.append((out, kw)) or "REPORT")
    cfg = _yaml(tmp_path, "report:\n  examples: 0\n")
    assert cli.main(["report", "--out", "R", "--segmenter", "a", "--segmenter", "b", "--config", cfg]) == 0
    assert calls[-1] == ("R", dict(archive=None, store_url=None, model=None, segmenters=["a", "b"], examples=0))
    assert cli.main(["report", "--out", "R", "--config", cfg, "--examples", "5"]) == 0
    assert calls[-1][1]["examples"] == 5
    assert cli.main(["report", "--out", "R"]) == 0
    assert calls[-1][1]["examples"] == 3
    assert "REPORT" in capsys.readouterr().out
    rc = cli.main(["report", "--out", "R", "--config", _yaml(tmp_path, "report:\n  example: 1\n")])
    assert rc == 2 and "report.example" in capsys.readouterr().err


def test_export_coco_takes_config(tmp_path, monkeypatch, capsys):
    import cam2seg.review.coco as coco

    calls = []

    def export_coco(store, out, *, fmt, order, limit):
        calls.append(dict(store=store, out=out, fmt=fmt, order=order, limit=limit))
        return {"images": 2, "annotations": 5, "out": out}

    monkeypatch.setattr(coco, "export_coco", export_coco)
    base = ["export-coco", "--store", "S", "--out", "o.json"]
    assert cli.main(base) == 0
    assert calls[-1] == dict(store="S", out="o.json", fmt="polygon", order="confidence", limit=None)
    cfg = _yaml(tmp_path, "export:\n  format: rle\n  order: id\n  limit: 2\n")
    assert cli.main([*base, "--config", cfg]) == 0
    assert calls[-1] == dict(store="S", out="o.json", fmt="rle", order="id", limit=2)
    assert "5 rle annotations" in capsys.readouterr().out
    assert cli.main([*base, "--config", cfg, "--format", "polygon", "--limit", "7"]) == 0
    assert calls[-1] == dict(store="S", out="o.json", fmt="polygon", order="id", limit=7)
    out = capsys.readouterr().out
    assert "5 polygon annotations" in out and "in image id order" in out
    rc = cli.main([*base, "--config", _yaml(tmp_path, "export:\n  format: png\n")])
    assert rc == 2 and "export.format" in capsys.readouterr().err


def test_stats_takes_config(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli, "_print_stats", lambda url, limit: seen.append((url, limit)))
    assert cli.main(["stats", "A"]) == 0 and seen[-1] == ("A", None)
    cfg = _yaml(tmp_path, "stats:\n  limit: 4\n")
    assert cli.main(["stats", "A", "--config", cfg]) == 0 and seen[-1] == ("A", 4)
    assert cli.main(["stats", "A", "--config", cfg, "--limit", "9"]) == 0 and seen[-1] == ("A", 9)
    rc = cli.main(["stats", "A", "--config", _yaml(tmp_path, "synth:\n  imagez: 3\n")])
    assert rc == 2 and "synth.imagez" in capsys.readouterr().err and len(seen) == 3


# --- strict config ---------------------------------------------------------------------------


def test_duplicate_keys_refused(tmp_path, capsys):
    cfg = _yaml(tmp_path, "synth:\n  images: 3\n  height: 32\n  images: 4\n", "dup.yaml")
    rc = cli.main(["synth", str(tmp_path / "a"), "--config", cfg])
    err = capsys.readouterr().err
    assert rc == 2 and "dup.yaml" in err and "duplicate key 'images'" in err and "line 4" in err, err
    assert not (tmp_path / "a").exists()
    cfg = _yaml(tmp_path, "synth:\n  images: 3\nclassifier: {}\nsynth:\n  images: 4\n", "dup2.yaml")
    with pytest.raises(ConfigError, match=r"dup2.yaml.*duplicate key 'synth'"):
        load_config(cfg)
    # a YAML merge key may be overridden: that is not a duplicate
    assert load_yaml("a: &b {images: 3, height: 32}\nsynth:\n  <<: *b\n  images: 4\n")["synth"] == {
        "images": 4, "height": 32}


def test_bool_and_string_numbers_refused(tmp_path, capsys):
    cfg = _yaml(tmp_path, "classifier:\n  epochs: true\n")
    rc = cli.main(["train-classifiers", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "--config", cfg])
    err = capsys.readouterr().err
    assert rc == 2 and "classifier.epochs" in err and "integer" in err, err
    with pytest.raises(ConfigError, match="synth.images"):
        load_config(_yaml(tmp_path, "synth:\n  images: '12'\n"))
    with pytest.raises(ConfigError, match="evaluate.guided"):
        load_config(_yaml(tmp_path, "evaluate:\n  guided: 1\n"))
    with pytest.raises(ConfigError, match="classifier.lr_head"):
        load_config(_yaml(tmp_path, "classifier:\n  lr_head: fast\n"))


def test_strict_still_takes_what_yaml_and_flags_give(tmp_path):
    # ints where floats are expected, exponent floats without a dot, sizes as strings or lists
    cfg = load_config(_yaml(tmp_path, "synth:\n  clean_fraction: 0\nclassifier:\n  lr_encoder: 1e-4\n"
                                      "  lr_head: 2E-3\n  size: 64x400\n  gpus_per_worker: 1\n"
                                      "segmenter:\n  size: [32, 200]\nlabel:\n  cpus_per_actor: 2\n  lease_ttl: 30\n"))
    assert cfg.synth.clean_fraction == 0.0 and cfg.classifier.lr_encoder == 1e-4 and cfg.classifier.lr_head == 2e-3
    assert cfg.classifier.size == (64, 400) and cfg.segmenter.size == (32, 200)
    assert cfg.classifier.gpus_per_worker == 1.0 and cfg.label.cpus_per_actor == 2.0 and cfg.label.lease_ttl == 30.0
    args = cli.build_parser().parse_args(["train-segmenter", "--data", "d", "--masks", "truth", "--out", "o",
                                          "--size", "64x400", "--epochs", "3"])
    seg = cli.effective_config(args).segmenter
    assert seg.size == (64, 400) and seg.epochs == 3
    # Ray Train hands each fold its section as JSON (lists for tuples)
    c = ClassifierConfig(size=(64, 400), output_stride=16)
    assert ClassifierConfig(**c.model_dump(mode="json")) == c


def test_config_file_size_capped(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\nsynth: {}\n")
    with pytest.raises(ConfigError, match=r"big.yaml: larger than 1024 KiB"):
        load_config(str(big))
    ok = tmp_path / "ok.yaml"
    ok.write_text("# " + "x" * (MAX_CONFIG_BYTES - 100) + "\nsynth: {images: 5}\n")
    assert load_config(str(ok)).synth.images == 5
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"synth:\n  images: \xff\n")
    with pytest.raises(ConfigError, match="bin.yaml: not UTF-8"):
        load_config(str(bad))


# --- presets as package files ------------------------------------------------------------------


def test_presets_are_the_package_yaml_files():
    from cam2seg.pipeline.demo import PRESET_NAMES, PRESETS, load_preset

    assert tuple(PRESETS) == PRESET_NAMES == ("quick", "small", "paper")
    for name in PRESET_NAMES:
        text = resources.files("cam2seg").joinpath("configs", f"{name}.yaml").read_text()
        assert PRESETS[name] == yaml.safe_load(text) == load_preset(name) == OLD_PRESETS[name], name
        load_config(base=PRESETS[name])  # every preset is a valid config
    assert _subparsers()["demo"]._option_string_actions["--preset"].choices == list(PRESET_NAMES)


def test_demo_runs_with_the_preset_files(tmp_path, monkeypatch):
    import cam2seg.config as config_mod
    from cam2seg.pipeline import demo

    seen = []

    class Stop(Exception):
        pass

    def load_config(path=None, overrides=None, base=None):
        seen.append((path, base))
        raise Stop

    monkeypatch.setattr(config_mod, "load_config", load_config)
    for name in ("quick", "paper"):
        with pytest.raises(Stop):
            demo.run_demo(str(tmp_path / "w"), name, "extra.yaml")
        assert seen[-1] == ("extra.yaml", OLD_PRESETS[name])
