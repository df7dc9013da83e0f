"""Daemon logging: one JSON object per line for machines, readable text on a terminal."""

from __future__ import annotations

import io
import json
import logging

from anomon.logs import setup_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _emit(fmt: str, stream: io.StringIO) -> str:
    setup_logging(fmt, "info", stream=stream)
    try:
        logging.getLogger("anomon.test").info("scored %s", "a.png", extra={"path": "/w/a.png", "score": 0.5})
        logging.getLogger("anomon.test").debug("hidden")
    finally:
        setup_logging("text", "warning", stream=io.StringIO())
    return stream.getvalue()


def test_json_lines_carry_the_fields() -> None:
    (line,) = _emit("json", io.StringIO()).splitlines()
    rec = json.loads(line)
    assert rec["msg"] == "scored a.png" and rec["level"] == "info" and rec["logger"] == "anomon.test"
    assert rec["path"] == "/w/a.png" and rec["score"] == 0.5 and rec["ts"].endswith("Z")


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    text = _emit("auto", _Tty())
    assert text.startswith("20") and "INFO" in text and "path=/w/a.png" in text
    assert json.loads(_emit("auto", io.StringIO()))["msg"] == "scored a.png"
