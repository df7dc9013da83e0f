"""Configuration: the one place defaults live.

`TrainConfig` holds the training defaults `anomon train` uses; `WatchConfig` is the daemon's
configuration, loaded from TOML and overridden by command-line flags. Both are pydantic models so a
bad value fails at start with the field's name and the reason, never deep inside the daemon.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from anomon.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


Device = Literal["auto", "cpu", "cuda"]


class TrainConfig(BaseModel):
    """Defaults for `anomon train`; flags override them."""

    model_config = ConfigDict(extra="forbid")

    # 0 means "auto": the median size of the training images, capped at max_auto_size.
    image_size: int = Field(0, ge=0, le=1024)
    max_auto_size: int = Field(256, ge=16, le=1024)
    channels: Literal[0, 1, 3] = 0  # 0 = auto: 1 if every training image is greyscale, else 3
    epochs: int = Field(60, ge=1, le=10_000)
    # Training length is a budget of optimiser steps, not epochs, so a large data set does not
    # train for ever: 800 steps of 64 images at 28x28, or of 16 crops of 64x64, take well under a
    # minute on 2 CPU cores. Measured (Fashion-MNIST class 0, score "mean+local"): 60 epochs = 5,100
    # steps, 217 s, AUROC 0.916; 15 epochs = 1,275 steps, 67 s, AUROC 0.914. `epochs` caps it
    # from the other side on small data sets. An explicit --epochs overrides the budget.
    max_steps: int = Field(800, ge=1)
    batch_size: int = Field(64, ge=1, le=4096)
    seed: int = 0
    device: Device = "auto"
    target_fpr: float = Field(0.05, gt=0.0, lt=1.0)
    holdout: float = Field(0.1, gt=0.0, lt=0.9)
    latent_dim: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(2e-3, gt=0.0, lt=1.0)
    patience: int = Field(8, ge=1)
    time_budget_s: float | None = Field(None, gt=0)


class WatchConfig(BaseModel):
    """The daemon's configuration (see deploy/anomon.toml for every field explained)."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    watch: list[Path] = Field(min_length=1)
    state: Path = Path("anomon-state")
    # A state folder that has held a ledger (alerts.jsonl, anomalies/ ...) but has none now is
    # refused: starting afresh would score and alert every image again. True = start afresh anyway.
    new_ledger: bool = False
    listen: str = "127.0.0.1:9108"
    device: Device = "auto"

    # intake
    polling: bool = False
    poll_interval_s: float = Field(1.0, gt=0)
    ignore_patterns: list[str] = Field(
        default_factory=lambda: [".*", "*~", "*.tmp", "*.part", "*.partial", "*.crdownload", "*.swp"]
    )
    stable_s: float = Field(0.5, ge=0)  # size+mtime unchanged this long => the writer is done
    # A file that decodes as empty/truncated is "not yet": it is judged as such only if it stays
    # unchanged this long (a writer may pause mid-file, or create the file before writing it).
    incomplete_grace_s: float = Field(10.0, ge=0)
    reconcile_interval_s: float = Field(60.0, gt=0)
    max_pixels: int = Field(50_000_000, gt=0)
    max_bytes: int = Field(256 * 1024 * 1024, gt=0)

    # scoring
    batch_size: int = Field(16, ge=1, le=1024)
    queue_size: int = Field(4096, ge=1)

    # alerts
    anomalies_dir: bool = True  # copy anomalous images + heat maps under STATE/anomalies/
    anomalies_max_bytes: int = Field(512 * 1024 * 1024, ge=0)
    webhook_url: str | None = None
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_max_spool_bytes: int = Field(64 * 1024 * 1024, gt=0)  # undelivered backlog, approx.
    webhook_max_age_s: float = Field(7 * 86400.0, gt=0)  # older undelivered alerts: dead-lettered
    webhook_max_backoff_s: float = Field(60.0, gt=0)  # retry delays double from 0.5 s up to this

    # drift (anomon.drift): a false drift alarm has probability at most drift_alpha per reset
    drift_alpha: float = Field(0.01, gt=0.0, lt=1.0)

    # lifecycle
    stop_timeout_s: float = Field(10.0, gt=0)
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, for example 127.0.0.1:9108")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def watch_default(field: str) -> Any:
    """A daemon setting's default, for the constructors and help texts that need it: the config
    model is the one place a default is written down."""
    return WatchConfig.model_fields[field].get_default(call_default_factory=True)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: `source: field: reason[; field: reason]`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return f"invalid configuration ({source}): " + "; ".join(parts)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None


def load_watch_config(path: Path | None, overrides: dict[str, Any]) -> WatchConfig:
    """TOML first, then flags (None values in `overrides` mean "flag not given")."""
    data: dict[str, Any] = read_toml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    source = str(path) if path else "flags"
    try:
        return WatchConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
