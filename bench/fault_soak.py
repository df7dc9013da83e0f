"""Fault soak: 20,000 images through the real daemon while it is killed, flooded, starved of disk
and cut off from its webhook; afterwards every image must be in the ledger exactly once.

Runs `anomon watch` as a subprocess (anomon.daemon_process, through bench/daemon_throughput.py's
`Daemon`), with a small model (64x64 synthetic textures, trained here in seconds by
daemon_throughput's `build_model`, so scoring is fast and the run is about the faults, not the
model), OMP_NUM_THREADS=1, default settings apart from paths, `device = "cpu"`, a webhook and a
bounded anomalies/ folder (the state lives on a small tmpfs). It feeds N files into the watched
folder in bursts (written to a hidden name and renamed in, or about 15 % written in place):
mostly normal textures, about 3 % with a painted defect, and bad files (empty, truncated,
corrupt, not an image, all named *.png), plus a few names that are not valid UTF-8
(b"odd\\xff-123.png"). Meanwhile, one after another:

  kill9          kill -9 at a random moment while a burst is being scored; the rest of the burst
                 arrives while the daemon is down; restart
  kill9_startup  kill -9, restart, kill -9 again during start-up (before or during the start-up
                 rescan), restart
  sigterm        SIGTERM while a burst is being scored (exit status and time), restart
  flood          hundreds of idle TCP connections to the daemon's HTTP port, replaced as fast as
                 the daemon closes them, held while a burst is scored; /metrics is probed
                 throughout and must answer
  disk_full      the state folder's tmpfs is filled with a ballast file (topped up while held)
                 while a burst arrives, then freed; the burst's verdicts must be recorded at the
                 latest by the periodic rescan (reconcile_interval_s) after space returns
  webhook_down   the webhook receiver (an HTTP server in this process) stops listening while
                 bursts raise alerts, with one kill -9 + restart during the outage

The faults are spread over the first ~60 % of the bursts; the rest run undisturbed (an RSS and
file-descriptor soak of one daemon process). Then a quiet period (until the ledger covers every
file), a final SIGTERM + restart, one fresh image (it must be scored within 2 s), and the checks, all from
the outside: the ledger read-only (anomon.ledger.open_readonly), alerts.jsonl, what the webhook
receiver got, the daemon's log, /proc/PID for its memory and open files.

    .venv/bin/python bench/fault_soak.py            # 20,000 images (~10 min) -> bench/results/fault_soak.md + .json
    .venv/bin/python bench/fault_soak.py --quick    # 1,000 images, shorter faults (~4 min), for trying

`anomon train` and the daemon run from a copy of anomon/ as committed at HEAD (other people may be
editing the tree meanwhile; the results name the commit).

Needs root for the tmpfs (`mount -t tmpfs`); without it the state stays on the ordinary disk and
the disk_full fault is skipped, which the results say. The exit status is 0 only if every check
passed.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import platform
import select
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_throughput as dt  # noqa: E402  (the throughput bench's model, images and Daemon)

from anomon.daemon_process import DaemonProcessError, free_port  # noqa: E402

REPO = dt.REPO
RESULTS = REPO / "bench" / "results" / "fault_soak.md"
IMAGE_SIZE = 64  # daemon_throughput's textures and model at this size (set in main)
STOP_TIMEOUT_S = 10.0  # the daemon's default stop_timeout_s
RECONCILE_S = 60.0  # the daemon's default reconcile_interval_s
GRACE_S = 10.0  # the daemon's default incomplete_grace_s
ANOMALIES_MAX_BYTES = 2 * 1024 * 1024  # bounded, so the state fits on a small tmpfs
FRESH_LATENCY_S = 2.0  # RELIABILITY.md: a fresh image is scored within 2 s after the last restart
BAD_KINDS = ("empty", "truncated", "corrupt", "not_image")
INCOMPLETE_KINDS = ("empty", "truncated")  # waited on for incomplete_grace_s before the verdict
FAULTS = ["kill9", "flood", "kill9", "sigterm", "disk_full", "kill9_startup", "webhook_down",
          "flood", "kill9", "sigterm", "kill9"]


# ------------------------------------------------------------------------------ the files


@dataclass
class Item:
    name: str  # file name (a str; surrogate escapes for bytes that are not UTF-8)
    kind: str  # normal | anomalous | empty | truncated | corrupt | not_image
    data: bytes
    odd: bool = False  # the name is not valid UTF-8
    direct: bool = False  # written in place (close-after-write) instead of renamed in
    path: str = ""
    written_at: float = 0.0
    burst: int = -1

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def defect_png(tex: dt.Textures, seed: int) -> bytes:
    """A texture with a painted disc (a pit or a stain): 5-9 px across on a 64 px image."""
    rng = np.random.default_rng(seed)
    a = tex.image(seed).astype(np.float32)
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    cy, cx = rng.integers(a.shape[0] // 5, a.shape[0] * 4 // 5, 2)
    r = rng.uniform(5, 9)
    a[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 255.0 if rng.random() < 0.5 else 0.0
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def bad_bytes(kind: str, png: bytes, rng: np.random.Generator, i: int) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated":
        return png[: int(len(png) * rng.uniform(0.3, 0.8))]
    if kind == "corrupt":
        if i % 2:  # a PNG signature with garbage behind it, longer than a PNG header
            return png[:8] + rng.bytes(int(rng.integers(100, 2000)))
        bad = bytearray(png)  # a valid header, the compressed pixels damaged
        mid = len(bad) // 2
        for k in range(mid, mid + 32):
            bad[k] ^= 0xFF
        return bytes(bad)
    if kind == "not_image":
        return b"anomon fault soak: this is not an image (#%d)\n" % i * int(rng.integers(1, 50))
    raise ValueError(kind)


def make_items(n: int, tex: dt.Textures, seed: int = 0) -> list[Item]:
    """N files in a shuffled order; every bad file is checked to fail with its intended reason."""
    from anomon.errors import ImageError
    from anomon.images import decode_image

    rng = np.random.default_rng(seed)
    n_bad = max(3, round(n * 0.0025))  # of each bad kind
    n_odd = max(5, n // 1000)
    n_anom = max(10, round(n * 0.03))
    normals = [tex.png(10_000_000 + i) for i in range(256)]
    defects = [defect_png(tex, 20_000_000 + i) for i in range(64)]
    items: list[Item] = []
    for i in range(n_odd):  # every fourth one anomalous, so odd names reach the alert exports too
        kind = "anomalous" if i % 4 == 0 else "normal"
        pool = defects if kind == "anomalous" else normals
        items.append(Item(os.fsdecode(b"odd\xff-%d.png" % i), kind, dt.tagged(pool[i % len(pool)], f"odd{i}"),
                          odd=True))
    for kind in BAD_KINDS:
        for i in range(n_bad):
            items.append(Item(f"{kind}_{i:05d}.png", kind, bad_bytes(kind, dt.tagged(normals[i % 256], f"{kind}{i}"),
                                                                      rng, i)))
    for i in range(n_anom):
        items.append(Item(f"anomalous_{i:06d}.png", "anomalous", dt.tagged(defects[i % 64], f"a{i}")))
    for i in range(n - len(items)):
        items.append(Item(f"normal_{i:06d}.png", "normal", dt.tagged(normals[i % 256], f"n{i}")))
    order = rng.permutation(len(items))
    items = [items[k] for k in order]
    for it in items:
        it.direct = bool(rng.random() < 0.15)
        try:
            decode_image(it.data)
            got = "ok"
        except ImageError as e:
            got = e.reason
        want = it.kind if it.kind in BAD_KINDS else "ok"
        if got != want:
            raise SystemExit(f"fault_soak: {it.name}: meant to be {want}, decodes as {got}")
    return items


def write_item(d: SoakDaemon, it: Item) -> None:
    if it.direct:  # written in place: created, written, closed (IN_CLOSE_WRITE)
        with open(d.watch / it.name, "wb") as f:
            f.write(it.data)
        it.written_at = time.time()
    else:  # the camera idiom: a hidden temporary name, then one rename
        it.written_at = dt.drop(d.watch, it.name, it.data)
    it.path = str(d.watch / it.name)


# ------------------------------------------------------------------------------ the daemon


class SoakDaemon(dt.Daemon):
    """daemon_throughput's Daemon, its state on `state` (the tmpfs), a webhook, one OMP thread;
    remembers each process it started (runs) for the memory report."""

    def __init__(self, work: Path, model: Path, state: Path, webhook_url: str) -> None:
        super().__init__(work, model, None)
        self.state = state
        self.cfg.update(state=str(state), webhook_url=webhook_url, anomalies_max_bytes=ANOMALIES_MAX_BYTES)
        self.env["OMP_NUM_THREADS"] = "1"
        self.runs: list[dict[str, Any]] = []
        self.live_pid: int | None = None  # read by the sampler thread

    def begin(self, clock: Clock, why: str, wait_ready: bool = True) -> float:
        t0 = time.monotonic()
        self.start(wait_ready=wait_ready, timeout=180.0)
        self.live_pid = self.pid
        ready = time.monotonic() - t0 if wait_ready else None
        self.runs.append({"run": len(self.runs) + 1, "pid": self.pid, "started_t": clock.t(), "why": why,
                          "ready_s": ready, "ended_t": None, "end": None, "exit": None})
        return ready or 0.0

    def end(self, clock: Clock, how: str) -> tuple[int | None, float]:
        """Stop the current process by `how` ("kill -9" or "SIGTERM"); (exit status, seconds)."""
        self.live_pid = None
        t0 = time.monotonic()
        if how == "kill -9":
            self.kill9()
            code = self.proc.returncode if self.proc else None
        else:
            code = self.stop(timeout=60.0)
        took = time.monotonic() - t0
        if self.runs:
            self.runs[-1].update(ended_t=clock.t(), end=how, exit=code, stop_s=took)
        return code, took


# ------------------------------------------------------------------------------ helpers


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def t(self) -> float:
        return round(time.monotonic() - self.t0, 2)


class LedgerView:
    """This bench's own read-only view of the ledger (one connection, kept across restarts)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.conn: sqlite3.Connection | None = None

    def c(self) -> sqlite3.Connection:
        if self.conn is None:
            from anomon.ledger import open_readonly
            from anomon.state import ledger_path

            self.conn = open_readonly(ledger_path(self.state))
        return self.conn

    def count(self) -> int:
        return int(self.c().execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def paths(self) -> set[Any]:
        return {r[0] for r in self.c().execute("SELECT path FROM images")}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def db_key(path: str) -> Any:
    from anomon.ledger import db_path

    return db_path(path)


class Sampler(threading.Thread):
    """Once a second: the daemon's VmRSS, open files and threads (/proc), and the load average."""

    def __init__(self, d: SoakDaemon, clock: Clock) -> None:
        super().__init__(name="sampler", daemon=True)
        self.d, self.clock = d, clock
        self.samples: list[dict[str, Any]] = []
        self.stop_ev = threading.Event()

    def run(self) -> None:
        while not self.stop_ev.wait(1.0):
            s: dict[str, Any] = {"t": self.clock.t(), "load1": float(dt.loadavg().split()[0])}
            try:  # how much of the state folder's file system is used, and the WAL's size
                vfs = os.statvfs(self.d.state)
                s["state_used_mb"] = round((vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize / 2**20, 2)
                s["wal_mb"] = round(os.stat(f"{self.d.state}/ledger.sqlite3-wal").st_size / 2**20, 2)
            except OSError:
                pass
            pid = self.d.live_pid
            if pid is not None:
                try:
                    p = dt.proc_sample(pid)
                    s.update(pid=pid, run=len(self.d.runs), rss_mb=round(p["VmRSS"] / 1024, 1),
                             fds=p["fds"], threads=p["Threads"])
                except (OSError, KeyError, ValueError):
                    pass  # gone (killed) or a zombie
            self.samples.append(s)


class Receiver:
    """The webhook's receiving end: an HTTP server in this process that records every POST."""

    def __init__(self) -> None:
        self.port = free_port()
        self.got: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def up(self) -> None:
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    obj = json.loads(body)
                except ValueError:
                    obj = {}
                with rec.lock:
                    rec.got.append({"header_key": self.headers.get("Idempotency-Key"), "key": obj.get("key"),
                                    "id": obj.get("id"), "at": time.time()})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        for attempt in range(50):  # the port was ours a moment ago; TIME_WAIT is allowed by reuse
            try:
                self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise OSError(f"webhook receiver cannot listen on port {self.port} again")
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def keys(self) -> set[str]:
        with self.lock:
            return {g["header_key"] for g in self.got}


class Flood(threading.Thread):
    """`target` idle TCP connections to the daemon's HTTP port, each replaced when the daemon
    closes it (at most `max_rate` new ones a second): a sustained connection flood."""

    def __init__(self, port: int, target: int, max_rate: float = 200.0) -> None:
        super().__init__(name="flood", daemon=True)
        self.addr = ("127.0.0.1", port)
        self.target, self.max_rate = target, max_rate
        self.stop_ev = threading.Event()
        self.opened = self.closed_by_daemon = self.failed = self.max_open = 0

    def run(self) -> None:
        socks: dict[int, socket.socket] = {}
        poller = select.poll()
        budget = 0.0
        last = time.monotonic()
        try:
            while not self.stop_ev.is_set():
                now = time.monotonic()
                budget = min(self.max_rate, budget + (now - last) * self.max_rate)
                last = now
                while len(socks) < self.target and budget >= 1:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setblocking(False)
                    rc = s.connect_ex(self.addr)
                    if rc not in (0, errno.EINPROGRESS):
                        s.close()
                        self.failed += 1
                        break
                    socks[s.fileno()] = s
                    poller.register(s.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
                    self.opened += 1
                    budget -= 1
                self.max_open = max(self.max_open, len(socks))
                for fd, _ev in poller.poll(100):
                    s = socks.get(fd)
                    if s is None:
                        continue
                    try:
                        gone = s.recv(1, socket.MSG_PEEK) == b""
                    except BlockingIOError:
                        gone = False
                    except OSError:
                        gone = True
                    if gone:
                        poller.unregister(fd)
                        del socks[fd]
                        s.close()
                        self.closed_by_daemon += 1
        finally:
            for s in socks.values():
                s.close()


def wait_until(pred: Any, timeout: float, poll_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def recorded(led: LedgerView, items: list[Item]) -> int:
    have = led.paths()
    return sum(db_key(it.path) in have for it in items)


# ------------------------------------------------------------------------------ the run


@dataclass
class Run:
    args: argparse.Namespace
    clock: Clock
    d: SoakDaemon
    led: LedgerView
    rx: Receiver
    rng: np.random.Generator
    statefs: Path | None  # the tmpfs mount point, None if mounting was not permitted
    written: list[Item] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    bursts: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)  # exits nobody asked for
    sampler: Sampler | None = None

    def event(self, what: str, **detail: Any) -> None:
        e = {"t": self.clock.t(), "wall": datetime.now(timezone.utc).strftime("%H:%M:%S"), "what": what, **detail}
        self.events.append(e)
        print(f"  [{e['t']:7.1f} s] {what} {json.dumps(detail, default=str) if detail else ''}", flush=True)

    def write(self, items: list[Item], burst: int) -> None:
        for it in items:
            it.burst = burst
            write_item(self.d, it)
            self.written.append(it)

    def expected_now(self) -> int:
        """Rows the ledger should hold by now: every file written, except empty/truncated ones
        still inside their grace period (plus a margin)."""
        cutoff = time.time() - GRACE_S - 5.0
        return sum(1 for it in self.written if it.kind not in INCOMPLETE_KINDS or it.written_at < cutoff)

    def catch_up(self, timeout: float) -> bool:
        return self.wait(lambda: self.led.count() >= self.expected_now(), timeout)

    def wait(self, pred: Any, timeout: float, poll_s: float = 0.25) -> bool:
        """wait_until, minding the daemon meanwhile (see watchdog)."""
        def check() -> bool:
            self.watchdog()
            return bool(pred())
        return wait_until(check, timeout, poll_s)

    def watchdog(self) -> None:
        """A daemon that exited although nobody stopped it is a finding: note it (a check fails),
        and start it again so the run goes on."""
        d = self.d
        if d.live_pid is None or d.proc is None or d.proc.poll() is None:
            return
        code = d.proc.returncode
        d.live_pid = None
        if d.runs:
            d.runs[-1].update(ended_t=self.clock.t(), end="exited on its own", exit=code)
        self.unexpected.append({"t": self.clock.t(), "exit": code, "log_tail": d.log_tail(20)})
        self.event("DAEMON EXITED ON ITS OWN", exit=code)
        for _ in range(12):
            try:
                self.restart("after exiting on its own")
                return
            except DaemonProcessError as e:
                self.event("restart failed", error=str(e).splitlines()[0])
                time.sleep(5.0)
        raise DaemonProcessError("the daemon exited on its own and could not be started again")

    def restart(self, why: str) -> None:
        ready = self.d.begin(self.clock, why)
        self.event("restarted", why=why, pid=self.d.pid, ready_s=round(ready, 2))


def fault_kill9(r: Run, burst: list[Item], b: int) -> dict[str, Any]:
    split = int(len(burst) * r.rng.uniform(0.3, 0.8))
    before = r.led.count()
    r.write(burst[:split], b)
    time.sleep(r.rng.uniform(0.2, 2.0))  # the daemon is busy with the burst
    rows_at_kill = r.led.count() - before
    r.d.end(r.clock, "kill -9")
    r.event("kill -9", pid=r.d.pid, burst_rows_recorded=rows_at_kill, of_written=split)
    r.write(burst[split:], b)  # arrives while the daemon is down
    time.sleep(r.rng.uniform(0.0, 1.5))
    r.restart("after kill -9")
    return {"fault": "kill -9", "detail": f"after {split} of {len(burst)} files, {rows_at_kill} of them "
                                          f"recorded; the other {len(burst) - split} written while down"}


def fault_kill9_startup(r: Run, burst: list[Item], b: int) -> dict[str, Any]:
    r.write(burst, b)
    time.sleep(r.rng.uniform(0.1, 1.0))
    r.d.end(r.clock, "kill -9")
    r.event("kill -9", pid=r.d.pid)
    r.d.begin(r.clock, "after kill -9, killed again during start-up", wait_ready=False)
    t0 = time.monotonic()

    def listening() -> bool:
        try:
            r.d.get("/healthz", timeout=1.0)
            return True
        except OSError:
            return False

    # The second kill comes as soon as HTTP answers (model loaded, ledger open) or a moment after:
    # while the start-up rescan walks the folder, before /readyz says 200.
    if not wait_until(listening, 120.0, 0.05):
        raise DaemonProcessError(f"not listening 120 s after the start; the log ends:\n{r.d.log_tail()}")
    time.sleep(r.rng.uniform(0.0, 0.3))
    try:
        ready_code: int | None = r.d.get("/readyz", timeout=1.0).status
    except OSError:
        ready_code = None
    after = time.monotonic() - t0
    r.d.end(r.clock, "kill -9")
    r.event("kill -9 during start-up", pid=r.d.pid, after_s=round(after, 2), readyz=ready_code)
    r.restart("after kill -9 during start-up")
    return {"fault": "kill -9, then kill -9 during start-up",
            "detail": f"second kill {after:.1f} s after the start, as HTTP came up (/readyz then: "
                      f"{ready_code or 'no answer'}; 503 = start-up rescan not done)"}


def fault_sigterm(r: Run, burst: list[Item], b: int) -> dict[str, Any]:
    split = int(len(burst) * r.rng.uniform(0.4, 0.8))
    r.write(burst[:split], b)
    time.sleep(r.rng.uniform(0.2, 1.5))
    pid = r.d.pid
    code, took = r.d.end(r.clock, "SIGTERM")
    r.event("SIGTERM", pid=pid, exit=code, stop_s=round(took, 2))
    r.write(burst[split:], b)
    r.restart("after SIGTERM")
    return {"fault": "SIGTERM", "detail": f"exit status {code} after {took:.2f} s",
            "exit": code, "stop_s": took}


def listen_drops() -> dict[str, int]:
    """The kernel's counters of connections refused at a full listen queue (all sockets)."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
                 if line.startswith("TcpExt:")]
        table = dict(zip(lines[0][1:], map(int, lines[1][1:])))
        return {k: table[k] for k in ("ListenOverflows", "ListenDrops")}
    except (OSError, IndexError, KeyError, ValueError):
        return {}


def fault_flood(r: Run, burst: list[Item], b: int) -> dict[str, Any]:
    drops0 = listen_drops()
    fl = Flood(r.d.port, r.args.flood_conns)
    fl.start()
    wait_until(lambda: fl.opened >= r.args.flood_conns, 10.0, 0.1)
    t_on = r.clock.t()
    r.event("flood on", connections=fl.opened)
    probes: list[tuple[int | None, float]] = []
    t_end = time.monotonic() + r.args.flood_s
    rows0 = r.led.count()
    r.write(burst, b)
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        try:
            status = r.d.get("/metrics", timeout=10.0).status
        except OSError:
            status = None
        probes.append((status, time.monotonic() - t0))
        time.sleep(0.5)
    fl.stop_ev.set()
    fl.join(10)
    t_off = r.clock.t()
    during = [x for x in (r.sampler.samples if r.sampler else []) if t_on <= x["t"] <= t_off and "fds" in x]
    fds_max = max((x["fds"] for x in during), default=None)
    threads_max = max((x["threads"] for x in during), default=None)
    scored = r.led.count() - rows0
    drops1 = listen_drops()
    overflows = drops1.get("ListenOverflows", 0) - drops0.get("ListenOverflows", 0) if drops0 else None
    lat = [x for _, x in probes]
    slow = [x for x in lat if x > 1.0]
    ok = sum(1 for s, _ in probes if s == 200)
    r.event("flood off", opened=fl.opened, closed_by_daemon=fl.closed_by_daemon, max_open=fl.max_open,
            metrics_ok=ok, metrics_probes=len(probes), rows_during=scored)
    return {"fault": f"connection flood ({r.args.flood_conns} idle connections, {r.args.flood_s:g} s)",
            "detail": f"{fl.opened} connections opened, {fl.closed_by_daemon} closed by the daemon (at most "
                      f"{fl.max_open} open at once on this side; the daemon at most {fds_max} open files and "
                      f"{threads_max} threads); /metrics {ok}/{len(probes)} answered 200, latency median "
                      f"{np.median(lat) * 1000:.0f} ms, p90 {dt.pct(lat, 90) * 1000:.0f} ms, max "
                      f"{max(lat) * 1000:.0f} ms; {scored} verdicts meanwhile; the kernel's listen-queue overflows "
                      f"meanwhile: {overflows}" + (
                          f". {len(slow)} probe(s) over 1 s: a connection attempt that meets a full listen "
                          "queue is dropped and retried by the kernel after 1 s, then 2 s more" if slow else ""),
            "probes": len(probes), "probes_ok": ok, "probe_max_s": max(lat), "probe_median_s": float(np.median(lat)),
            "opened": fl.opened, "closed_by_daemon": fl.closed_by_daemon, "rows_during": scored,
            "daemon_fds_max": fds_max, "daemon_threads_max": threads_max,
            "probe_s": [round(x, 4) if st == 200 else None for st, x in probes], "listen_overflows": overflows}


def fill(path: Path) -> int:
    """Write zeros to `path` until the file system says ENOSPC; returns the bytes added."""
    added = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = 1 << 20
        while size >= 512:
            try:
                added += os.write(fd, b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    return added


def fault_disk_full(r: Run, burst: list[Item], b: int) -> dict[str, Any]:
    assert r.statefs is not None
    ballast = r.statefs / "ballast"
    rows0 = r.led.count()
    added = fill(ballast)
    free_kb = os.statvfs(r.statefs).f_bavail * os.statvfs(r.statefs).f_frsize // 1024
    t_full = r.clock.t()
    r.event("disk full", ballast_mb=round(added / 2**20, 1), free_kb=free_kb)
    r.write(burst, b)
    ready_codes: Counter[str] = Counter()
    t_end = time.monotonic() + r.args.disk_full_s
    topped = 0
    while time.monotonic() < t_end:
        topped += fill(ballast)  # the daemon may free a little (anomalies/ pruning): take it too
        try:
            ready_codes[str(r.d.get("/readyz", timeout=5.0).status)] += 1
        except OSError as e:
            ready_codes[type(e).__name__] += 1
        time.sleep(0.5)
    during = recorded(r.led, burst)
    rows_during = r.led.count() - rows0
    ballast.unlink()
    t_free_wall, t_free = time.time(), r.clock.t()
    r.event("disk freed", burst_recorded_while_full=during, of_burst=len(burst), rows_while_full=rows_during,
            readyz=dict(ready_codes))
    # No restart until the burst is recorded: it must come in through the daemon's own retries
    # (the periodic rescan), not through the next start's rescan.
    limit = RECONCILE_S + GRACE_S + 15.0
    seen_at: float | None = None
    ok = r.wait(lambda: recorded(r.led, burst) == len(burst), limit + 30.0, 0.5)
    if ok:
        seen_at = time.time() - t_free_wall
    last_s = None
    if ok:
        keys = [db_key(it.path) for it in burst]
        got = r.led.c().execute(
            f"SELECT MAX(scored_at) FROM images WHERE path IN ({','.join('?' * len(keys))})", keys).fetchone()[0]
        last_s = max(0.0, float(got) - t_free_wall) if got is not None else None
    r.event("disk-full burst recorded" if ok else "disk-full burst NOT all recorded",
            recorded=recorded(r.led, burst), of=len(burst), last_verdict_after_free_s=last_s,
            observed_after_s=seen_at)
    return {"fault": f"disk full ({r.args.tmpfs_mb} MB tmpfs filled by a ballast file, {r.args.disk_full_s:g} s)",
            "detail": f"{len(burst)} files arrived while full, {during} recorded while full (/readyz: "
                      f"{dict(ready_codes)}); freed at t={t_free:.0f} s; all {len(burst)} recorded: "
                      f"{ok}, the last {'-' if last_s is None else f'{last_s:.1f}'} s after space returned "
                      f"(limit {limit:g} s = reconcile_interval_s + incomplete_grace_s + 15 s)",
            "all_recorded": ok, "last_after_free_s": last_s, "limit_s": limit, "t_full": t_full,
            "t_free": t_free, "burst": len(burst), "recorded_while_full": during,
            "topped_up_kb": topped // 1024}


def fault_webhook_down(r: Run, bursts: list[list[Item]], b: int) -> dict[str, Any]:
    alerts0 = r.led.c().execute("SELECT COUNT(*) FROM alerts").fetchone()[0]
    r.rx.down()
    t_down = time.monotonic()
    r.event("webhook receiver down")
    first = bursts[0]
    half = len(first) // 2
    r.write(first[:half], b)
    r.catch_up(60.0)
    r.d.end(r.clock, "kill -9")
    r.event("kill -9 (webhook down)", pid=r.d.pid)
    r.write(first[half:], b)
    r.restart("after kill -9 during the webhook outage")
    for k, more in enumerate(bursts[1:], start=1):
        r.write(more, b + k)
        r.catch_up(60.0)
    left = r.args.webhook_down_s - (time.monotonic() - t_down)
    if left > 0:
        time.sleep(left)
    raised = r.led.c().execute("SELECT COUNT(*) FROM alerts").fetchone()[0] - alerts0
    got_before = len(r.rx.got)
    r.rx.up()
    r.event("webhook receiver up", alerts_raised_while_down=raised)
    return {"fault": f"webhook receiver down ({r.args.webhook_down_s:g} s), one kill -9 meanwhile",
            "detail": f"{raised} alerts raised while it was down ({got_before} deliveries before the outage)",
            "raised_while_down": raised}


# ------------------------------------------------------------------------------ the checks


def check_all(r: Run, items: list[Item], final: dict[str, Any]) -> list[dict[str, Any]]:
    from anomon.ledger import alerts_after, from_db_path

    checks: list[dict[str, Any]] = []

    def add(name: str, ok: bool, value: str) -> None:
        checks.append({"check": name, "pass": bool(ok), "value": value})

    conn = r.led.c()
    rows = conn.execute("SELECT id, path, typeof(path) AS t, sha256, verdict, reason FROM images").fetchall()
    by_path: dict[Any, list[sqlite3.Row]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    want = {db_key(it.path): it for it in items}

    missing = [it.path for k, it in want.items() if k not in by_path]
    multi = {k: len(v) for k, v in by_path.items() if len(v) > 1}
    extra = [from_db_path(k) for k in by_path if k not in want]
    wrong_sha = [it.path for k, it in want.items() if k in by_path and by_path[k][0]["sha256"] != it.sha]
    add("every file dropped has exactly one row (path + sha256)",
        not missing and not multi and not wrong_sha,
        f"{len(items)} files, {len(rows)} rows; missing {len(missing)}, with more than one row {len(multi)}, "
        f"sha256 differs {len(wrong_sha)}" + (f"; e.g. missing {missing[:3]}" if missing else "")
        + (f"; e.g. doubled {[(from_db_path(k), n) for k, n in list(multi.items())[:3]]}" if multi else ""))
    dup_sha = conn.execute("SELECT COUNT(*) FROM (SELECT path, sha256 FROM images WHERE sha256 IS NOT NULL "
                           "GROUP BY path, sha256 HAVING COUNT(*) > 1)").fetchone()[0]
    add("no duplicate rows, no rows for files never dropped", not multi and dup_sha == 0 and not extra
        and len(rows) == len(items),
        f"{len(rows)} rows for {len(items)} files; paths with >1 row {len(multi)}, (path, sha256) pairs with "
        f">1 row {dup_sha}, rows for unknown paths {len(extra)}")

    for kind in BAD_KINDS:
        its = [it for it in items if it.kind == kind]
        got = Counter((by_path[db_key(it.path)][0]["verdict"], by_path[db_key(it.path)][0]["reason"])
                      for it in its if db_key(it.path) in by_path)
        good = got.get(("error", kind), 0)
        add(f"bad files, {kind}: one error row with reason \"{kind}\"", good == len(its),
            f"{good}/{len(its)}" + (f"; got {dict(got)}" if good != len(its) else ""))
    valid = [it for it in items if it.kind in ("normal", "anomalous")]
    vgot = Counter(by_path[db_key(it.path)][0]["verdict"] if db_key(it.path) in by_path else "missing"
                   for it in valid)
    errs = Counter(by_path[db_key(it.path)][0]["reason"] for it in valid
                   if db_key(it.path) in by_path and by_path[db_key(it.path)][0]["verdict"] == "error")
    add("valid images: a verdict (normal/anomalous), never an error row", vgot.get("error", 0) == 0
        and vgot.get("missing", 0) == 0,
        f"{len(valid)} images: normal {vgot.get('normal', 0)}, anomalous {vgot.get('anomalous', 0)}, "
        f"error {vgot.get('error', 0)}{' ' + str(dict(errs)) if errs else ''}, missing {vgot.get('missing', 0)}")
    odd = [it for it in items if it.odd]
    blob = sum(1 for it in odd if db_key(it.path) in by_path and by_path[db_key(it.path)][0]["t"] == "blob"
               and from_db_path(by_path[db_key(it.path)][0]["path"]) == it.path)
    add("names that are not UTF-8: one row each, path stored as BLOB bytes", blob == len(odd),
        f"{blob}/{len(odd)}")

    alert_rows = conn.execute("SELECT a.id, a.image_id, i.verdict FROM alerts a LEFT JOIN images i "
                              "ON i.id = a.image_id").fetchall()
    per_image = Counter(a["image_id"] for a in alert_rows)
    anomalous_ids = {row["id"] for row in rows if row["verdict"] == "anomalous"}
    no_alert = [i for i in anomalous_ids if per_image.get(i, 0) == 0]
    many = [i for i, n in per_image.items() if n > 1]
    stray = [a["id"] for a in alert_rows if a["verdict"] != "anomalous"]
    add("every anomalous row has exactly one alert (and alerts only for those)", not no_alert and not many
        and not stray, f"{len(anomalous_ids)} anomalous rows, {len(alert_rows)} alerts; without an alert "
                       f"{len(no_alert)}, with more than one {len(many)}, alerts for other rows {len(stray)}")

    alerts = alerts_after(conn, 0, 10**9)
    keys = {a["id"]: a["key"] for a in alerts}
    jsonl = r.d.state / "alerts.jsonl"
    ids: Counter[int] = Counter()
    bad_lines = 0
    key_mismatch = 0
    if jsonl.exists():
        for line in jsonl.read_bytes().splitlines():
            try:
                obj = json.loads(line)
                ids[int(obj["id"])] += 1
                if keys.get(int(obj["id"])) != obj.get("key"):
                    key_mismatch += 1
            except (ValueError, KeyError, TypeError):
                bad_lines += 1
    twice = [i for i, n in ids.items() if n > 1]
    absent = [i for i in keys if i not in ids]
    unknown = [i for i in ids if i not in keys]
    add("alerts.jsonl holds each alert id exactly once", not twice and not absent and not unknown
        and not bad_lines and not key_mismatch,
        f"{sum(ids.values())} lines for {len(keys)} alerts; ids twice {len(twice)}, absent {len(absent)}, unknown "
        f"{len(unknown)}, unreadable lines {bad_lines}, keys differing from the ledger {key_mismatch}")

    with r.rx.lock:
        got = list(r.rx.got)
    received = Counter(g["header_key"] for g in got)
    want_keys = set(keys.values())
    undelivered = want_keys - set(received)
    stray_keys = set(received) - want_keys
    id_of_key = {v: k for k, v in keys.items()}
    inconsistent = sum(1 for g in got if g["key"] != g["header_key"] or id_of_key.get(g["header_key"]) != g["id"])
    dups = sum(n - 1 for n in received.values() if n > 1)
    add("webhook: every alert key received at least once; duplicates only with the same key",
        not undelivered and not stray_keys and not inconsistent,
        f"{len(got)} deliveries, {len(set(received))} distinct keys for {len(want_keys)} alerts; undelivered "
        f"{len(undelivered)}, unknown keys {len(stray_keys)}, body not matching its key {inconsistent}; "
        f"repeated deliveries {dups} (same key)")
    dead = r.d.state / "webhook-dead-letter.jsonl"
    n_dead = len(dead.read_bytes().splitlines()) if dead.exists() else 0
    add("webhook: nothing dead-lettered (an outage is retried, never dropped)", n_dead == 0, f"{n_dead} lines")

    terms = [f for f in r.faults if f["fault"] == "SIGTERM"] + final.get("sigterms", [])
    slow = [f for f in terms if f.get("exit") != 0 or f.get("stop_s", 0) > STOP_TIMEOUT_S + 2]
    add(f"SIGTERM: exit status 0 within stop_timeout_s ({STOP_TIMEOUT_S:g} s)", not slow,
        ", ".join(f"{f.get('exit')} in {f.get('stop_s', 0):.1f} s" for f in terms))
    floods = [f for f in r.faults if "probes" in f]
    add("connection flood: /metrics answered 200 every time", all(f["probes_ok"] == f["probes"] for f in floods),
        "; ".join(f"{f['probes_ok']}/{f['probes']}, max {f['probe_max_s'] * 1000:.0f} ms" for f in floods))
    disks = [f for f in r.faults if "all_recorded" in f]
    if disks:
        add("disk full: the burst that arrived meanwhile is recorded after space returns, by the periodic "
            "rescan at the latest", all(f["all_recorded"] and f["last_after_free_s"] is not None
                                        and f["last_after_free_s"] <= f["limit_s"] for f in disks),
            "; ".join(f"{f['burst']} files, last verdict {f['last_after_free_s'] or float('nan'):.1f} s after freeing "
                      f"(limit {f['limit_s']:g} s)" for f in disks))
    add("the daemon never exited unless stopped", not r.unexpected,
        "; ".join(f"exit {u['exit']} at t={u['t']:.0f} s" for u in r.unexpected) or "no unexpected exit")
    fr = final.get("fresh_s")
    add(f"after the final restart a fresh image is scored within {FRESH_LATENCY_S:g} s",
        fr is not None and fr <= FRESH_LATENCY_S,
        f"{fr * 1000:.0f} ms (rename -> scored_at)" if fr is not None else "not scored")
    extra_rows = final.get("rows_after_restart_extra")
    add("the final restart scores nothing again (rescan of all files: no new rows)", extra_rows == 0,
        f"{extra_rows} new rows besides the fresh image")
    return checks


# ------------------------------------------------------------------------------ the report


def run_table(d: SoakDaemon, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for run in d.runs:
        ss = [s for s in samples if s.get("pid") == run["pid"] and "rss_mb" in s]
        row = dict(run)
        if ss:
            row.update(samples=len(ss), rss_first=ss[0]["rss_mb"], rss_last=ss[-1]["rss_mb"],
                       rss_max=max(s["rss_mb"] for s in ss), fds_first=ss[0]["fds"], fds_last=ss[-1]["fds"],
                       fds_max=max(s["fds"] for s in ss), threads_max=max(s["threads"] for s in ss))
        out.append(row)
    return out


def log_summary(d: SoakDaemon) -> tuple[dict[str, int], list[tuple[str, int, str]], int]:
    """Log lines by level; warnings and errors grouped by message shape; tracebacks."""
    import re

    levels: Counter[str] = Counter()
    shapes: dict[str, list[Any]] = {}
    tracebacks = 0
    for rec in d.log_lines():
        level = str(rec.get("level", "non-json")).lower()
        levels[level] += 1
        if "exc" in rec:
            tracebacks += 1
        if level in ("warning", "error", "critical", "non-json"):
            msg = str(rec.get("msg"))
            shape = re.sub(r"/[^\s:'\"]+", "PATH", msg)
            shape = re.sub(r"\d+(\.\d+)?", "N", shape)[:140]
            ent = shapes.setdefault(f"{level}: {shape}", [0, msg[:300] + (
                " | " + str(rec["exc"]).strip().splitlines()[-1][:200] if "exc" in rec else "")])
            ent[0] += 1
    top = sorted(((k, v[0], v[1]) for k, v in shapes.items()), key=lambda x: -x[1])
    return dict(levels), top, tracebacks


def report(ctx: dict[str, Any], r: Run, checks: list[dict[str, Any]], runs: list[dict[str, Any]],
           logs: tuple[dict[str, int], list[tuple[str, int, str]], int]) -> str:
    passed = sum(c["pass"] for c in checks)
    L = [
        f"# Fault soak ({ctx['date']})",
        "",
        f"Command: `{ctx['command']}`  ",
        f"Date: {ctx['date']}; host: {ctx['nproc']} CPU(s), {platform.machine()}, Python "
        f"{platform.python_version()}; wall time {ctx['wall_s'] / 60:.1f} min  ",
        f"Daemon code: {ctx['code']}; run with OMP_NUM_THREADS=1  ",
        f"Load average (1/5/15 min): at start {ctx['load_start']}, at end {ctx['load_end']}; 1-min load during the "
        f"run: mean {ctx['load_mean']:.2f}, max {ctx['load_max']:.2f} (a shared 2-core VM; other jobs ran too)  ",
        f"Model: {ctx['model_desc']}  ",
        f"Files: {ctx['n']} ({ctx['mix']}); about 15 % written in place, the rest written to a hidden name "
        f"and renamed in; in {len(r.bursts)} bursts of {ctx['burst_min']}-{ctx['burst_max']}.  ",
        f"Daemon: default settings apart from paths, `device = \"cpu\"`, a webhook to a receiver in this "
        f"process, `anomalies_max_bytes = {ANOMALIES_MAX_BYTES // 2**20} MiB`; state folder: {ctx['state_desc']}; "
        f"at the end: {ctx['state_sizes']}.",
        "",
        f"**{passed} of {len(checks)} checks passed.**",
        "",
        "| check | result | |",
        "|---|---|---|",
    ]
    L += [f"| {c['check']} | {c['value']} | {'pass' if c['pass'] else '**FAIL**'} |" for c in checks]
    L += [
        "",
        "## Faults injected",
        "",
        "| t (s) | UTC | fault | what happened |",
        "|---|---|---|---|",
    ]
    L += [f"| {f['t']:.0f} | {f['wall']} | {f['fault']} | {f['detail']} |" for f in r.faults]
    if ctx.get("skipped"):
        L += ["", f"**Skipped:** {ctx['skipped']}"]
    L += [
        "",
        "## Throughput",
        "",
        f"- Overall, faults and their waits included: {ctx['n']} files from the first write to the last "
        f"verdict in {ctx['span_s']:.0f} s = {ctx['n'] / ctx['span_s']:.1f} files/s.",
        f"- Bursts without a fault (written at full speed, then waited for; empty and truncated files, which wait "
        f"incomplete_grace_s, left out): median {ctx['burst_rate_median']:.1f} files/s (min "
        f"{ctx['burst_rate_min']:.1f}, max {ctx['burst_rate_max']:.1f}; {ctx['burst_rate_n']} bursts).",
        f"- Verdicts: {ctx['verdicts']}; the painted defects flagged {ctx['defects_flagged']}, "
        f"normal textures flagged {ctx['normals_flagged']} (a 2-epoch model: speed, not accuracy).",
        "",
        "## Memory and open files of the daemon, per process",
        "",
        "Sampled once a second from /proc/PID (VmRSS, open descriptors, threads). Every fault ends a process, so "
        "each run is short except the last stretch of bursts, which runs without faults.",
        "",
        "| run | pid | started (t s) | ready | ended (t s) | how | RSS first / max / last (MB) | open fds first "
        "/ max / last | threads max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in runs:
        rd = f"{x['ready_s']:.1f} s" if x.get("ready_s") is not None else "(killed during start-up)"
        mem = (f"{x['rss_first']:.0f} / {x['rss_max']:.0f} / {x['rss_last']:.0f}" if "rss_first" in x else "-")
        fds = f"{x['fds_first']} / {x['fds_max']} / {x['fds_last']}" if "fds_first" in x else "-"
        L.append(f"| {x['run']} | {x['pid']} | {x['started_t']:.0f} | {rd} | "
                 f"{x['ended_t'] if x['ended_t'] is not None else '-'} | {x['end'] or '-'} "
                 f"{'(' + str(x['exit']) + ')' if x.get('exit') is not None else ''} | {mem} | {fds} | "
                 f"{x.get('threads_max', '-')} |")
    L += [
        "",
        f"- Start vs end: the first process right after it was ready {ctx['rss_start']}, the last process at the "
        f"end {ctx['rss_end']}.",
        f"- The undisturbed stretch (run {ctx['soak_run']}, {ctx['soak_images']} verdicts over {ctx['soak_s']:.0f} s): "
        f"RSS median of its first vs last quarter of samples {ctx['soak_rss']}; open fds {ctx['soak_fds']}.",
        "",
        "## The daemon's log",
        "",
        f"Lines by level: {', '.join(f'{k} {v}' for k, v in sorted(logs[0].items()))}; with a traceback: {logs[2]}. "
        "Warnings and errors, grouped by message shape (count, one example):",
        "",
    ]
    L += [f"- {n} x `{shape}`: {ex.replace('|', '/')}" for shape, n, ex in logs[1][:15]] or ["- none"]
    L += [
        "",
        "## How it is measured",
        "",
        "Every file's expected row is known in advance: its path (as the ledger stores it: text, or the raw "
        "bytes for a name that is not UTF-8) and the SHA-256 of the bytes written; each bad file was checked, "
        "before the run, to fail decoding with the reason it is meant to have. Between bursts the bench waits "
        "(at most 60 s) until the ledger holds a row for every file written, except empty and truncated ones "
        f"still inside incomplete_grace_s ({GRACE_S:g} s). At the end it waits until the ledger covers every file, "
        "stops the daemon with SIGTERM, starts it again, drops one fresh image (latency = its row's scored_at "
        "minus the rename), waits until the webhook receiver holds every alert key, stops the daemon and reads "
        "the ledger (read-only), alerts.jsonl and webhook-dead-letter.jsonl. The flood opens non-blocking TCP "
        "connections that never send a byte and replaces each one the daemon closes (at most 200 new ones a "
        "second), while /metrics is fetched every 0.5 s. The full disk is a ballast file on the state folder's "
        "tmpfs, written until ENOSPC and topped up every 0.5 s while held. The webhook receiver is an HTTP "
        "server in this process; while it is down nothing listens on its port (connection refused).",
    ]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------ main


def snapshot_code(dest: Path) -> str:
    """Run `anomon train` and the daemon from anomon/ as committed at HEAD, copied to `dest`.

    Others may be editing the tree, and every restart of the daemon imports it afresh: without a
    snapshot one soak could mix several versions of the daemon, and half-made edits. The copy is
    put first on the children's path (PYTHONPATH, with PYTHONSAFEPATH so that the working
    directory does not come before it). Returns what was run, for the results."""
    def git(*a: str) -> str:
        got = subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO)
        return got.stdout.rstrip() if got.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "anomon").splitlines()]
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD", "anomon"], capture_output=True, cwd=REPO)
    if not head or archive.returncode != 0 or subprocess.run(
            ["tar", "-x", "-C", str(dest)], input=archive.stdout).returncode != 0:
        return "the working tree (not a git checkout: no snapshot)"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(dest), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONSAFEPATH"] = "1"
    return f"anomon/ as committed at {head}" + (
        f" (uncommitted changes in the tree, not used: {', '.join(dirty)})" if dirty else "")


def plan_bursts(items: list[Item], rng: np.random.Generator, lo: int, hi: int) -> list[list[Item]]:
    out, i = [], 0
    while i < len(items):
        k = int(rng.integers(lo, hi + 1))
        out.append(items[i : i + k])
        i += k
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, help="files to drop (default 20000; 1000 with --quick)")
    p.add_argument("--quick", action="store_true", help="1,000 files and shorter faults, for trying")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help=f"markdown results (default {RESULTS.relative_to(REPO)}; the .json beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, help="a 64x64 greyscale model bundle instead of training one")
    p.add_argument("--workdir", type=Path, help="keep everything here, the state folder copied out of the "
                                                "tmpfs (default: a temporary folder, removed)")
    p.add_argument("--tmpfs-mb", type=int, default=20,
                   help="size of the state folder's tmpfs in MB (default 20; 20,000 images need ~16: "
                        "ledger ~8, WAL ~4, alerts.jsonl ~1, anomalies/ 2)")
    p.add_argument("--flood-conns", type=int, default=400)
    args = p.parse_args(argv)
    args.n = args.n or (1000 if args.quick else 20000)
    if args.n < 200:
        p.error("--n must be at least 200")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        p.error(f"--workdir {args.workdir} must be a new or empty folder")
    scale = 0.5 if args.quick else 1.0
    args.flood_s = 30.0 * scale
    args.disk_full_s = 30.0 * scale
    args.webhook_down_s = 60.0 * scale

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # `anomon train` too: a shared 2-core machine
    dt.IMAGE_SIZE = IMAGE_SIZE  # daemon_throughput's Textures and build_model read it when called
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)]
                                   + (argv if argv is not None else sys.argv[1:]))
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="anomon-fault-soak-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    ctx: dict[str, Any] = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "nproc": os.cpu_count(), "load_start": dt.loadavg(), "n": args.n}
    ctx["code"] = snapshot_code(work / "code")
    print(f"workdir {work}; load {ctx['load_start']}; daemon code: {ctx['code']}", flush=True)

    statefs: Path | None = work / "statefs"
    statefs.mkdir()
    mounted = False
    try:
        got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mb}m", "tmpfs", str(statefs)],
                             capture_output=True, text=True)
        mounted = got.returncode == 0
        why_not = (got.stderr or got.stdout).strip()
    except OSError as e:
        why_not = str(e)
    if mounted:
        ctx["state_desc"] = f"on a {args.tmpfs_mb} MB tmpfs of its own (`mount -t tmpfs -o size={args.tmpfs_mb}m`)"
    else:
        ctx["skipped"] = (f"the disk_full fault: mounting a tmpfs for the state folder was not permitted "
                          f"({why_not or 'mount failed'}); the state folder is on the ordinary disk")
        ctx["state_desc"] = "on the ordinary disk (tmpfs not permitted, see below)"
        print(f"  NOTE: {ctx['skipped']}", flush=True)
        statefs = None
    state = (statefs or work) / "state"

    rx = Receiver()
    d: SoakDaemon | None = None
    sampler: Sampler | None = None
    led = LedgerView(state)
    try:
        tex = dt.Textures()
        if args.model:
            model, ctx["model_desc"] = args.model.resolve(), f"`{args.model}` (given)"
        else:
            print(f"training a {IMAGE_SIZE}x{IMAGE_SIZE} model (2 epochs; speed, not accuracy) ...", flush=True)
            model, ctx["model_desc"] = dt.build_model(work, tex, 60, 100, 2)
        print(f"generating {args.n} files ...", flush=True)
        items = make_items(args.n, tex, args.seed)
        kinds = Counter(it.kind for it in items)
        ctx["mix"] = ", ".join(f"{k} {kinds[k]}" for k in ("normal", "anomalous", *BAD_KINDS)) + \
            f"; {sum(it.odd for it in items)} of them named with bytes that are not UTF-8"
        rng = np.random.default_rng(args.seed + 1)
        lo, hi = (20, 60) if args.quick else (200, 800)
        bursts = plan_bursts(items, rng, lo, hi)
        ctx["burst_min"], ctx["burst_max"] = min(map(len, bursts)), max(map(len, bursts))

        rx.up()
        d = SoakDaemon(work, model, state, rx.url)
        r = Run(args, clock, d, led, rx, rng, statefs)
        faults = [f for f in FAULTS if statefs is not None or f != "disk_full"]
        # Faults on evenly spaced bursts of the first ~60 %; the rest run undisturbed.
        span = max(len(faults) + 1, int(len(bursts) * 0.6))
        at = {1 + round(k * (span - 1) / len(faults)): f for k, f in enumerate(faults)}
        sampler = r.sampler = Sampler(d, clock)
        sampler.start()
        r.restart("first start")
        t_first = time.time()
        b = 0
        while b < len(bursts):
            fault = at.get(b)
            t_fault = clock.t()
            wall = datetime.now(timezone.utc).strftime("%H:%M:%S")
            id0 = led.c().execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
            t0 = time.time()
            if fault == "webhook_down":
                take = bursts[b : b + 2]
                res = fault_webhook_down(r, take, b)
                r.bursts += [{"burst": b + k, "n": len(x), "fault": fault} for k, x in enumerate(take)]
                b += len(take)
            else:
                burst = bursts[b]
                if fault is None:
                    r.write(burst, b)
                    res = None
                else:
                    res = {"kill9": fault_kill9, "kill9_startup": fault_kill9_startup, "sigterm": fault_sigterm,
                           "flood": fault_flood, "disk_full": fault_disk_full}[fault](r, burst, b)
                caught = r.catch_up(60.0)
                info: dict[str, Any] = {"burst": b, "n": len(burst), "fault": fault, "caught_up": caught}
                if fault is None and caught:
                    # Empty and truncated files wait incomplete_grace_s for their verdict: not speed.
                    new, last = led.c().execute(
                        "SELECT COUNT(*), MAX(scored_at) FROM images WHERE id > ? AND NOT (verdict = 'error' "
                        "AND reason IN ('empty', 'truncated'))", (id0,)).fetchone()
                    if last and last > t0:
                        info["rate"] = new / (last - t0)
                r.bursts.append(info)
                b += 1
            if res is not None:
                res.update(t=t_fault, wall=wall)
                r.faults.append(res)
            print(f"  burst {b}/{len(bursts)}: {len(r.written)} written, {led.count()} rows"
                  + (f" ({fault})" if fault else ""), flush=True)
            time.sleep(float(rng.uniform(0.0, 1.0)))

        print("quiet: waiting until the ledger covers every file ...", flush=True)
        t_q = time.monotonic()
        everything = r.wait(lambda: recorded(led, items) == len(items), RECONCILE_S + GRACE_S + 60.0, 1.0)
        r.event("quiet", all_recorded=everything, waited_s=round(time.monotonic() - t_q, 1))
        last = led.c().execute("SELECT MAX(scored_at) FROM images").fetchone()[0]
        ctx["span_s"] = float(last) - t_first
        soak_run = d.runs[-1]
        soak_ss = [s for s in sampler.samples if s.get("pid") == soak_run["pid"] and "rss_mb" in s]

        final: dict[str, Any] = {"sigterms": []}
        pid = d.pid
        code, took = d.end(clock, "SIGTERM")
        final["sigterms"].append({"exit": code, "stop_s": took})
        r.event("final SIGTERM", pid=pid, exit=code, stop_s=round(took, 2))
        rows_before = led.count()
        r.restart("final restart")
        fresh = Item("fresh_after_restart.png", "normal", dt.tagged(tex.png(30_000_000), "fresh"))
        r.write([fresh], len(bursts))
        items.append(fresh)
        ok = r.wait(lambda: recorded(led, [fresh]) == 1, 30.0, 0.05)
        if ok:
            row = led.c().execute("SELECT scored_at FROM images WHERE path = ?", (db_key(fresh.path),)).fetchone()
            final["fresh_s"] = float(row[0]) - fresh.written_at
        time.sleep(5.0)  # anything the start-up rescan wrongly took again would be in by now
        final["rows_after_restart_extra"] = led.count() - rows_before - (1 if ok else 0)
        r.event("final restart checked", fresh_s=final.get("fresh_s"),
                extra_rows=final["rows_after_restart_extra"])

        from anomon.ledger import alerts_after

        def all_delivered() -> bool:
            want = {a["key"] for a in alerts_after(led.c(), 0, 10**9)}
            return want <= rx.keys()

        t_w = time.monotonic()
        delivered = r.wait(all_delivered, 180.0, 1.0)
        r.event("webhook caught up" if delivered else "webhook NOT caught up",
                waited_s=round(time.monotonic() - t_w, 1))
        try:
            final["metrics"] = {k: v for k, v in d.metrics().items()
                                if k.startswith(("anomon_image_errors_total", "anomon_webhook", "anomon_rescans",
                                                 "anomon_images_scored_total", "anomon_duplicates"))}
        except (OSError, DaemonProcessError):
            final["metrics"] = {}
        time.sleep(2.0)  # alerts.jsonl is written as alerts are raised; let the exporter finish
        pid = d.pid
        code, took = d.end(clock, "SIGTERM")
        final["sigterms"].append({"exit": code, "stop_s": took})
        r.event("stopped", pid=pid, exit=code, stop_s=round(took, 2))
        sampler.stop_ev.set()
        sampler.join(5)

        checks = check_all(r, items, final)
        runs = run_table(d, sampler.samples)
        logs = log_summary(d)

        # figures for the report
        loads = [s["load1"] for s in sampler.samples]
        ctx.update(load_end=dt.loadavg(), load_mean=float(np.mean(loads)), load_max=float(max(loads)),
                   wall_s=time.monotonic() - clock.t0)
        rates = [x["rate"] for x in r.bursts if x.get("rate")]
        ctx.update(burst_rate_median=float(np.median(rates)) if rates else float("nan"),
                   burst_rate_min=min(rates, default=float("nan")), burst_rate_max=max(rates, default=float("nan")),
                   burst_rate_n=len(rates))
        rows = led.c().execute("SELECT path, verdict, reason FROM images").fetchall()
        mix = Counter(row["verdict"] if row["verdict"] != "error" else f"error:{row['reason']}" for row in rows)
        ctx["verdicts"] = ", ".join(f"{k} {v}" for k, v in sorted(mix.items()))
        verdict_of = {row["path"]: row["verdict"] for row in rows}
        defects = [it for it in items if it.kind == "anomalous"]
        normals = [it for it in items if it.kind == "normal"]
        ctx["defects_flagged"] = (f"{sum(verdict_of.get(db_key(it.path)) == 'anomalous' for it in defects)}"
                                  f"/{len(defects)}")
        ctx["normals_flagged"] = (f"{sum(verdict_of.get(db_key(it.path)) == 'anomalous' for it in normals)}"
                                  f"/{len(normals)}")
        first_run = runs[0] if runs else {}
        last_run = runs[-1] if runs else {}
        ctx["rss_start"] = (f"{first_run.get('rss_first', float('nan')):.0f} MB RSS, {first_run.get('fds_first')} "
                            f"open fds")
        ctx["rss_end"] = f"{last_run.get('rss_last', float('nan')):.0f} MB RSS, {last_run.get('fds_last')} open fds"
        ctx["soak_run"] = soak_run["run"]
        if len(soak_ss) >= 8:
            q = max(1, len(soak_ss) // 4)
            a = float(np.median([s["rss_mb"] for s in soak_ss[:q]]))
            z = float(np.median([s["rss_mb"] for s in soak_ss[-q:]]))
            ctx["soak_rss"] = f"{a:.0f} -> {z:.0f} MB ({z / a - 1:+.1%})"
            ctx["soak_fds"] = (f"{soak_ss[0]['fds']} at its start, {min(s['fds'] for s in soak_ss)}-"
                               f"{max(s['fds'] for s in soak_ss)} throughout, {soak_ss[-1]['fds']} at its end")
            ctx["soak_s"] = soak_ss[-1]["t"] - soak_ss[0]["t"]
        else:
            ctx["soak_rss"], ctx["soak_fds"], ctx["soak_s"] = "too few samples", "-", 0.0
        ctx["soak_images"] = sum(x["n"] for x in r.bursts if x["burst"] >= max(at) + 1)

        def mb(p: Path) -> float:
            if p.is_dir():
                return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
            return p.stat().st_size / 2**20 if p.exists() else 0.0

        wal = [x["wal_mb"] for x in sampler.samples if "wal_mb" in x]
        ctx["state_sizes"] = (f"ledger {mb(state / 'ledger.sqlite3'):.1f} MB, its WAL at most "
                              f"{max(wal, default=0.0):.1f} MB during the run, alerts.jsonl "
                              f"{mb(state / 'alerts.jsonl'):.2f} MB, anomalies/ {mb(state / 'anomalies'):.1f} MB")
        if mounted:
            full = [(f["t_full"] - 1.0, f["t_free"] + 2.0) for f in r.faults if "t_full" in f]
            used = [x["state_used_mb"] for x in sampler.samples if "state_used_mb" in x
                    and not any(a <= x["t"] <= z for a, z in full)]
            ctx["state_sizes"] += (f"; the tmpfs at most {max(used, default=0.0):.1f} of {args.tmpfs_mb} MB "
                                   "used outside the disk-full fault")
        text = report(ctx, r, checks, runs, logs)
        print()
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        out_json = args.out.with_suffix(".json")
        every = max(1, len(sampler.samples) // 600)
        out_json.write_text(json.dumps({
            "command": command, "context": ctx, "checks": checks, "faults": r.faults, "events": r.events,
            "bursts": r.bursts, "runs": runs, "final": final,
            "log": {"levels": logs[0], "tracebacks": logs[2],
                    "warnings_errors": [{"shape": s, "count": n, "example": ex} for s, n, ex in logs[1]]},
            "samples": sampler.samples[::every],
        }, indent=1, default=str) + "\n")
        print(f"written to {args.out} and {out_json}")
        return 0 if all(c["pass"] for c in checks) else 1
    except DaemonProcessError as e:
        sys.exit(f"fault_soak: {e}")
    finally:
        if sampler is not None:
            sampler.stop_ev.set()
        if d is not None:
            d.live_pid = None
            d.stop()
        led.close()
        rx.down()
        if mounted:
            if args.workdir is not None and state.exists():
                shutil.copytree(state, work / "state-copy", dirs_exist_ok=True)
            if subprocess.run(["umount", str(work / "statefs")], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(work / "statefs")], capture_output=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
