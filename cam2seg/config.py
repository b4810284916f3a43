"""One typed configuration tree, loaded from YAML; unknown keys are rejected.

Precedence: command-line flags override the file, the file overrides these defaults (the
paper's, sized down only where the section says so). Each stage reads its own section.

Strict: a duplicate key in a YAML mapping is refused (naming the file and the key), values are
not coerced (``epochs: true`` or ``epochs: "3"`` is refused; an int where a float is expected is
fine) and a config file is at most ``MAX_CONFIG_BYTES``. The field descriptions are the
command line's help texts (cam2seg/cli.py generates the flags from these fields).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import io
from .cam.engine import CAM_METHODS, DEFAULT_METHOD  # the one list of CAM method names (imports torch)
from .refine import Refine

__all__ = ["ConfigError", "SynthConfig", "ArchiveConfig", "StatsConfig", "ClassifierConfig", "LabelConfig", "SegmenterConfig",
           "NightlyConfig", "EvaluateConfig", "ReportConfig", "ExportConfig", "Config", "load_config", "load_yaml",
           "parse_size", "MAX_CONFIG_BYTES"]

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a config is a page of settings, not data


class ConfigError(ValueError):
    """An unreadable or invalid config file; the message names the file and the keys."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and reads YAML 1.2 floats such as ``1e-4``
    (YAML 1.1, PyYAML's default, reads them as strings, which strict fields would then refuse)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # <<: keys merged in may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# Exponent floats without a dot or without a sign (1e-4, 1.0e3): YAML 1.2 floats, YAML 1.1 strings.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str | bytes, source: str = "config") -> Any:
    """Parse YAML with the strict loader; ``ConfigError`` names ``source``, the line and the problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}:{where} not valid YAML: {problem}") from None


class _Section(BaseModel):
    # strict: no coercion of YAML values (true is not 1, "3" is not 3); ints are still floats
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class SynthConfig(_Section):
    """``cam2seg synth``: the synthetic Severstal-like archive."""

    images: int = Field(1000, ge=1, description="number of images")
    height: int = Field(256, ge=32, description="image height in pixels")
    width: int = Field(1600, ge=64, description="image width in pixels")
    seed: int = Field(0, description="random seed; the same seed gives the same bytes")
    clean_fraction: float = Field(0.45, ge=0.0, lt=1.0, description="share of defect-free images")
    workers: int = Field(1, ge=1, description="processes generating images in parallel")
    class_mix: Literal["severstal", "balanced"] = Field(
        "severstal", description="Severstal's class combinations, or one uniform class per defective image")
    classes: int = Field(4, ge=1, le=16, description="number of defect classes (4: Severstal's; other counts "
                         "reuse the four defect families with their own looks)")
    class_names: str | None = Field(None, description="comma-separated class names for the labels header "
                                    "(None: 1..4 for the default archive, else names of the defect families)")
    color: bool = Field(False, description="RGB images whose defect classes also differ in hue (False: grey)")
    color_only: bool = Field(False, description="every class has the same shape and brightness and differs only "
                             "in hue (implies --color; the bench that shows what colour earns)")


class ArchiveConfig(_Section):
    """How every command reads an archive (README.md, "Archive layouts"); the files decide by default."""

    classes: str | None = Field(None, description="comma-separated class names, in class id order (None: the "
                                "archive's own: labels.csv's header, else ClassIds 1..max or the sorted names, else "
                                "the class folders)")
    clean: str = Field("good", description="folder of the clean images in the folder-per-class layout")

    @property
    def class_list(self) -> list[str] | None:
        return None if self.classes is None else [c.strip() for c in self.classes.split(",")]


class StatsConfig(_Section):
    """``cam2seg stats``: mask geometry of an archive with true masks."""

    limit: int | None = Field(None, ge=1, description="measure only the first N defective images (None: all)")


class _FoldTraining(_Section):
    """Settings every fold training shares: the plateau schedule and how the folds run."""

    plateau_epochs: int = Field(3, ge=1, description="halve the learning rate after this many epochs without improvement")
    lr_factor: float = Field(0.5, gt=0, lt=1)
    seed: int = Field(0, description="fold split and initialisation seed")
    workers_per_fold: int = Field(1, ge=1, description="DDP workers per fold")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0, description="None: 1 if the cluster has GPUs, else 0")
    mixed_precision: bool = Field(True, description="bf16/fp16 autocast on GPU")
    max_failures: int = Field(3, ge=0, description="worker failures a fold survives (resuming from its last epoch)")
    load_threads: int = Field(8, ge=1)
    keep_checkpoints: bool = Field(False, description="keep the per-epoch Ray Train checkpoints after success")
    ingest: Literal["auto", "memory", "stream"] = Field(
        "auto", description="how a fold's images reach its workers: decoded once into each worker's memory, or "
        "streamed by Ray Data (a few batches held at a time); auto streams above max_memory_gb")
    max_memory_gb: float = Field(8.0, gt=0, description="auto streams when one worker would hold more than this "
                                 "many GiB of decoded training images and targets")
    decoders: int = Field(1, ge=1, description="Ray Data decode tasks at a time per fold and dataset when streaming")
    decode_cpus: float = Field(0.25, gt=0, description="CPUs each Ray Data read and decode task reserves "
                               "when streaming, beside the training workers' CPUs")
    stream_ahead_rows: int = Field(512, ge=1, description="decoded rows each streamed dataset may hold in Ray's "
                                   "object store ahead of training (its Ray Data object-store budget)")
    shuffle_rows: int = Field(256, ge=0, description="rows in each worker's shuffle buffer when streaming "
                              "(0: block order only)")
    channels: Literal["auto", "1", "3"] = Field(
        "auto", description="image channels the model reads: 1 (grey), 3 (RGB), or auto (3 when a sample of the "
        "archive's images has colour, else 1)")

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # YAML's channels: 3

    @field_validator("size", mode="before", check_fields=False)  # each subclass declares its size
    @classmethod
    def _parse_size(cls, v):
        if isinstance(v, str):
            return parse_size(v)
        return tuple(v) if isinstance(v, list) else v  # YAML and JSON (Ray Train's configs) give lists


class ClassifierConfig(_FoldTraining):
    """``cam2seg train-classifiers``: stage 1, the paper's recipe by default."""

    encoder: str = Field("efficientnet_b0", description="any timm model name")
    pretrained: bool | str = Field(False, description="false, true (hub download) or a safetensors URL")
    folds: int = Field(5, ge=2, description="K, the number of folds (one classifier each)")
    epochs: int = Field(20, ge=1, description="epochs per fold")
    batch_size: int = Field(64, ge=1, description="images per training batch")
    lr_encoder: float = Field(1e-4, gt=0)
    lr_head: float = Field(1e-3, gt=0)
    size: tuple[int, int] = Field((256, 1600), description="input HEIGHTxWIDTH")
    output_stride: Literal[8, 16, 32] = Field(32, description="encoder stride; 16 or 8 dilate the last stages "
                                              "for finer CAMs (EfficientNet, MobileNetV2, ResNet)")
    pool: Literal["avg", "max", "avgmax"] = Field("avg", description="global pooling before the head (timm's "
                                                   "global_pool): the paper's avg, or max / avgmax for small defects")
    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.3, ge=0, lt=1)
    augment: list[str | dict[str, Any]] = Field(default_factory=lambda: ["hflip"])
    swa_epochs: int = Field(3, ge=1, description="average the weights of this many best epochs")
    swa_update_bn: bool = Field(True, description="recompute BatchNorm statistics for the averaged weights "
                                "(lowered validation loss by 0.055-0.07 in a measured run; see README)")
    min_fold_auc: float = Field(0.0, ge=0, le=1, description="fold health check: a fold whose validation ROC-AUC "
                                "for a class is below this did not learn it, and the run fails saying so instead "
                                "of writing a model whose ensemble drags that class toward chance (0: off; the "
                                "small and paper presets use 0.6; a fold under 0.75 is always warned about)")


