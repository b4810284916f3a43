"""The demo's quick preset end to end on a real local Ray cluster, the report it writes (checked
in headless Chromium when it is installed) and the report on partial inputs."""

import contextlib
import io as _io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cam2seg import store
from cam2seg.review import overlay
from cam2seg.archive import Archive
from cam2seg.artifact import load_card
from cam2seg.pipeline.demo import PRESETS, paths
from cam2seg.review.report import build_report, pick_examples

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(demo_run, local_ray):
    """The demo as a command (started in the background: tests/conftest.py), then again in process."""
    work = demo_run["work"]
    card_before = load_card(paths(work)["classifier"]).version if demo_run["returncode"] == 0 else None
    rc2, out2, err2 = run_cli(["demo", "--preset", "quick", "--workdir", work])
    return {"work": work, "rc": demo_run["returncode"], "out": demo_run["stdout"], "err": demo_run["stderr"],
            "rc2": rc2, "out2": out2, "err2": err2, "p": paths(work), "card_before": card_before}


def test_demo_runs_every_stage(demo):
    assert demo["rc"] == 0, demo["err"][-3000:]
    out, err, p = demo["out"], demo["err"], demo["p"]
    for n in range(1, 9):   # stage lines are progress (stderr); tables and summaries results (stdout)
        assert f"== [{n}/8]" in err and f"== [{n}/8]" not in out
    assert "paper's Table 2" in out and "paper's Table 3" in out
    assert re.search(r"== done in [\d.]+ min", out)
    assert "[fold 0] epoch 1/" in err and "[fold 1] epoch 1/" in err
    arch = Archive.open(p["archive"])
    assert len(arch) == PRESETS["quick"]["synth"]["images"]
    card = load_card(p["classifier"])
    assert set(card.metrics["oof_auc"]) == {"1", "2", "3", "4"}
    assert "cam_oof" in card.metrics and card.metrics["cam_oof_sweep"]["objective"] == "kaggle"
    sweep = card.metrics["cam_oof_sweep"]
    assert len(sweep["dice"]) == 4 and all(len(d) == len(sweep["threshold"]) for d in sweep["dice"])
    runs = store.committed_runs(p["store"])
    assert runs[-1].complete and runs[-1].model_version == card.version
    masks = store.read_masks(p["store"], columns=["image_id", "class_id"])
    assert masks.num_rows == len(arch) * 4
    for seg, masks_src in ((p["segmenter"], p["store"]), (p["segmenter_truth"], "truth")):
        sc = load_card(seg)
        assert sc.kind == "segmenter" and sc.training.masks == masks_src
        assert sc.metrics["seg_oof"] and sc.metrics["seg_oof_sweep"]["dice"]
        assert sc.head.decoder_channels == PRESETS["quick"]["segmenter"]["decoder_channels"]


def test_demo_rerun_resumes_without_redoing_work(demo):
    assert demo["rc2"] == 0, demo["err2"][-3000:]
    out = demo["out2"] + demo["err2"]
    assert "archive already present" in out
    assert "already holds this classifier" in out
    assert out.count("already holds this segmenter") == 2
    assert "already evaluated" in out
    assert "labeled now: 0;" in out  # incremental: the same model version labeled everything already
    assert load_card(demo["p"]["classifier"]).version == demo["card_before"]


def test_demo_refuses_a_workdir_of_other_settings(demo, tmp_path):
    work = tmp_path / "other"
    shutil.copytree(demo["p"]["archive"], work / "archive")
    meta = json.loads((work / "archive" / "synth.json").read_text())
    meta["images"] += 1
    (work / "archive" / "synth.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(["demo", "--preset", "quick", "--workdir", str(work)])
    assert rc == 2 and "cam2seg demo: error:" in err and "holds an archive made with" in err and "--workdir" in err
    assert not (work / "classifier").exists()


def _report_images(html_path: Path) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]+)"', html_path.read_text())


def test_report_html_and_pictures(demo):
    html = Path(demo["p"]["report"]) / "index.html"
    text = html.read_text()
    for heading in ("ROC-AUC per class", "Dice ablation", "Table 3", "Threshold sweep", "Score distributions",
                    "Gallery"):
        assert heading in text
    srcs = _report_images(html)
    assert len(srcs) >= 5
    for src in srcs:
        assert not src.startswith(("/", "http")) and ".." not in src  # relative, inside the report folder
        with Image.open(html.parent / src) as im:
            im.verify()
    # gallery rows carry every panel kind for at least one example
    for panel in ("true mask", "heatmap", "pseudo-mask in the store", "segmenter segmenter,",
                  "segmenter segmenter-truth,"):
        assert panel in text, panel
    # the demo's COCO file loads in pycocotools, lowest confidence first
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(_io.StringIO()):
        coco = COCO(demo["p"]["coco"])
    imgs = sorted(coco.dataset["images"], key=lambda i: i["id"])
    assert len(imgs) == PRESETS["quick"]["synth"]["images"]
    conf = [i["cam2seg_confidence"] for i in imgs]
    assert conf == sorted(conf)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const el = document.createElement("pre");
  el.id = "imgcheck";
  el.textContent = "loaded " + (imgs.length - bad.length) + " of " + imgs.length + (bad.length ? " broken: " + bad.join(",") : "");
  document.body.appendChild(el);
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium); "
                                              ".ci/run installs it")
