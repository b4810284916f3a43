"""Model artifacts: a folder with ``model.json`` (the card) and ``fold-<k>.safetensors``.

The card says how to rebuild and feed the model (timm architecture, classes, input size,
normalisation), how to post-process its output (thresholds), how it was trained and how it
scored. ``version`` is a content hash of the card and the weight files, so a new model is
detectable and a tampered or mismatched one is refused when loading. Weights are
safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from . import __version__, io
from .classes import default_names
from .postprocess import CardPostProcess
from .train import state

__all__ = ["ArtifactError", "ModelCard", "ClassifierHead", "SegmenterHead", "Training", "write_artifact", "load_card", "load_artifact", "load_extra_states",
           "update_card", "build_fold_models", "CARD_FILE"]

CARD_FILE = "model.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A missing, incomplete, tampered or incompatible model artifact."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifierHead(_Part):
    """The paper's head on a timm encoder (see :mod:`cam2seg.models.classifier`)."""

    hidden: int
    dropout: float
    output_stride: int = 32
    pool: str = "avg"


class SegmenterHead(_Part):
    """The smp network around the encoder (see :mod:`cam2seg.models.segmenter`)."""

    architecture: str = "Unet"
    decoder_channels: list[int] | None = None


class Training(_Part):
    """How the weights came about: the run key (a hash of config and data), the config, and for
    a segmenter the masks it learned from (``"truth"`` or a label store with its runs) and, with
    mixed supervision, ``supervision``: the masks file and how many images of each kind trained."""

    run_key: str = ""
    config: dict[str, Any] = {}
    cam2seg_version: str = ""
    masks: str | None = None
    store_runs: list[str] | None = None
    label_model: str | None = None
    label_model_versions: list[str] | None = None
    refinements: dict[str, Any] | None = None
    supervision: dict[str, Any] | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    kind: Literal["classifier", "segmenter"]
    architecture: str
    num_classes: int
    class_ids: list[int]
    #: the classes' names, in class id order (None on cards from before names: "class <id>")
    class_names: list[str] | None = None
    input_size: tuple[int, int]
    #: grey (True) or RGB (False) images; the model's input channels are len(mean)
    grayscale: bool = True
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: ClassifierHead | SegmenterHead
    folds: int
    fold_files: list[str]
    files: dict[str, str] = {}  # file name -> sha256 of its bytes
    postprocess: CardPostProcess = CardPostProcess()
    metrics: dict[str, Any] = {}
    training: Training = Training()
    data: dict[str, Any] = {}
    cam2seg_version: str = __version__
    created: str = ""
    version: str = ""

    @property
    def names(self) -> list[str]:
        """The classes' names in class id order."""
        return list(self.class_names) if self.class_names is not None else default_names(self.class_ids)

    @property
    def channels(self) -> int:
        """Image channels the model reads: 1 (grey) or 3 (RGB)."""
        return 1 if self.grayscale else 3

    @property
    def in_chans(self) -> int:
        """The model's input channels (3 with grey images on cards from before the channel setting)."""
        return len(self.mean)

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_classes < 1 or len(self.class_ids) != self.num_classes:
            raise ValueError(f"num_classes {self.num_classes} with {len(self.class_ids)} class ids")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError(f"mean and std must both have 1 or 3 values, got {len(self.mean)} and {len(self.std)}")
        if not self.grayscale and len(self.mean) != 3:
            raise ValueError("an RGB model needs 3-channel mean and std")
        return self

    @model_validator(mode="before")
    @classmethod
    def _head_of_kind(cls, data):
        # the kind says which head a card holds (two optional-field models would both fit {})
        if isinstance(data, dict) and isinstance(data.get("head", {}), dict):
            kind = ClassifierHead if data.get("kind") == "classifier" else SegmenterHead
            data = {**data, "head": kind.model_validate(data.get("head", {}))}
        return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content_version(card: ModelCard) -> str:
    # The creation time is left out: identical weights and card give the same version. Hashed as
    # written (JSON mode: an undefined ROC-AUC is null in the file, so it is null here too).
    return _body_version(card.model_dump(mode="json", exclude={"version", "created"}))


def _body_version(body: dict) -> str:
    return _sha256(json.dumps(body, sort_keys=True, default=str).encode())[:16]