class LabelConfig(_Section):
    """``cam2seg label``: stage 2 at scale, the Ray Data labeling job."""

    method: Literal[CAM_METHODS] = Field(DEFAULT_METHOD, description="the fast engine's CAM method")
    aug_smooth: bool = True
    refine: Refine | None = Field(None, description="refinement of the maps on the image before the threshold; "
                                  "None: what the model card says (its tuned or default setting)")
    actors: int | None = Field(None, ge=1, description="CAM actors; None: one per GPU, or 1 without GPUs")
    gpus_per_actor: float | None = Field(None, ge=0, description="None: 1 if the cluster has GPUs, else 0")
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1, description="images per CAM batch on an actor")
    read_batch: int = Field(64, ge=1, description="images per read/decode task")
    read_cpus: float = Field(0.25, gt=0, description="CPUs a read or write task reserves (mostly I/O)")
    read_threads: int = Field(8, ge=1, description="concurrent downloads within a read task")
    images_per_file: int = Field(2000, ge=1, description="images per Parquet part")
    commit_every: int = Field(10000, ge=1, description="commit the run's parts after this many more images")
    image_size: str = Field("auto", description="expected HEIGHTxWIDTH of every image, 'any', or 'auto' "
                            "(the size the model's training archive had; any size when its images differed)")
    max_pixels: int = Field(64 * 1024 * 1024, ge=1, description="images whose header declares more pixels than "
                            "this are error rows, never decoded (decompression bombs)")
    lease_ttl: float = Field(600.0, gt=0, description="seconds without heartbeat before a run's lease expires")

    @field_validator("image_size")
    @classmethod
    def _size(cls, v):
        if v not in ("auto", "any"):
            parse_size(v)
        return v