def test_report_renders_in_headless_chromium(demo, tmp_path):
    html = Path(demo["p"]["report"]) / "index.html"
    probe = html.parent / "_chromium_check.html"
    probe.write_text(html.read_text().replace("</body>", _CHECK))
    try:
        res = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
             probe.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    m = re.search(r'<pre id="imgcheck">([^<]*)</pre>', res.stdout)
    assert m, f"no result from Chromium (rc {res.returncode}): {res.stderr[-1500:]}"
    n = len(_report_images(html))
    assert m.group(1) == f"loaded {n} of {n}", m.group(1)


def _html_rows(text: str, section_id: str) -> list[list[str]]:
    """The data cells of each row of the first table after ``<h2 id=section_id>``."""
    start = text.index(f'<h2 id="{section_id}">')
    table = text[start:text.index("</table>", start)]
    rows = [re.findall(r"<td>(.*?)</td>", tr, re.S) for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)]
    return [r for r in rows if r]


def test_report_numbers_are_the_cards_numbers(demo):
    """One ROC-AUC and one Table 3 value in the HTML equal what the model cards hold."""
    import html as html_mod

    text = (Path(demo["p"]["report"]) / "index.html").read_text()
    card = load_card(demo["p"]["classifier"])
    auc_row = _html_rows(text, "auc")[0]
    assert html_mod.unescape(auc_row[0]).endswith(f"out of fold ({card.folds} folds)")
    for c, cell in zip(card.class_ids, auc_row[1:5]):
        assert float(cell) == pytest.approx(card.metrics["oof_auc"][str(c)], abs=5e-4), (c, cell)
    assert float(auc_row[5]) == pytest.approx(card.metrics["oof_auc_mean"], abs=5e-4)

    seg = load_card(demo["p"]["segmenter"])
    by_label = {html_mod.unescape(r[0]): r for r in _html_rows(text, "table3")}
    row_id, want = next(iter(seg.metrics["seg_oof"].items()))
    got = by_label[want["label"]]  # the card's row, under the card's label
    # positive pairs, Kaggle over all images, Kaggle over defective images, absent pairs masked
    assert float(got[1]) == pytest.approx(want["positive_mean"], abs=5e-4), row_id
    assert float(got[2]) == pytest.approx(want["kaggle_all_mean"], abs=5e-4), row_id
    assert float(got[3]) == pytest.approx(want["kaggle_mean"], abs=5e-4), row_id
    assert got[4] == f"{100 * want['absent_masked']:.1f}%", (got, want)
    # per class: Kaggle, positive for class 1 (a dash where the card holds no finite value)
    k1, p1 = want["kaggle"][0], want["positive"][0]
    assert got[5] == f"{k1:.3f}", (got, want)
    assert got[6] == ("–" if p1 is None or p1 != p1 else f"{p1:.3f}"), (got, want)


def test_report_without_true_masks_shows_scores_and_pictures_only(demo, tmp_path):
    p = demo["p"]
    out = tmp_path / "rep"
    # labels.csv alone: image-level labels, no masks
    s = build_report(str(out), archive=str(Path(p["archive"]) / "labels.csv"), store_url=p["store"], examples=2)
    text = (out / "index.html").read_text()
    assert "Table 3" not in text and "true mask (" not in text
    assert "no true masks given" in text and "class score" in text
    assert "gallery" in s.sections and "score distributions" in s.sections
    for src in _report_images(out / "index.html"):
        assert (out / src).is_file()


def test_report_from_store_alone_finds_images_and_model(demo, tmp_path):
    out = tmp_path / "rep"
    s = build_report(str(out), store_url=demo["p"]["store"])
    assert {"ROC-AUC", "gallery"} <= set(s.sections)
    text = (out / "index.html").read_text()
    assert "heatmap" in text and "Table 3" not in text


def test_report_cli_errors(tmp_path):
    rc, _, err = run_cli(["report", "--out", str(tmp_path / "r")])
    assert rc == 2 and "give at least one of --store, --model, --segmenter" in err
    rc, _, err = run_cli(["report", "--out", str(tmp_path / "r"), "--store", str(tmp_path / "nothing")])
    assert rc == 2 and "holds no committed labeling run" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "index.html").exists()