def write_artifact(out: str, card: ModelCard, fold_states: list[dict], extra: dict[str, bytes] | None = None) -> ModelCard:
    """Write weights, extra files and finally the card (so a partial folder has no card)."""
    if len(fold_states) != card.folds:
        raise ValueError(f"card says {card.folds} folds, got {len(fold_states)} weight sets")
    from safetensors.torch import save as st_save

    files = {}
    names = [f"fold-{k}.safetensors" for k in range(card.folds)]
    for name, sd in zip(names, fold_states):
        data = st_save({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()})
        io.write_bytes(io.join(out, name), data)
        files[name] = _sha256(data)
    for name, data in (extra or {}).items():
        io.write_bytes(io.join(out, name), data)
        files[name] = _sha256(data)
    card = card.model_copy(update={"fold_files": names, "files": files,
                                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    card = card.model_copy(update={"version": _content_version(card)})
    state.write_json(io.join(out, CARD_FILE), card.model_dump(mode="json"))
    return card


def load_card(url: str) -> ModelCard:
    """Read and validate ``model.json`` (no weights are read)."""
    card_url = io.join(url, CARD_FILE)
    try:
        raw = json.loads(io.read_bytes(card_url))
    except FileNotFoundError:
        raise ArtifactError(f"no model artifact at {url} ({CARD_FILE} missing)") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{card_url} is not valid JSON: {e}") from None
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as e:
        raise ArtifactError(f"{card_url} is not a cam2seg model card: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    if card.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{card_url}: format version {card.format_version}, this cam2seg reads {FORMAT_VERSION}")
    # The stored body's own hash keeps cards valid when a later cam2seg adds an optional field
    # (the parsed card then has it, with its default, and hashes differently).
    stored = _body_version({k: v for k, v in raw.items() if k not in ("version", "created")}) if isinstance(raw, dict) else None
    if card.version not in (_content_version(card), stored):
        raise ArtifactError(f"{card_url}: the card was modified after it was written (version hash mismatch)")
    return card


def _checked_bytes(url: str, card: ModelCard, name: str) -> bytes:
    try:
        data = io.read_bytes(io.join(url, name))
    except FileNotFoundError:
        raise ArtifactError(f"{url}: {name} is missing") from None
    if name not in card.files:
        raise ArtifactError(f"{url}: {name} is not part of this model (not in its card)")
    if _sha256(data) != card.files[name]:
        raise ArtifactError(f"{url}: {name} does not match the card's hash (modified or from another model)")
    return data


def load_extra_states(url: str, card: ModelCard, names: list[str]) -> list[dict]:
    """Other weight files of the artifact (e.g. best-epoch weights), hash-checked."""
    from safetensors.torch import load as st_load

    return [st_load(_checked_bytes(url, card, n)) for n in names]


def update_card(url: str, card: ModelCard, **fields) -> ModelCard:
    """Rewrite the card with new fields (e.g. tuned thresholds, validated like the rest of the
    card); the version changes with it."""
    card = ModelCard.model_validate({**card.model_dump(), **{k: v for k, v in fields.items()}})
    card = card.model_copy(update={"version": _content_version(card)})
    state.write_json(io.join(url, CARD_FILE), card.model_dump(mode="json"))
    return card


def load_artifact(url: str, kind: str | None = None) -> tuple[ModelCard, list[dict]]:
    """The card and the fold weights, each file checked against the card's hashes."""
    from safetensors.torch import load as st_load

    card = load_card(url)
    if kind is not None and card.kind != kind:
        raise ArtifactError(f"{url} holds a {card.kind}, expected a {kind}")
    return card, [st_load(_checked_bytes(url, card, name)) for name in card.fold_files]


def build_fold_models(url: str, card: ModelCard, states: list[dict], build, device="cpu") -> list:
    """``build()`` once per fold, loaded with that fold's weights, in eval mode on ``device``;
    weights that do not fit the card's architecture are an :class:`ArtifactError`."""
    models = []
    for k, sd in enumerate(states):
        try:
            model = build()
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # timm / smp: unknown name or settings
            raise ArtifactError(f"{url}: cannot build the model its card describes ({card.architecture}): "
                                f"{str(e)[:300]}") from None
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise ArtifactError(f"{url}: fold {k} weights do not fit {card.architecture}: {str(e)[:300]}") from None
        models.append(model.to(device).eval())
    return models