class SegmenterConfig(_FoldTraining):
    """``cam2seg train-segmenter``: stage 3, a U-Net on pseudo-masks (or true masks)."""

    architecture: str = Field("Unet", description="segmentation-models-pytorch architecture (Unet, UnetPlusPlus, FPN, ...)")
    encoder: str = Field("efficientnet-b0", description="smp encoder name (tu-<timm name> for any timm model)")
    decoder_channels: list[int] | None = Field(None, description="U-Net decoder widths, deepest first (None: smp's "
                                                "256, 128, 64, 32, 16); narrower trains faster")
    encoder_weights: str | None = Field(None, description="None (random init) or a safetensors URL of encoder weights")
    folds: int | None = Field(None, ge=2, description="K; None: the classifier's folds when the masks name one, else 5")
    epochs: int = Field(30, ge=1, description="epochs per fold")
    batch_size: int = Field(16, ge=1, description="images per training batch")
    lr: float = Field(1e-3, gt=0)
    size: tuple[int, int] | None = Field(None, description="input HEIGHTxWIDTH; None: the archive's image size")
    augment: list[str | dict[str, Any]] = Field(default_factory=lambda: ["hflip", "vflip"])
    bce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    # Pseudo-mask refinements (apply to --masks STORE; true masks are used as they are)
    absent_zero: bool = Field(True, description="classes the image-level label says are absent train as empty")
    present_empty: Literal["ignore", "empty"] = Field(
        "ignore", description="a labelled class with an empty pseudo-mask: ignore its pixels, or train it as empty")
    ignore_band: int = Field(1, ge=0, description="pixels on either side of a pseudo-mask's edge left out of the "
                             "loss (at the training size; 0: none). 3 suited blob-shaped CAM masks (BENCHMARKS.md's "
                             "first Table 3 run); on refined masks, whose streaks are 1-2 px wide, 1 took the U-Net "
                             "from 0.18 to 0.49 positive-pair Dice (BENCHMARKS.md, refined pseudo-masks)")
    swa_epochs: int = Field(1, ge=1, description="average the weights of this many best epochs (by validation loss)")
    # Mixed supervision (--true-masks): true masks where an image has them, pseudo-masks elsewhere
    true_mask_weight: int = Field(1, ge=1, le=255, description="times each true-mask image is a training image per "
                                  "epoch with --true-masks (1: as often as a pseudo-mask image)")


class NightlyConfig(_Section):
    """``cam2seg nightly``: label what arrived since the last run; optionally retrain the segmenter.

    The paths may live here (one config file is then the whole job) or come as flags.
    """

    model: str | None = Field(None, description="the model that labels: a classifier artifact (CAM masks) or a "
                              "segmenter artifact (its masks)")
    images: str | None = Field(None, description="folder or s3:// prefix where new images arrive")
    store: str | None = Field(None, description="the label store the runs commit to")
    retrain_after: int = Field(0, ge=0, description="retrain the segmenter once this many images have been labeled "
                               "since it was trained (0: never)")
    data: str | None = Field(None, description="for retraining: the archive (or labels CSV) with the image-level "
                             "labels of the labeled images; its train_images/ must be the images prefix")
    segmenter: str | None = Field(None, description="the segmenter artifact: once it exists, new images are "
                                  "labeled by the classifier (presence) and it (shape) together; for retraining, "
                                  "where it is (re)written")
    compose: bool = Field(True, description="label with the classifier and nightly.segmenter together when the "
                          "segmenter exists (off: the classifier's CAM masks alone)")
    true_masks: str | None = Field(None, description="for retraining: the reviewers' corrections, a masks file "
                                   "(cam2seg import-coco writes one), trained on as true masks; a changed file "
                                   "makes a retraining due")


