"""Configuration: the one place defaults live.

`TrainConfig` holds the training defaults `anomon train` uses; `WatchConfig` is the daemon's
configuration, loaded from TOML and overridden by command-line flags. Both are pydantic models so a
bad value fails at start with the field's name and the reason, never deep inside the daemon.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

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


DEFAULT_LINE = "default"
# A line's name becomes a Prometheus label value, a ledger column and part of log lines: short,
# plain, and not a path.
LINE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class LineConfig(BaseModel):
    """One inspection line: a camera (or product) with its own folders and model. The optional
    fields default to the daemon-wide ones of the same name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=LINE_NAME)
    model: Path
    watch: list[Path] = Field(min_length=1)
    batch_size: int | None = Field(None, ge=1, le=1024)
    # Another false-alarm target than the bundle's: the threshold is set again, at start and at
    # every reload, from the calibration scores the bundle holds (the same conformal rule).
    target_fpr: float | None = Field(None, gt=0.0, lt=1.0)
    webhook_url: str | None = None
    drift_alpha: float | None = Field(None, gt=0.0, lt=1.0)

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        return _check_url(v)


def _check_url(v: str | None) -> str | None:
    if v is not None and not v.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return v


def _overlap(a: Path, b: Path) -> bool:
    a, b = Path(os.path.abspath(a)), Path(os.path.abspath(b))
    return a == b or a in b.parents or b in a.parents


class WatchConfig(BaseModel):
    """The daemon's configuration (see deploy/anomon.toml for every field explained).

    One line is `model` + `watch` (the line is called `default`); several are `[[lines]]`
    tables, each with its own name, model and folders. Not both: a config that mixed them would
    leave the reader guessing which model scores which folder."""

    model_config = ConfigDict(extra="forbid")

    model: Path | None = None
    watch: list[Path] = Field(default_factory=list)
    lines: list[LineConfig] = Field(default_factory=list)
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

    # retention (anomon.retention): months of data. Unset = keep everything (as before retention).
    # Image rows older than retention_max_age_days, or beyond the newest retention_max_images, are
    # pruned in the background (their alerts too, once exported; judged alerts and drift alarms are
    # kept); a pruned image's file still in a folder is never scored again. Rotated alerts.jsonl
    # files and anomaly copies older than retention_max_age_days are removed.
    retention_max_age_days: float | None = Field(None, gt=0)
    retention_max_images: int | None = Field(None, ge=1)
    retention_interval_s: float = Field(300.0, gt=0)  # how often a pruning pass runs
    alerts_jsonl_max_bytes: int | None = Field(None, ge=1024)  # rotate alerts.jsonl at this size
    alerts_jsonl_keep_files: int = Field(4, ge=1, le=1000)  # rotated files kept: alerts.jsonl.1 ... .N
    # -- end retention --

    # review (anomon.review): the page at /review, read-only unless a token is set; judging sends
    # it as `Authorization: Bearer TOKEN`. A file (readable by the daemon's user only) keeps it out
    # of the config, which more people read.
    review_page: bool = True
    review_token: SecretStr | None = None
    review_token_file: Path | None = None

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
        return _check_url(v)

    # -- review --
    @field_validator("review_token")
    @classmethod
    def _check_review_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            _check_token(v.get_secret_value())
        return v

    @field_validator("review_token_file")
    @classmethod
    def _check_review_token_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None:
            if info.data.get("review_token") is not None:
                raise ValueError("give review_token or review_token_file, not both")
            _check_token(_read_token(v))
        return v

    def review_secret(self) -> str | None:
        """The review token, read now (from the file, if that is where it is); None = read-only."""
        if self.review_token is not None:
            return self.review_token.get_secret_value()
        if self.review_token_file is not None:
            try:
                return _check_token(_read_token(self.review_token_file))
            except ValueError as e:
                raise ConfigError(f"invalid configuration: review_token_file: {e}") from None
        return None
    # -- end review --

    @model_validator(mode="after")
    def _check_lines(self) -> WatchConfig:
        if self.lines:
            if self.model is not None or self.watch:
                raise ValueError("lines: give either model + watch (one line, named default) or "
                                 "[[lines]] (each with its own name, model and watch), not both")
            names = [ln.name for ln in self.lines]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"lines: names must be unique: {', '.join(twice)} given twice")
        else:
            missing = [f for f, v in (("model", self.model), ("watch", self.watch)) if not v]
            if missing:
                raise ValueError(f"{missing[0]}: required (or [[lines]], each with its own name, "
                                 "model and watch)")
        # Every folder belongs to one line: a file in two lines' folders would be judged by two
        # models and recorded twice, or by whichever came first.
        folders = [(ln.name, w) for ln in self.all_lines() for w in ln.watch]
        for i, (la, a) in enumerate(folders):
            for lb, b in folders[i + 1:]:
                if _overlap(a, b):
                    where = f"line {la}" if la == lb else f"lines {la} and {lb}"
                    raise ValueError(f"watch: folders overlap ({where}): {a} and {b}; each "
                                     "folder belongs to one line")
        return self

    def all_lines(self) -> list[LineConfig]:
        """The lines to run, with the daemon-wide settings filled in where a line has none."""
        lines = self.lines or [LineConfig(name=DEFAULT_LINE, model=self.model, watch=self.watch)]  # type: ignore[arg-type]
        return [ln.model_copy(update={
            "batch_size": ln.batch_size or self.batch_size,
            "webhook_url": ln.webhook_url if ln.webhook_url is not None else self.webhook_url,
            "drift_alpha": ln.drift_alpha or self.drift_alpha,
        }) for ln in lines]

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


MIN_REVIEW_TOKEN = 16


def _read_token(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _check_token(token: str) -> str:
    """A review token that can go in a header and is not guessed by trying: 16 or more printable
    ASCII characters, no spaces (`openssl rand -hex 16` makes one)."""
    if len(token) < MIN_REVIEW_TOKEN or not all("!" <= c <= "~" for c in token):
        raise ValueError(f"the token must be at least {MIN_REVIEW_TOKEN} printable ASCII characters "
                         "without spaces (make one with: openssl rand -hex 16)")
    return token


def watch_default(field: str) -> Any:
    """A daemon setting's default, for the constructors and help texts that need it: the config
    model is the one place a default is written down."""
    return WatchConfig.model_fields[field].get_default(call_default_factory=True)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: `source: field: reason[; field: reason]`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)  # a check across fields names them itself
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