def test_pick_examples():
    v = np.array([0.2, 0.9, 0.5, 0.1, 0.7])
    assert pick_examples(v, 3) == [(1, "best"), (2, "typical"), (3, "worst")]
    assert pick_examples(v[:1], 3) == [(0, "best")]
    assert pick_examples(np.zeros(0), 3) == []
    assert [i for i, _ in pick_examples(v, 5)] == [1, 4, 2, 0, 3]


def test_overlays_keep_size_and_mark_the_mask():
    img = np.full((20, 60), 100, np.uint8)
    mask = np.zeros((20, 60), bool)
    mask[5:10, 10:30] = True
    out = overlay.mask_overlay(img, mask, (255, 0, 0))
    assert out.shape == (20, 60, 3) and out.dtype == np.uint8
    assert (out[~mask] == 100).all()  # outside the mask (and its outline, drawn inside it) untouched
    assert (out[mask][:, 0] > out[mask][:, 1]).all()
    cam = np.linspace(0, 1, 60)[None, :].repeat(20, 0)
    heat = overlay.heatmap_overlay(img, cam)
    assert heat.shape == (20, 60, 3)
    assert heat[:, -1, 0].mean() > heat[:, 0, 0].mean()  # hot end is red
    assert overlay.stack_panels([out, heat]).shape == (44, 60, 3)
    with pytest.raises(ValueError, match="does not match"):
        overlay.mask_overlay(img, mask[:10])


def test_review_round_trip_from_the_command_line(demo, tmp_path):
    """The corrections loop on the demo's quick run: export the least sure images for review, a
    reviewer draws their true masks (here: the archive's) in the COCO file, import-coco brings
    them back, a segmenter trains on them mixed with the pseudo-masks, and evaluate tunes on the
    reviewed images only (too few to write anything at the default minimum)."""
    import yaml

    from cam2seg.review import coco

    p = demo["p"]
    arch = Archive.open(p["archive"])
    exported = tmp_path / "review.json"
    rc, _, err = run_cli(["export-coco", "--store", p["store"], "--out", str(exported), "--limit", "12", "--format", "rle"])
    assert rc == 0, err
    doc = json.loads(exported.read_text())
    reviewed = [im["file_name"] for im in doc["images"]]
    anns = []
    for im in doc["images"]:  # the reviewer's corrections: the true masks of each exported image
        truth = arch.masks(im["file_name"], (im["height"], im["width"]))
        for k, c in enumerate(arch.class_ids):
            if truth[k].any():
                anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c,
                             **coco.mask_annotation(truth[k], "polygon")})
    doc["annotations"], doc["info"]["cam2seg_reviewed"] = anns, "all"
    exported.write_text(json.dumps(doc))
    masks = tmp_path / "reviewed.csv"
    rc, out, err = run_cli(["import-coco", str(exported), "--archive", p["archive"], "--out", str(masks)])
    assert rc == 0, err
    assert f"true masks of {len(reviewed)} reviewed image(s)" in out

    cfg = tmp_path / "seg.yaml"
    cfg.write_text(yaml.safe_dump({"segmenter": PRESETS["quick"]["segmenter"]}))
    seg = tmp_path / "seg-mixed"
    rc, out, err = run_cli(["train-segmenter", "--data", p["archive"], "--masks", p["store"], "--true-masks", str(masks),
                            "--true-mask-weight", "2", "--out", str(seg), "--config", str(cfg)])
    assert rc == 0, err[-3000:]
    assert f"and the true masks of {len(reviewed)} image(s)" in out
    sup = load_card(str(seg)).training.supervision
    assert sup["true_mask_images"] == len(reviewed) and sup["pseudo_mask_images"] == len(arch) - len(reviewed)
    assert sup["true_mask_weight"] == 2 and sup["true_masks"] == str(masks)

    rc, out, err = run_cli(["evaluate", "--truth", str(masks), "--archive", p["archive"], "--segmenter", str(seg)])
    assert rc == 0, err[-3000:]
    assert f"tuning rests on the {len(reviewed)} image(s) of {masks}" in out and "keep their defaults" in out
    assert "wrote out-of-fold Dice" not in out and "seg_oof" not in load_card(str(seg)).metrics
    n_def = sum(1 for i in reviewed if arch.labels[arch.index(i)].any())
    assert f"{n_def} defective images" in out
    rc, out, err = run_cli(["evaluate", "--truth", str(masks), "--archive", p["archive"], "--segmenter", str(seg),
                            "--min-images", "4", "--min-positive-pairs", "1"])
    assert rc == 0 and "wrote out-of-fold Dice" in out and load_card(str(seg)).postprocess.tuned