class EvaluateConfig(_Section):
    """``cam2seg evaluate``: Tables 2 and 3 out of fold."""

    objective: Literal["kaggle", "paper", "positive"] = Field(
        "kaggle", description="what tuning maximises: kaggle, the Kaggle mean Dice over all images (clean ones "
        "included); paper, the same over defective images; positive, positive-pair Dice")
    batch_size: int = Field(8, ge=1, description="images per inference batch")
    guided: bool = Field(True, description="score the Guided GradCAM++ rows (a full backward per class: the "
                         "slowest row)")
    min_images: int = Field(16, ge=1, description="with a masks file covering some images (--archive): fewer "
                            "covered images than this and the tuned settings are not written (the cards keep "
                            "their defaults)")
    min_positive_pairs: int = Field(8, ge=1, description="the same for the covered images' non-empty masks")


class ComposeConfig(_Section):
    """How a classifier and a segmenter compose for images without labels (``cam2seg label
    --segmenter``): the out-of-fold tuning of the gate and threshold per class."""

    tune: bool = Field(True, description="at the end of train-segmenter on a label store, tune the composition "
                       "with the classifier that made the pseudo-masks, against those pseudo-masks (labels only)")
    floor: float = Field(0.8, ge=0, le=1, description="per class, the positive-pair Dice kept: at least this "
                         "fraction of the class's best on the grid (so no class is switched off)")
    ceiling: float = Field(0.02, ge=0, le=1, description="per class, the most absent (image, class) pairs "
                           "that may get a mask")


class ReportConfig(_Section):
    """``cam2seg report``: the HTML report."""

    examples: int = Field(3, ge=0, description="gallery images per class: 3 = best, typical, worst (0: no gallery)")


class ExportConfig(_Section):
    """``cam2seg export-coco``: a label store's pseudo-masks as COCO JSON for review."""

    format: Literal["polygon", "rle"] = Field(
        "polygon", description="polygon: editable outlines, holes filled; rle: exact masks, iscrowd=1 (CVAT imports "
        "them as masks; Label Studio's COCO converter cannot)")
    order: Literal["confidence", "id"] = Field("confidence", description="images lowest-confidence first, or by image id")
    limit: int | None = Field(None, ge=0, description="export only the first N images (in this order; None: all)")


class ImportConfig(_Section):
    """``cam2seg import-coco``: reviewed COCO files back in as a masks file."""

    unannotated: Literal["skip", "clean"] = Field(
        "skip", description="images of the file without annotations: skip them, or record them as reviewed clean "
        "(only when the reviewers checked every image of the file)")
    categories: dict[str, int] = Field(default_factory=dict, description="COCO category name or id -> class id, "
                                       "for categories not named like 'class 3'")
    max_mb: int = Field(256, ge=1, description="largest COCO file read, in MiB (a bigger one is refused)")


def parse_size(text: str) -> tuple[int, int]:
    """'256x1600' -> (256, 1600) (height x width)."""
    try:
        h, w = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be HEIGHTxWIDTH like 256x1600, got {text!r}") from None
    if h < 32 or w < 32:
        raise ValueError(f"size {h}x{w} is too small (at least 32x32)")
    return h, w


class Config(_Section):
    """The whole tree; later stages add their sections here."""

    synth: SynthConfig = SynthConfig()
    archive: ArchiveConfig = ArchiveConfig()
    stats: StatsConfig = StatsConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    label: LabelConfig = LabelConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    nightly: NightlyConfig = NightlyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compose: ComposeConfig = ComposeConfig()
    report: ReportConfig = ReportConfig()
    export: ExportConfig = ExportConfig()
    import_coco: ImportConfig = ImportConfig()


def _read_config(path: str) -> str:
    try:
        fs, p = io.filesystem(path)
        with fs.open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file holds settings, "
                          "not data")
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_config(path: str | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                base: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults, then ``base`` (a preset, section -> key -> value), then the YAML file at
    ``path`` (any fsspec URL), then ``overrides``.

    ``overrides`` maps section -> key -> value; None values (flags not given) are ignored.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(_read_config(path), path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for section, values in (base or {}).items():
        own = data.get(section) or {}
        if not isinstance(own, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        data[section] = {**values, **own}
    for section, values in (overrides or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            data[section].update(given)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{path or 'configuration'}: {problems}") from None
