"""One typed configuration tree, loaded from YAML; unknown keys are rejected.

Precedence: command-line flags override the file, the file overrides these defaults (the
paper's, sized down only where the section says so). Each stage reads its own section.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import io

__all__ = ["ConfigError", "SynthConfig", "Config", "load_config"]


class ConfigError(ValueError):
    """An unreadable or invalid config file; the message names the file and the keys."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Section):
    """``cam2seg synth``: the synthetic Severstal-like archive."""

    images: int = Field(1000, ge=1)
    height: int = Field(256, ge=32)
    width: int = Field(1600, ge=64)
    seed: int = 0
    clean_fraction: float = Field(0.45, ge=0.0, lt=1.0)
    workers: int = Field(1, ge=1, description="processes generating images in parallel")


class Config(_Section):
    """The whole tree; later stages add their sections here."""

    synth: SynthConfig = SynthConfig()


def load_config(path: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (any fsspec URL), then ``overrides``.

    ``overrides`` maps section -> key -> value; None values (flags not given) are ignored.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = io.read_bytes(path).decode()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
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
