"""Typed, frozen configuration loaded from YAML, validated as a whole before Spark starts.

A config file has one section per stage (``run``, ``ingest``, ``extract``, ``spark``).
Overrides are ``section.field=value`` strings whose values are parsed as YAML scalars,
so ``extract.batch_size=64`` is an int and ``extract.whitening=true`` a bool.
Every error is a :class:`ConfigError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field."""


POOLINGS = ("gap", "mac", "gem", "crow", "rmac")
RESIZE_MODES = ("squash", "center_crop", "pad")
BUILTIN_MODELS = (
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
    "vgg16",
    "vgg16-fc2",
    "resnet50",
    "mobilenetv2",
    "inceptionv3",
)


@dataclass(frozen=True)
class RunConfig:
    output_root: str = "output"
    run_id: str | None = None  # default: a timestamp; Airflow passes one from the logical date
    keep_snapshots: int = 2

    def validate(self) -> None:
        _require(bool(self.output_root), "run.output_root", "must be a path or URI")
        if self.run_id is not None:
            _require(
                all(c.isalnum() or c in "-_." for c in self.run_id),
                "run.run_id",
                f"may hold letters, digits, '-', '_' and '.' only, got {self.run_id!r}",
            )
        _require(self.keep_snapshots >= 1, "run.keep_snapshots", "must be >= 1")


@dataclass(frozen=True)
class IngestConfig:
    images: str | None = None  # directory or Hadoop URI; None = the embedded sample
    glob: str | None = None  # pathGlobFilter, e.g. "*.{jpg,jpeg,png}"
    recursive: bool = True
    max_pixels: int = 100_000_000
    hash_decode_side: int = 128  # decode JPEGs at reduced scale for the perceptual hashes
    max_failure_rate: float = 1.0  # fail the run when more than this fraction fails

    def validate(self) -> None:
        _require(self.max_pixels > 0, "ingest.max_pixels", "must be > 0")
        _require(self.hash_decode_side >= 32, "ingest.hash_decode_side", "must be >= 32")
        _require(0.0 <= self.max_failure_rate <= 1.0, "ingest.max_failure_rate", "must be in [0, 1]")


@dataclass(frozen=True)
class ExtractConfig:
    model: str = "efficientnet-lite0"
    model_path: str | None = None  # .keras/.h5/SavedModel, or weights file for a builtin
    output_layer: str | None = None  # required for a user model
    image_size: int | None = None  # default: the model's native size
    resize: str = "squash"
    pooling: str = "gap"
    gem_p: float = 3.0
    rmac_levels: int = 3
    whitening: bool = False
    whitening_dim: int | None = None  # None keeps the full dimension
    whitening_sample: int = 20_000
    binary_codes: bool = False
    batch_size: int = 32
    chunk_size: int = 2048  # images per committed part; the unit of resume after a crash
    mixed_precision: bool = False
    device: str = "auto"  # auto | cpu | gpu
    decode_threads: int = 2
    max_failure_rate: float = 1.0
    model_cache: str = "~/.cache/cbir/models"

    def validate(self) -> None:
        user_model = self.model == "custom"
        _require(
            self.model in BUILTIN_MODELS or user_model,
            "extract.model",
            f"must be one of {', '.join(BUILTIN_MODELS)} or 'custom', got {self.model!r}",
        )
        if user_model:
            _require(bool(self.model_path), "extract.model_path", "is required when extract.model is 'custom'")
            _require(bool(self.output_layer), "extract.output_layer", "is required when extract.model is 'custom'")
        _require(self.pooling in POOLINGS, "extract.pooling", f"must be one of {POOLINGS}, got {self.pooling!r}")
        _require(self.resize in RESIZE_MODES, "extract.resize", f"must be one of {RESIZE_MODES}, got {self.resize!r}")
        _require(self.gem_p > 0, "extract.gem_p", "must be > 0")
        _require(1 <= self.rmac_levels <= 5, "extract.rmac_levels", "must be in 1..5")
        if self.image_size is not None:
            _require(32 <= self.image_size <= 1024, "extract.image_size", "must be in 32..1024")
        if self.whitening_dim is not None:
            _require(self.whitening_dim >= 1, "extract.whitening_dim", "must be >= 1")
        _require(self.whitening_sample >= 2, "extract.whitening_sample", "must be >= 2")
        _require(self.batch_size >= 1, "extract.batch_size", "must be >= 1")
        _require(self.chunk_size >= 1, "extract.chunk_size", "must be >= 1")
        _require(self.device in ("auto", "cpu", "gpu"), "extract.device", "must be auto, cpu or gpu")
        _require(self.decode_threads >= 1, "extract.decode_threads", "must be >= 1")
        _require(0.0 <= self.max_failure_rate <= 1.0, "extract.max_failure_rate", "must be in [0, 1]")
        if self.model == "vgg16-fc2":
            _require(self.pooling == "gap", "extract.pooling", "vgg16-fc2 is a vector already; use pooling=gap")

    @property
    def model_cache_dir(self) -> str:
        return os.path.expanduser(self.model_cache)


@dataclass(frozen=True)
class SparkConfig:
    app_name: str = "cbir"
    master: str | None = None  # None: whatever spark-submit or the environment says
    conf: Mapping[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _require(isinstance(self.conf, Mapping), "spark.conf", "must be a mapping of Spark settings")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spark"]["conf"] = dict(self.spark.conf)
        return d


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {why}")


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    name = f"{section}.{f.name}"
    hint = str(f.type)
    if value is None:
        if "None" in hint:
            return None
        raise ConfigError(f"{name}: may not be null")
    if hint.startswith("Mapping"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: must be a mapping, got {type(value).__name__}")
        return {str(k): str(v) for k, v in value.items()}
    if hint.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return value
    if hint.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if hint.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        return float(value)
    if hint.startswith("str"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
        return str(value)
    return value


def _section(cls, section: str, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    return cls(**{k: _coerce(section, known[k], v) for k, v in raw.items()})


_SECTIONS = {"run": RunConfig, "ingest": IngestConfig, "extract": ExtractConfig, "spark": SparkConfig}


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("config: the top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(_SECTIONS)})")
    return Config(**{name: _section(cls, name, raw.get(name)) for name, cls in _SECTIONS.items()}).validate()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML scalars)."""
    out = {k: dict(v or {}) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        section = out.setdefault(parts[0], {})
        if parts[0] == "spark" and parts[1] == "conf" and len(parts) > 2:
            section.setdefault("conf", {})[".".join(parts[2:])] = value
        elif len(parts) == 2:
            section[parts[1]] = _scalar(value)
        else:
            raise ConfigError(f"override {item!r}: expected section.field=value")
    return out


def _scalar(text: str) -> Any:
    """An override value as YAML would read it (``64`` -> int, ``true`` -> bool), else the text."""
    if text == "":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or defaults), apply overrides, and validate everything."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"--config: file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return from_dict(apply_overrides(raw, overrides or []))
