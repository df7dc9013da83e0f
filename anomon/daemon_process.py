"""`anomon watch` as a subprocess: one tested way to start, observe and stop the real daemon.

The demo, the end-to-end tests and the throughput bench all run the daemon exactly as it is
deployed (its own process, a TOML file, HTTP on a local port) and watch it only the way an
operator can: HTTP (/readyz, /metrics, /alerts), its log file, signals and the exit status. They
used to carry three near-copies of that code, each with its own /metrics parser, free-port picker
and TOML writer, so a fix in one (a non-2xx answer, a stuck stop) did not reach the others. This
module is the one copy; tests/test_daemon_process.py checks its pieces.

It imports neither torch nor numpy, so `anomon demo` and the test helpers import it at no cost.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal as _signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple


class DaemonProcessError(Exception):
    """The daemon did not do what was waited for (exited, not ready, timed out); the message
    carries the end of its log, which is where the reason is."""


# ------------------------------------------------------------------------------ small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it); the caller binds it soon after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(v: Any) -> str:
    """One value in TOML syntax: str (and paths), bool, int, float, and lists and dicts of these.

    A JSON string is a TOML basic string once DEL, which TOML wants escaped, is escaped;
    `ensure_ascii=False` keeps characters outside the BMP as they are (JSON's surrogate-pair
    escapes are not valid TOML)."""
    if isinstance(v, bool):  # before int: bool is an int
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # inf and nan are spelled the same in TOML
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):  # an inline table: a `[[lines]]` entry, say
        return "{" + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (str, os.PathLike)):
        return json.dumps(os.fspath(v), ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"no TOML for {type(v).__name__} (str, bool, int, float, lists, dicts only)")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def write_toml(path: Path, values: Mapping[str, Any], comment: str | None = None) -> None:
    """Write a flat TOML file (one `key = value` line each), with `comment` lines on top."""
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    body = "".join(f"{_key(k)} = {toml_value(v)}\n" for k, v in values.items())
    Path(path).write_text(head + body, encoding="utf-8")


_KEY = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _split_key(key: str) -> tuple[str, frozenset[tuple[str, str]]] | None:
    m = _KEY.match(key)
    return (m.group(1), frozenset(_LABEL.findall(m.group(2) or ""))) if m else None


class Samples(dict):  # type: ignore[type-arg]
    """parse_metrics's answer. A key naming only some labels, like PromQL's `sum without` the
    others, is the sum of the samples that have those labels: 'anomon_images_scored_total{verdict="normal"}'
    is the count over every line, so a check needs no line unless it is about lines."""

    def __missing__(self, key: str) -> float:
        want = _split_key(key)
        if want is None:
            raise KeyError(key)
        found = [v for k, v in self.items()
                 if (got := _split_key(k)) is not None and got[0] == want[0] and want[1] <= got[1]]
        if not found:
            raise KeyError(key)
        return float(sum(found))

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return self[key]
        except KeyError:
            return default


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition as {'name{a="x",b="y"}': value}.

    Labels are sorted, so a key can be written by hand; a sample without labels is its bare name;
    a key with fewer labels than the samples sums them (see Samples). Parsed by prometheus_client,
    as Prometheus itself would read it."""
    from prometheus_client.parser import text_string_to_metric_families

    out = Samples()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def die_with_parent() -> None:
    """A `preexec_fn`: on Linux the child gets SIGTERM when its parent dies, even by SIGKILL, so
    no daemon lingers after a killed demo. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, _signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class Reply(NamedTuple):
    """An HTTP answer: unpacks as (status, body); `text` and `json()` for reading it."""

    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


# ------------------------------------------------------------------------------ the daemon


class DaemonProcess:
    """One `anomon watch --config FILE` subprocess, its config in `cfg`, its log in `log_path`.

    `cfg` is written as TOML to `config` at every start, so a stopped daemon can be restarted
    (after kill9(), say) with the same or an edited config. Without a "listen" entry it gets a
    free 127.0.0.1 port. stdout and stderr go to the log file, appended across restarts.

    Options the callers differ on: `env` (added to this process's environment, e.g.
    OMP_NUM_THREADS), `cwd`, `new_session` (so Ctrl-C in a terminal reaches only the caller,
    which then stops the daemon with one SIGTERM), `die_with_parent` and a `comment` on top of
    the TOML file. The log format is whatever `cfg["log_format"]` says.
    """

    def __init__(self, workdir: Path, cfg: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, new_session: bool = False, die_with_parent: bool = False,
                 comment: str | None = None, config_name: str = "anomon.toml",
                 log_name: str = "daemon.log") -> None:
        self.workdir = Path(workdir)
        self.cfg: dict[str, Any] = dict(cfg)
        if "listen" not in self.cfg:
            self.cfg["listen"] = f"127.0.0.1:{free_port()}"
        self.config = self.workdir / config_name
        self.log_path = self.workdir / log_name
        self.env = dict(env or {})
        self.cwd = cwd
        self.new_session = new_session
        self.die_with_parent = die_with_parent
        self.comment = comment
        self.proc: subprocess.Popen[bytes] | None = None

    # -- where it is ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(str(self.cfg["listen"]).rpartition(":")[2])

    @property
    def url(self) -> str:
        """http://HOST:PORT for the listen address (a wildcard host is reached on loopback)."""
        host = str(self.cfg["listen"]).rpartition(":")[0].strip("[]")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def pid(self) -> int:
        return self._started().pid

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise DaemonProcessError("the daemon was never started")
        return self.proc

    # -- start and stop ---------------------------------------------------------------------

    def write_config(self) -> None:
        write_toml(self.config, self.cfg, self.comment)

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0, env: Mapping[str, str] | None = None,
              extra_args: Sequence[str] | None = None) -> DaemonProcess:
        """Write the config and start the daemon; by default wait until /readyz answers 200.
        `env` and `extra_args` apply to this start only (a restart can change them)."""
        if self.proc is not None and self.proc.poll() is None:
            raise DaemonProcessError(f"the daemon is already running (pid {self.proc.pid})")
        self.write_config()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log file is current for log_tail()
        full_env.update(self.env)
        full_env.update(env or {})
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "anomon", "watch", "--config", str(self.config), *(extra_args or [])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.cwd, env=full_env,
                start_new_session=self.new_session,
                preexec_fn=die_with_parent if self.die_with_parent else None)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Poll /readyz until it answers 200; returns the seconds waited. Raises
        DaemonProcessError, with the log's tail, if the daemon exits or `timeout` passes."""
        proc = self._started()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise DaemonProcessError(f"anomon watch exited with status {proc.returncode} before it "
                                         f"was ready; its log ends:\n{self.log_tail()}")
            try:
                if self.get("/readyz", timeout=1.0).status == 200:
                    return time.monotonic() - t0
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            time.sleep(0.1)
        raise DaemonProcessError(f"anomon watch not ready after {timeout:g} s; its log ends:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        self._started().send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; returns the exit status (None if never started). After `timeout`
        the daemon is killed and the status is -SIGKILL, which the caller can report."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(_signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        """SIGKILL and reap: a crash, as far as the daemon's files can tell."""
        proc = self._started()
        proc.kill()
        proc.wait()

    # -- what it says -----------------------------------------------------------------------

    def get(self, path: str, timeout: float = 5.0) -> Reply:
        """GET `path`; any status, 4xx and 5xx included, comes back as a Reply (urllib raises
        HTTPError for those). Connection failures raise OSError."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return Reply(r.status, r.read())
        except urllib.error.HTTPError as e:
            with e:
                return Reply(e.code, e.read())

    def metrics(self) -> Samples:
        """/metrics parsed by parse_metrics: {'name{labels}': value}."""
        status, body = self.get("/metrics")
        if status != 200:
            raise DaemonProcessError(f"/metrics answered {status}: {body[:200]!r}")
        return parse_metrics(body.decode("utf-8"))

    def metric(self, key: str) -> float:
        """One sample of /metrics by its parse_metrics key; NaN when absent."""
        return self.metrics().get(key, float("nan"))

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
                 poll_s: float = 0.1) -> None:
        """Until `predicate()` is true. Raises DaemonProcessError, with the log's tail, if the
        daemon exits meanwhile or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise DaemonProcessError(f"anomon watch exited with status {self.proc.returncode} while "
                                         f"waiting for {what}; its log ends:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise DaemonProcessError(f"timed out after {timeout:g} s waiting for {what}; "
                                         f"the log ends:\n{self.log_tail()}")
            time.sleep(poll_s)

    def log_lines(self) -> list[dict[str, Any]]:
        """The log, one dict a line: JSON lines parsed, any other line as {"msg": line}."""
        out: list[dict[str, Any]] = []
        for line in self._log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            out.append(rec if isinstance(rec, dict) else {"msg": line})
        return out

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the log, for error messages."""
        text = self._log_text()
        return "\n".join(text.splitlines()[-n:]) if text else "(empty log)"

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
