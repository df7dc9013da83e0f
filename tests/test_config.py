"""The daemon's configuration: one line or several, and every mistake named by its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomon.config import load_watch_config
from anomon.errors import ConfigError


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "anomon.toml"
    p.write_text(text)
    return p


def test_model_and_watch_are_one_line_named_default(tmp_path: Path) -> None:
    cfg = load_watch_config(None, {"model": "m.anomon", "watch": ["in"], "batch_size": 8,
                                   "webhook_url": "http://127.0.0.1:1/h"})
    (line,) = cfg.all_lines()
    assert (line.name, line.model, line.watch) == ("default", Path("m.anomon"), [Path("in")])
    assert line.batch_size == 8 and line.webhook_url == "http://127.0.0.1:1/h" and line.drift_alpha == 0.01


def test_lines_from_toml_take_the_daemon_wide_settings_they_do_not_set(tmp_path: Path) -> None:
    cfg = load_watch_config(_toml(tmp_path, """
batch_size = 16
webhook_url = "http://127.0.0.1:1/all"
drift_alpha = 0.01

[[lines]]
name = "press-1"
model = "press.anomon"
watch = ["/srv/press1"]

[[lines]]
name = "weld_2"
model = "weld.anomon"
watch = ["/srv/weld2a", "/srv/weld2b"]
batch_size = 4
target_fpr = 0.01
webhook_url = "http://127.0.0.1:1/weld"
drift_alpha = 0.001
"""), {})
    press, weld = cfg.all_lines()
    assert (press.name, press.batch_size, press.webhook_url, press.drift_alpha, press.target_fpr) == (
        "press-1", 16, "http://127.0.0.1:1/all", 0.01, None)
    assert (weld.name, weld.batch_size, weld.webhook_url, weld.drift_alpha, weld.target_fpr) == (
        "weld_2", 4, "http://127.0.0.1:1/weld", 0.001, 0.01)


@pytest.mark.parametrize("text, flags, field, reason", [
    ("", {}, "model", "required"),
    ('model = "m"', {}, "watch", "required"),
    ('model = "m"\nwatch = ["a"]\n[[lines]]\nname = "x"\nmodel = "m"\nwatch = ["b"]', {}, "lines", "not both"),
    ('[[lines]]\nname = "x"\nmodel = "m"\nwatch = ["b"]', {"model": "m2"}, "lines", "not both"),
    ('[[lines]]\nname = "x"\nmodel = "m"\nwatch = ["a"]\n[[lines]]\nname = "x"\nmodel = "m"\nwatch = ["b"]',
     {}, "lines", "x given twice"),
    ('[[lines]]\nname = "x"\nmodel = "m"\nwatch = ["/srv/a"]\n[[lines]]\nname = "y"\nmodel = "m"\n'
     'watch = ["/srv/a/cam2"]', {}, "watch", "overlap (lines x and y)"),
    ('[[lines]]\nname = "a b"\nmodel = "m"\nwatch = ["a"]', {}, "lines.0.name", "pattern"),
    ('[[lines]]\nname = "x"\nmodel = "m"\nwatch = []', {}, "lines.0.watch", "at least 1"),
    ('[[lines]]\nname = "x"\nmodel = "m"\nwatch = ["a"]\nbatch_size = 0', {}, "lines.0.batch_size", "greater"),
    ('[[lines]]\nname = "x"\nmodel = "m"\nwatch = ["a"]\nwebhook_url = "ftp://h"', {}, "lines.0.webhook_url", "http"),
    ('[[lines]]\nname = "x"\nmodel = "m"\nwatch = ["a"]\ncolour = 1', {}, "lines.0.colour", "not permitted"),
])
def test_a_bad_config_fails_naming_the_field(tmp_path: Path, text: str, flags: dict, field: str,
                                             reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_watch_config(_toml(tmp_path, text), flags)
    msg = str(e.value)
    assert "\n" not in msg and f"{field}: " in msg and reason in msg, msg
