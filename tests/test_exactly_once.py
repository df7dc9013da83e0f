"""Exactly-once under random file operations and crashes: a Hypothesis state machine that drives the
real `anomon watch` daemon (a subprocess, through conftest's Daemon) and keeps a model of what the
watched folder holds.

Rules: create an image in one write; write half of one and finish it later (the writer keeps the
file open, or closes it and appends the rest later); write to a temporary name and rename it in
(over a new or an existing name); delete; overwrite in place with new bytes; overwrite with the
bytes it already has; move to another name; kill -9 (at any moment, in the start-up scan included)
or SIGTERM (once the daemon is ready), then restart at once or stay down for a few steps; pause for
a moment. A restart does not wait for /readyz: file operations go on during the start-up scan. New
bytes are now and then bytes written before, at the same path (a duplicate) or at another one.

After every step (what must hold at any moment): no (path, sha256) has two rows; every row with
bytes has bytes the test wrote completely at that path, with the verdict those bytes deserve;
bytes never completely written at a path (half of a file, an in-place overwrite caught midway) are
never scored, and their only possible row is "truncated"/"empty", for a half that stood unchanged
longer than incomplete_grace_s (the daemon's "the writer gave up" rule); exactly one alert per
anomalous row and none for anything else; SIGTERM exits 0.

At the end of each example: every complete image in the folder gets exactly one row for its
(path, sha256) (waited for; the checks above hold). After the last example, once the daemon is
quiet (ready, the queue empty, and no new row for longer than the grace period and a rescan),
all of that is checked again for every example's folder, so a late row (a second verdict from a
rescan, a half judged after all) shows too; one quiet period at the end instead of one per
example saves about 3 s per example.

One daemon serves all examples (each in its own subfolder), which saves a start and a stop per
example. Examples are derandomized, so CI sees the same sequences every run; they are not shrunk
(each step can cost seconds of daemon time): set ANOMON_SHRINK=1 to let Hypothesis shrink a failure.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from anomon.ledger import from_db_path, open_readonly
from conftest import Daemon, TinyModel

pytestmark = pytest.mark.e2e

STABLE_S = 0.3
GRACE_S = 2.0
RECONCILE_S = 2.0
NAMES = ["a.png", "b.png", "c.png", "d.png", "e.png", "sub/f.png", "sub/g.png"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Partial:
    """Half of `data` written at a path; the rest comes later (or the file is deleted first)."""

    data: bytes
    kind: str
    since: float  # time.monotonic() when the half was written
    fd: int | None  # the writer still holds the file open (no close event yet)

    @property
    def half_sha(self) -> str:
        return sha(self.data[: len(self.data) // 2])


@dataclass
class Model:
    """What the test folder holds, and what it has held."""

    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 of the complete bytes there now
    partials: dict[str, Partial] = field(default_factory=dict)  # name -> half-written file there now
    complete: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {sha256: kind} ever complete there
    halves: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {sha256 of a half: seconds it stood}
    contents: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # sha256 -> (bytes, kind)


def test_every_complete_image_has_exactly_one_verdict(tiny_model: TinyModel, tmp_path: Path) -> None:
    counter = iter(range(1_000_000))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    d = Daemon(tmp_path / "d", tiny_model.path, stable_s=STABLE_S, incomplete_grace_s=GRACE_S,
               reconcile_interval_s=RECONCILE_S)
    ledger = d.state / "ledger.sqlite3"

    class ExactlyOnce(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.folder = Path(os.path.realpath(d.watch)) / f"ex{next(counter)}"
            self.m = Model()
            self.running = True  # each example starts with the daemon running (maybe still starting)
            self.log: list[str] = []

        # -- helpers ------------------------------------------------------------------------------

        def note(self, what: str) -> None:
            self.log.append(f"{time.monotonic():10.3f} {what}")

        def new_content(self, anomalous: bool) -> tuple[bytes, str]:
            i = next(counter)
            p = scratch / f"c{i}.png"
            (tiny_model.anomalous_png if anomalous else tiny_model.normal_png)(p, i)
            data = p.read_bytes()
            p.unlink()
            kind = "anomalous" if anomalous else "normal"
            self.m.contents[sha(data)] = (data, kind)
            return data, kind

        def content(self, data: st.DataObject) -> tuple[bytes, str]:
            """New bytes, or bytes written before in this example (here or at another name)."""
            if self.m.contents and data.draw(st.booleans(), label="earlier bytes"):
                return self.m.contents[data.draw(st.sampled_from(sorted(self.m.contents)), label="which")]
            return self.new_content(data.draw(st.booleans(), label="anomalous"))

        def path(self, name: str) -> Path:
            p = self.folder / name
            p.parent.mkdir(parents=True, exist_ok=True)
            return p

        def completed(self, name: str, body: bytes, kind: str) -> None:
            self.m.files[name] = sha(body)
            self.m.complete.setdefault(name, {})[sha(body)] = kind

        def free_names(self) -> list[str]:
            return [n for n in NAMES if n not in self.m.files and n not in self.m.partials]

        def end_partial(self, name: str) -> Partial:
            p = self.m.partials.pop(name)
            self.m.halves.setdefault(name, {})[p.half_sha] = time.monotonic() - p.since
            return p

        def query(self, sql: str) -> list[dict[str, Any]]:
            conn = open_readonly(ledger)
            try:
                return [dict(r) for r in conn.execute(sql)]
            finally:
                conn.close()

        def rows(self) -> list[dict[str, Any]]:
            """This example's rows, with `name` relative to its folder."""
            out = []
            for r in self.query("SELECT * FROM images ORDER BY id"):
                rel = os.path.relpath(from_db_path(r["path"]), self.folder)
                if not rel.startswith(".."):
                    out.append({**r, "name": rel})
            return out

        def start(self) -> None:
            d.start(wait_ready=False)  # not waiting: the next steps run during the start-up scan
            self.running = True

        def ready(self) -> bool:
            """/readyz says 200 (SIGTERM is sent only then: one sent before the daemon installed
            its handler, or while it loads the model, would cost a start-up each and test little)."""
            try:
                return d.get("/readyz", timeout=2.0).status == 200
            except (OSError, http.client.HTTPException):
                return False

        def context(self) -> str:
            rows = "\n".join(f"  {r['id']:4d} {r['name']:10s} {r['verdict']:9s} {r['reason'] or '':9s} "
                             f"{(r['sha256'] or '-')[:10]}" for r in self.rows())
            files = ", ".join(f"{k} {v[:10]}" for k, v in sorted(self.m.files.items()))
            return (f"\nfolder {self.folder}\nsteps:\n  " + "\n  ".join(self.log) + f"\nrows:\n{rows}\n"
                    f"files now: {files}\ndaemon log ends:\n{d.log_tail(25)}")

        # -- rules --------------------------------------------------------------------------------

        @precondition(lambda self: self.free_names())
        @rule(data=st.data())
        def create(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(self.free_names()), label="name")
            body, kind = self.content(data)
            self.path(name).write_bytes(body)
            self.completed(name, body, kind)
            self.note(f"create {name} {sha(body)[:10]} ({kind})")

        @precondition(lambda self: self.free_names())
        @rule(data=st.data(), keep_open=st.booleans())
        def write_half(self, data: st.DataObject, keep_open: bool) -> None:
            name = data.draw(st.sampled_from(self.free_names()), label="name")
            body, kind = self.new_content(data.draw(st.booleans(), label="anomalous"))
            fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, body[: len(body) // 2])
            if not keep_open:
                os.close(fd)
            self.m.partials[name] = p = Partial(body, kind, time.monotonic(), fd if keep_open else None)
            self.note(f"write half of {name} {sha(body)[:10]} (half {p.half_sha[:10]}, "
                      f"{'kept open' if keep_open else 'closed'})")

        @precondition(lambda self: self.m.partials)
        @rule(data=st.data())
        def finish_half(self, data: st.DataObject) -> None:
            self.finish(data.draw(st.sampled_from(sorted(self.m.partials)), label="name"))

        def finish(self, name: str) -> None:
            p = self.m.partials[name]
            fd = p.fd if p.fd is not None else os.open(self.path(name), os.O_WRONLY | os.O_APPEND)
            p.fd = None
            os.write(fd, p.data[len(p.data) // 2:])
            os.close(fd)
            self.end_partial(name)
            self.completed(name, p.data, p.kind)
            self.note(f"finish {name} {sha(p.data)[:10]}")

        @precondition(lambda self: self.free_names() or self.m.files)
        @rule(data=st.data())
        def rename_in(self, data: st.DataObject) -> None:
            """Written under a name intake ignores (`.*`, `*.tmp`), then renamed over a new or an
            existing name."""
            name = data.draw(st.sampled_from(self.free_names() + sorted(self.m.files)), label="name")
            body, kind = self.content(data)
            tmp = self.path(name).parent / f".{Path(name).name}.tmp"
            tmp.write_bytes(body)
            os.rename(tmp, self.path(name))
            self.completed(name, body, kind)
            self.note(f"rename in {name} {sha(body)[:10]} ({kind})")

        @precondition(lambda self: self.m.files or self.m.partials)
        @rule(data=st.data())
        def delete(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.m.files) + sorted(self.m.partials)), label="name")
            if name in self.m.partials:
                p = self.end_partial(name)
                if p.fd is not None:
                    os.close(p.fd)
            else:
                del self.m.files[name]
            os.unlink(self.path(name))
            self.note(f"delete {name}")

        @precondition(lambda self: self.m.files)
        @rule(data=st.data())
        def overwrite_new(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.m.files)), label="name")
            body, kind = self.new_content(data.draw(st.booleans(), label="anomalous"))
            self.path(name).write_bytes(body)  # in place: truncate, write, close
            self.completed(name, body, kind)
            self.note(f"overwrite {name} with new bytes {sha(body)[:10]} ({kind})")

        @precondition(lambda self: self.m.files)
        @rule(data=st.data())
        def overwrite_same(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.m.files)), label="name")
            body = self.m.contents[self.m.files[name]][0]
            self.path(name).write_bytes(body)
            self.note(f"overwrite {name} with the bytes it has {sha(body)[:10]}")

        @precondition(lambda self: self.m.files and len(self.free_names()) + len(self.m.files) > 1)
        @rule(data=st.data())
        def move(self, data: st.DataObject) -> None:
            src = data.draw(st.sampled_from(sorted(self.m.files)), label="from")
            dest = data.draw(st.sampled_from([n for n in self.free_names() + sorted(self.m.files) if n != src]),
                             label="to")
            h = self.m.files.pop(src)
            os.rename(self.path(src), self.path(dest))
            self.completed(dest, *self.m.contents[h])
            self.note(f"move {src} -> {dest}")

        @precondition(lambda self: self.running)
        @rule(restart=st.booleans())
        def kill9(self, restart: bool) -> None:
            d.kill9()  # wherever it is, in the start-up scan included
            self.running = False
            self.note("kill -9" + (", restart" if restart else ", stay down"))
            if restart:
                self.start()

        @precondition(lambda self: self.running and self.ready())
        @rule(restart=st.booleans())
        def sigterm(self, restart: bool) -> None:
            rc = d.stop(timeout=20)
            self.running = False
            self.note(f"SIGTERM: exit status {rc}" + (", restart" if restart else ", stay down"))
            assert rc == 0, f"SIGTERM: exit status {rc}{self.context()}"
            if restart:
                self.start()

        @precondition(lambda self: not self.running)
        @rule()
        def restart(self) -> None:
            self.start()
            self.note("restart")

        @rule(seconds=st.sampled_from([0.05, 0.4, 1.0]))
        def pause(self, seconds: float) -> None:
            time.sleep(seconds)
            self.note(f"pause {seconds} s")

        # -- what must hold at any moment ---------------------------------------------------------

        def half_may_be_judged(self, name: str, h: str) -> bool:
            """Half-written bytes may be judged empty/truncated once they stood unchanged for the
            grace period."""
            stood = self.m.halves.get(name, {}).get(h)
            p = self.m.partials.get(name)
            if stood is None and p is not None and p.half_sha == h:
                stood = time.monotonic() - p.since
            return stood is not None and stood >= GRACE_S

        @invariant()
        def nothing_twice_nothing_half_one_alert_per_anomaly(self) -> None:
            rows = self.rows()
            keys = [(r["name"], r["sha256"]) for r in rows if r["sha256"] is not None]
            twice = sorted({k for k in keys if keys.count(k) > 1})
            assert not twice, f"(path, sha256) recorded twice: {twice}{self.context()}"
            for r in rows:
                if r["sha256"] is None:  # never read: only a file that was gone may be so
                    assert (r["verdict"], r["reason"]) == ("error", "vanished"), f"{r}{self.context()}"
                    continue
                kind = self.m.complete.get(r["name"], {}).get(r["sha256"])
                if kind is not None:
                    assert r["verdict"] == kind, f"wrote {kind} bytes, recorded {r}{self.context()}"
                    continue
                assert r["verdict"] == "error" and r["reason"] in ("truncated", "empty"), (
                    f"a row for bytes never completely written at that path: {r}{self.context()}")
                assert self.half_may_be_judged(r["name"], r["sha256"]), (
                    f"unfinished bytes judged {r['reason']}, but no half-write of them stood {GRACE_S} s "
                    f"unchanged: {r}{self.context()}")
            ids = {r["id"] for r in rows}
            alerted = sorted(a["image_id"] for a in self.query("SELECT image_id FROM alerts") if a["image_id"] in ids)
            anomalous = sorted(r["id"] for r in rows if r["verdict"] == "anomalous")
            assert alerted == anomalous, f"alerts for {alerted}, anomalous rows {anomalous}{self.context()}"

        # -- at the end: quiet, then each complete image has its one row ---------------------------

        def missing(self) -> list[tuple[str, str]]:
            have = {(r["name"], r["sha256"]) for r in self.rows()}
            return sorted(set(self.m.files.items()) - have)

        def teardown(self) -> None:
            """Every complete image gets its row (the daemon may be starting: no wait for /readyz,
            the next example's steps may run during its start-up scan). The quiet period comes
            once, after the last example, for all of them (see quiet_then_check_all)."""
            try:
                for name in sorted(self.m.partials):
                    self.finish(name)
                if not self.running:
                    self.start()
                    self.note("restart")
                deadline = time.monotonic() + 60
                while self.missing() and time.monotonic() < deadline:
                    assert d.proc is not None and d.proc.poll() is None, f"the daemon exited{self.context()}"
                    time.sleep(0.2)
                self.note("all rows there")
                missing = self.missing()
                assert not missing, f"complete images without a verdict: {missing}{self.context()}"
                self.nothing_twice_nothing_half_one_alert_per_anomaly()
                finished.append(self)
            finally:
                for p in self.m.partials.values():
                    if p.fd is not None:
                        os.close(p.fd)

    def quiet_then_check_all() -> None:
        """Once the daemon is idle (ready, the queue empty, no new row for longer than the grace
        period and a rescan), every example's folder still holds exactly what it should: a late
        row (a second verdict, a judged half) would show here."""
        d.wait_ready(90)
        quiet_for = max(GRACE_S, RECONCILE_S) + 0.5
        deadline = time.monotonic() + 60
        n, since = -1, time.monotonic()
        while time.monotonic() - since < quiet_for and time.monotonic() < deadline:
            time.sleep(0.2)
            now = len(finished[-1].query("SELECT id FROM images"))
            if now != n or d.metric("anomon_queue_depth") != 0:
                n, since = now, time.monotonic()
        assert time.monotonic() - since >= quiet_for, f"never quiet; the log ends:\n{d.log_tail()}"
        for ex in finished:
            ex.note("quiet, after the last example")
            missing = ex.missing()
            assert not missing, f"complete images without a verdict: {missing}{ex.context()}"
            ex.nothing_twice_nothing_half_one_alert_per_anomaly()

    finished: list[ExactlyOnce] = []
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("ANOMON_SHRINK") else [])
    d.start()
    try:
        run_state_machine_as_test(ExactlyOnce, settings=settings(
            max_examples=8, stateful_step_count=20, deadline=None, derandomize=True, database=None,
            phases=phases, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
        quiet_then_check_all()
        assert d.stop() == 0, d.log_tail()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()
