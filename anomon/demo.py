"""`anomon demo`: the whole product on the bundled sample images, in about two minutes.

It trains on most of `sample_data/normal`, starts the real daemon (`anomon watch`, a subprocess
with a TOML file, exactly what a user deploys) with two lines (two cameras on the same product,
one model), copies normal and defective images into their folders at a steady pace, and prints
each verdict and each alert as the daemon records them. Then a lens on line-2 slowly goes out of
focus: images no threshold flags, which the drift test notices.

Why a subprocess and not the service in-process: the demo then shows what production does, and it
talks to the daemon only the way a user or an operator would: files into the watched folder, the
ledger read-only (the `anomon verdicts` machinery), and HTTP (/readyz, /metrics, /alerts).

The normal images fed live are kept out of training, so the false alarms the summary counts are
honest. The threshold is calibrated on the training command's own held-out share (10 %, so 12
images): too few for the default 5 % false-alarm target, so the demo asks for 10 %, which 12
images can back (see anomon.calibrate).
"""

from __future__ import annotations

import io
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import anomon
from anomon.config import TrainConfig
from anomon.daemon_process import DaemonProcess, DaemonProcessError, die_with_parent, free_port
from anomon.images import iter_image_files
from anomon.ledger import LedgerError, open_readonly, verdict_rows
from anomon.state import holder as state_holder
from anomon.state import ledger_path

SAMPLE_DIR = Path(anomon.__file__).resolve().parents[1] / "sample_data"
DEFAULT_WORKDIR = Path(".anomon-demo")
DEFAULT_PORT = 9108
DEFAULT_TIME_BUDGET_S = 90.0  # training stays under 2 minutes on 2 CPU cores
DEFAULT_INTERVAL_S = 0.3  # about 3 images per second: slow enough to read, fast enough to not bore
LIVE_NORMAL_EVERY = 5  # every 5th normal image is kept out of training and fed live (30 of 150)
TARGET_FPR = 0.1
READY_TIMEOUT_S = 120.0  # torch import + model load on a busy machine
VERDICT_TIMEOUT_S = 60.0  # after the last image is copied
POLL_S = 0.2  # how often the ledger and /alerts are read
LINES = ("line-1", "line-2")
DRIFT_LINE = "line-2"
# The drift phase: the live normal images again, blurred a little more at each round (a lens
# slowly going out of focus). Measured on the demo's model (sample data, 2026-11-30): a drift alarm
# after 79-98 such images, none of them over the threshold; unchanged images: no alarm.
DRIFT_BLUR_STEP_PX = 0.3
DRIFT_ROUNDS = 8
DRIFT_INTERVAL_S = 0.1
MARKER = "README.txt"
MARKER_TEXT = (
    "This folder was made by `anomon demo` and is rebuilt by the next demo run; delete it at will.\n"
    "  train/        the normal images the demo model learnt from\n"
    "  model.anomon  the model\n"
    "  anomon.toml   the daemon's configuration\n"
    "  inbox/        the folders the daemon watches, one per line (line-1/, line-2/)\n"
    "  state/        the daemon's ledger, alerts.jsonl and anomalies/ (copies + heat maps)\n"
    "  daemon.log    the daemon's log\n"
)


class DemoError(Exception):
    """Something the user can fix (a busy --port, a foreign --workdir...); one line."""


@dataclass
class DemoOptions:
    once: bool = False
    workdir: Path = DEFAULT_WORKDIR
    model: Path | None = None  # reuse a bundle instead of training
    port: int | None = None  # None: 9108, or a free one if that is busy; 0: any free port
    epochs: int | None = None
    image_size: int | tuple[int, int] | None = None
    time_budget_s: float = DEFAULT_TIME_BUDGET_S
    interval_s: float = DEFAULT_INTERVAL_S


@dataclass
class Item:
    """One image the demo feeds, with the truth the summary compares the verdict to."""

    source: Path
    anomalous: bool
    kind: str = ""  # defect kind, for anomalous images
    line: str = LINES[0]
    verdict: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.source.name


# ------------------------------------------------------------------------------ helpers


def show(path: Path) -> str:
    """A path as short as it can be and still work from the user's shell."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon's server does
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(requested: int | None) -> tuple[int, str | None]:
    """The port to use, and a note for the user when it is not the one they expect."""
    if requested == 0:
        return free_port(), None
    if requested is not None:
        if not _port_free(requested):
            raise DemoError(f"port {requested} on 127.0.0.1 is in use; pass another --port (0 = any free one)")
        return requested, None
    if _port_free(DEFAULT_PORT):
        return DEFAULT_PORT, None
    port = free_port()
    return port, f"port {DEFAULT_PORT} is busy (another anomon?), so the demo uses {port}"


def find_sample_data(root: Path = SAMPLE_DIR) -> tuple[list[Path], list[Path], dict[str, str]]:
    """(normal images, anomalous images, defect kind by file name) from the shipped sample set."""
    normal_dir, anomalous_dir = root / "normal", root / "anomalous"
    normal = list(iter_image_files(normal_dir)) if normal_dir.is_dir() else []
    anomalous = list(iter_image_files(anomalous_dir)) if anomalous_dir.is_dir() else []
    if len(normal) < 2 * LIVE_NORMAL_EVERY or not anomalous:
        raise DemoError(
            f"sample images not found under {root} (the demo needs anomon's source checkout, "
            "which ships sample_data/normal and sample_data/anomalous)")
    kinds: dict[str, str] = {}
    try:
        meta = json.loads((anomalous_dir / "defects.json").read_text())
        kinds = {name: str(rec.get("kind", "defect")) for name, rec in meta.get("images", {}).items()}
    except (OSError, ValueError, AttributeError):
        pass  # the kind is only a label in the output
    return normal, anomalous, kinds


def split_normals(normal: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training images, images kept out of training and fed live): every 5th is kept out."""
    live = [p for i, p in enumerate(normal) if i % LIVE_NORMAL_EVERY == 0]
    train = [p for i, p in enumerate(normal) if i % LIVE_NORMAL_EVERY != 0]
    return train, live


def _is_demo_folder(path: Path) -> bool:
    try:
        return (path / MARKER).read_text().startswith(MARKER_TEXT.split(";")[0])
    except OSError:
        return False


def prepare_workdir(path: Path) -> Path:
    """A fresh demo folder: a new run must not find the last run's verdicts (same paths, same
    bytes would be duplicates, with no verdict). Refuses folders the demo did not make."""
    path = path.absolute()
    try:
        if path.exists():
            if not path.is_dir():
                raise DemoError(f"--workdir {path} is a file, not a folder")
            if any(path.iterdir()) and not _is_demo_folder(path):
                raise DemoError(f"{path} is not empty and was not made by `anomon demo`; "
                                "pass --workdir with a new or empty folder")
            pid = state_holder(path / "state")
            if pid is not None:
                raise DemoError(f"a daemon from an earlier demo still uses {path} (pid {pid}); stop it first")
            for sub in ("train", "inbox", "state"):
                shutil.rmtree(path / sub, ignore_errors=True)
            for f in ("anomon.toml", "daemon.log"):
                (path / f).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).write_text(MARKER_TEXT)
        for line in LINES:
            (path / "inbox" / line).mkdir(parents=True)
    except OSError as e:
        raise DemoError(f"cannot prepare the demo folder {path}: {e.strerror or e}") from None
    return path


def _iso_to_unix(text: str | None) -> float:
    if not text:
        return 0.0
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------------------ the daemon


class DemoDaemon(DaemonProcess):
    """`anomon watch --config TOML` (anomon.daemon_process) in its own session: Ctrl-C reaches the
    demo, which then stops the daemon with one SIGTERM (a second signal would make it exit at
    once). It dies with the demo, logs as text (the user reads daemon.log), and its failures are
    DemoErrors: one line that names the log."""

    def __init__(self, workdir: Path, model: Path, port: int) -> None:
        self.inbox = workdir / "inbox"
        self.state = workdir / "state"
        # The review page lets whoever holds this token judge alerts (anomon.review).
        self.review_token = workdir / "review-token"
        self.review_token.write_text(secrets.token_hex(16) + "\n")
        self.review_token.chmod(0o600)
        settings = {
            "lines": [{"name": line, "model": model, "watch": [self.inbox / line]} for line in LINES],
            "state": self.state, "listen": f"127.0.0.1:{port}", "log_format": "text",
            "review_token_file": self.review_token,
        }
        super().__init__(workdir, settings, new_session=True, die_with_parent=True,
                         comment="Written by `anomon demo`. Every option is explained in deploy/anomon.toml.")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"the daemon stopped (exit status {self.proc.returncode}): "
                            f"{self.last_log_line()}; see {show(self.log_path)}")

    def last_log_line(self) -> str:
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines()]
        except OSError:
            return "no log"
        errors = [ln for ln in lines if "error" in ln.lower()]
        return (errors or [ln for ln in lines if ln] or ["empty log"])[-1]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        try:
            return super().wait_ready(timeout)
        except DaemonProcessError:
            self.check_alive()
            raise DemoError(f"the daemon was not ready after {timeout:.0f} s; see {show(self.log_path)}") from None

    def alerts_after(self, since: int) -> list[dict[str, Any]]:
        status, body = self.get(f"/alerts?since={since}")
        if status != 200:
            return []
        return list(json.loads(body)["alerts"])


# ------------------------------------------------------------------------------ the demo


@dataclass
class Demo:
    opts: DemoOptions
    out: TextIO = field(default_factory=lambda: sys.stdout)
    items: list[Item] = field(default_factory=list)
    daemon: DemoDaemon | None = None
    _by_name: dict[str, Item] = field(default_factory=dict)
    _seen_ids: set[int] = field(default_factory=set)
    _printed_images: set[int] = field(default_factory=set)
    _alerted_images: set[int] = field(default_factory=set)
    _held_alerts: list[dict[str, Any]] = field(default_factory=list)
    _last_alert: int = 0
    _since: float = 0.0
    _conn: Any = None
    _judged: int = 0
    _extra: int = 0
    _feed_seconds: float = 0.0
    _trained: bool = False  # the demo trained the model (so it knows what the model saw)
    _drift_names: set[str] = field(default_factory=set)
    _drift_rows: list[dict[str, Any]] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def para(self, text: str) -> None:
        """A paragraph wrapped for an 80-column terminal (paths are never broken)."""
        self.say(textwrap.fill(text, width=78, break_long_words=False, break_on_hyphens=False))

    def heading(self, text: str) -> None:
        self.say()
        self.say(f"== {text} ==")

    # -- steps ---------------------------------------------------------------------------------

    def run(self) -> int:
        o = self.opts
        normal, anomalous, kinds = find_sample_data()
        train, live = split_normals(normal)
        if o.model is not None and not o.model.is_file():
            raise DemoError(f"model not found: {o.model}")
        port, port_note = pick_port(o.port)
        work = prepare_workdir(o.workdir)
        self.para("anomon demo: a model learns what normal parts look like, then a daemon judges "
                  "new images as they arrive and raises an alert for each anomalous one.")
        self.say(f"Working folder: {show(work)}  (rebuilt on every run)")
        if port_note:
            self.say(f"Note: {port_note}.")

        if o.model is not None:
            model = o.model.absolute()
            self.heading("Step 1 of 4: the model")
            self.say(f"Using {show(model)} as it is (no training).")
        else:
            model = self.train(work, train, len(live))
        self.daemon = DemoDaemon(work, model, port)
        try:
            self.start_daemon()
            self.items = self.plan(live, anomalous, kinds)
            self.feed()
            self.summary()
            self.drift(live)
            if o.once:
                return self.finish()
            return self.serve()
        finally:
            if self._conn is not None:
                self._conn.close()
            if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                self.daemon.stop()

    def train(self, work: Path, train: list[Path], n_live: int) -> Path:
        o = self.opts
        self.heading("Step 1 of 4: train a model on normal images")
        folder = work / "train"
        folder.mkdir()
        for p in train:
            shutil.copyfile(p, folder / p.name)
        model = work / "model.anomon"
        args = ["train", str(folder), "-o", str(model), "--time-budget", f"{o.time_budget_s:g}",
                "--target-fpr", f"{TARGET_FPR:g}"]
        if o.epochs:
            args += ["--epochs", str(o.epochs)]
        if o.image_size:
            size = o.image_size
            args += ["--image-size", f"{size[1]}x{size[0]}" if isinstance(size, tuple) else str(size)]
        n_hold = max(1, round(len(train) * TrainConfig().holdout))  # as `anomon train` will
        self.para(f"Learning from {len(train)} normal images in {show(SAMPLE_DIR / 'normal')}; "
                  f"{n_live} more are kept back to test the model live. Training stops after at most "
                  f"{o.time_budget_s:g} s and holds back {n_hold} of its images to set the threshold "
                  f"for at most {TARGET_FPR:.0%} false alarms.")
        shown = [show(Path(a)) if a in (str(folder), str(model)) else a for a in args]
        self.say(f"$ anomon {shlex.join(shown)}")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "anomon", *args], stdin=subprocess.DEVNULL,
                              preexec_fn=die_with_parent)
        if proc.returncode != 0:
            raise DemoError(f"training failed (exit status {proc.returncode}); see the messages above")
        self.say(f"Trained in {time.monotonic() - t0:.0f} s.")
        self._trained = True
        return model

    def start_daemon(self) -> None:
        d = self.daemon
        assert d is not None
        self.heading("Step 2 of 4: start the monitoring daemon")
        self.say(f"$ anomon watch --config {show(d.config)}")
        d.start(wait_ready=False)
        took = d.wait_ready()
        assert d.proc is not None
        self.say(f"Ready in {took:.0f} s (pid {d.proc.pid}); its log: {show(d.log_path)}")
        self.say(f"  watching  {show(d.inbox)}/{LINES[0]}/ and {LINES[1]}/: two lines (two cameras, one "
                 "model here; each line may have its own)")
        self.say(f"  metrics   {d.url}/metrics   (for Prometheus)")
        self.say(f"  alerts    {d.url}/alerts    (JSON, ?since=ID)")
        self.say(f"  review    {d.url}/review    (judge the alerts in a browser: f = false alarm, d = defect; "
                 f"the token is in {show(d.review_token)})")
        self.say(f"  health    {d.url}/readyz")
        m = d.metrics()
        threshold = m.get(f'anomon_score_threshold{{line="{LINES[0]}"}}')
        if threshold is not None:
            self.say(f"Threshold {threshold:.2f}: an image scoring above it is anomalous.")

    def plan(self, live: list[Path], anomalous: list[Path], kinds: dict[str, str]) -> list[Item]:
        items = [Item(p, False) for p in live]
        items += [Item(p, True, kinds.get(p.name, "defect")) for p in anomalous]
        random.Random(0).shuffle(items)  # the same order every run
        for i, it in enumerate(items):  # the two cameras take turns
            it.line = LINES[i % len(LINES)]
        self._by_name = {it.name: it for it in items}
        return items

    def feed(self) -> None:
        d = self.daemon
        assert d is not None
        n_normal = sum(not it.anomalous for it in self.items)
        n_bad = len(self.items) - n_normal
        self.heading("Step 3 of 4: feed images to the daemon")
        unseen = " the model never saw" if self._trained else ""
        rate = 1 / self.opts.interval_s
        pace = f"about {rate:.0f} per second" if rate >= 1 else f"one every {self.opts.interval_s:g} s"
        self.para(f"Copying {len(self.items)} images into {show(d.inbox)}/{{{','.join(LINES)}}}, {pace}: "
                  f"{n_normal} normal ones{unseen} and {n_bad} with a drawn defect (the name says which).")
        self.say()
        t_start = time.monotonic()
        next_copy = t_start
        todo = list(self.items)
        last_copy = next_poll = 0.0
        while todo or not self._done():
            now = time.monotonic()
            if todo and now >= next_copy:
                item = todo.pop(0)
                self._drop(item.source, d.inbox / item.line / item.name)
                next_copy += self.opts.interval_s
                last_copy = now
            if now >= next_poll:
                self.poll()
                next_poll = now + POLL_S
            if not todo and time.monotonic() - last_copy > VERDICT_TIMEOUT_S:
                missing = [it.name for it in self.items if it.verdict is None]
                raise DemoError(f"no verdict for {len(missing)} image(s) after {VERDICT_TIMEOUT_S:.0f} s "
                                f"(first: {missing[0] if missing else '-'}); see {show(d.log_path)}")
            time.sleep(0.05)
        self._feed_seconds = time.monotonic() - t_start

    @staticmethod
    def _drop(source: Path | bytes, dest: Path) -> None:
        """Copy under a hidden name the daemon ignores, then rename: the file appears complete,
        as a camera or an upload should deliver it."""
        tmp = dest.with_name(f".{dest.name}.part")
        if isinstance(source, bytes):
            tmp.write_bytes(source)
        else:
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)

    def _done(self) -> bool:
        """Every image has its verdict, and every anomalous verdict its alert."""
        if any(it.verdict is None for it in self.items):
            return False
        flagged = {it.verdict["id"] for it in self.items if it.verdict and it.verdict["verdict"] == "anomalous"}
        return flagged <= self._alerted_images

    # -- watching the ledger and /alerts -----------------------------------------------------

    def poll(self) -> None:
        d = self.daemon
        assert d is not None
        d.check_alive()
        if self._conn is None:
            try:
                self._conn = open_readonly(ledger_path(d.state))
            except LedgerError:
                return
        for row in verdict_rows(self._conn, since=self._since):
            if row["id"] in self._seen_ids:
                continue
            self._seen_ids.add(row["id"])
            self._since = max(self._since, _iso_to_unix(row["scored"]) - 5.0)  # batches commit in order
            self._print_verdict(row)
        try:
            fresh = d.alerts_after(self._last_alert)
        except OSError:
            fresh = []
        if fresh:
            self._last_alert = fresh[-1]["id"]
        # An alert commits with its verdict; print it only after that verdict's line.
        pending, self._held_alerts = self._held_alerts + fresh, []
        for a in pending:
            if a["image_id"] in self._printed_images:
                self._print_alert(a)
            else:
                self._held_alerts.append(a)

    def _print_verdict(self, row: dict[str, Any]) -> None:
        name = Path(row["path"]).name
        self._printed_images.add(row["id"])
        if name in self._drift_names:  # the drift phase reports in bulk, not one line each
            self._drift_rows.append(row)
            return
        item = self._by_name.get(name)
        if item is not None and item.verdict is None:
            item.verdict = row
            self._judged += 1
            tag = f"[{self._judged:2d}/{len(self.items)}]"
        else:
            self._extra += 1
            tag = "[extra]"
        line = row.get("line") or "?"
        if row["verdict"] == "error":
            self.say(f"  {tag} {line} {name:<24} ERROR      {row['reason']}: {row['message']}")
            return
        flagged = row["verdict"] == "anomalous"
        word = "ANOMALOUS" if flagged else "normal"
        note = ""
        if item is not None:
            if item.anomalous:
                note = f"caught ({item.kind})" if flagged else f"MISSED ({item.kind})"
            else:
                note = "FALSE ALARM" if flagged else "ok"
        self.say(f"  {tag} {line} {name:<24} {word:<9}  score {row['score']:7.2f}  {note}".rstrip())

    def _print_alert(self, a: dict[str, Any]) -> None:
        first = not self._alerted_images
        self._alerted_images.add(a["image_id"])
        if Path(a["path"]).name in self._drift_names:
            return  # counted in the drift phase's report
        self.say(f"          ALERT #{a['id']}  {Path(a['path']).name}  score {a['score']:.2f} > threshold "
                 f"{a['threshold']:.2f}  ({a.get('line', '?')})")
        where = a.get("heatmap") or a.get("anomaly_image")
        if first and where:
            self.say(f"          (a copy of each alerted image and its heat map go to {show(Path(where).parent)}/)")

    # -- the end ----------------------------------------------------------------------------

    def summary(self) -> None:
        d = self.daemon
        assert d is not None
        normal = [it for it in self.items if not it.anomalous]
        bad = [it for it in self.items if it.anomalous]
        flagged = lambda it: it.verdict is not None and it.verdict["verdict"] == "anomalous"  # noqa: E731
        caught = [it for it in bad if flagged(it)]
        false_alarms = [it for it in normal if flagged(it)]
        errors = [it for it in self.items if it.verdict is not None and it.verdict["verdict"] == "error"]
        n_flagged = sum(flagged(it) for it in self.items)
        self.heading("Summary")
        self.say(f"  {len(self.items)} images judged in {self._feed_seconds:.0f} s: "
                 f"{len(self.items) - n_flagged - len(errors)} normal, {n_flagged} anomalous"
                 + (f", {len(errors)} errors" if errors else ""))
        self.say(f"  detection rate:   {len(caught)} of {len(bad)} defective images caught "
                 f"({len(caught) / max(1, len(bad)):.0%})")
        target = f"; target at most {TARGET_FPR:.0%} on average" if self._trained else ""
        self.say(f"  false alarms:     {len(false_alarms)} of {len(normal)} normal images "
                 f"({len(false_alarms) / max(1, len(normal)):.0%}{target})")
        self.say(f"  alerts raised:    {len(self._alerted_images)} (one per anomalous verdict)")
        kinds = sorted({it.kind for it in bad})
        per_kind = [f"{k} {sum(flagged(it) for it in bad if it.kind == k)}/{sum(it.kind == k for it in bad)}"
                    for k in kinds]
        self.say(f"  by defect kind:   {', '.join(per_kind)}")
        m = d.metrics()
        scored = {v: int(m.get(f'anomon_images_scored_total{{verdict="{v}"}}', 0)) for v in ("normal", "anomalous")}
        self.say(f"  /metrics:         anomon_images_scored_total normal={scored['normal']} "
                 f"anomalous={scored['anomalous']}")

    def drift(self, live: list[Path]) -> None:
        """A lens on one line slowly goes out of focus: no image crosses the threshold, and the
        drift test says so after some tens of images (see DRIFT_ROUNDS)."""
        from PIL import Image, ImageFilter  # only this step makes images

        d = self.daemon
        assert d is not None
        alarms = f'anomon_drift_alarms_total{{line="{DRIFT_LINE}"}}'
        evidence = f'anomon_drift_martingale_log10{{line="{DRIFT_LINE}"}}'
        self.heading(f"Step 4 of 4: a lens on {DRIFT_LINE} slowly goes out of focus")
        self.para(f"The {len(live)} normal images again, into {show(d.inbox / DRIFT_LINE)}, each round blurred "
                  f"by {DRIFT_BLUR_STEP_PX:g} px more. Each one alone still looks normal; the drift test "
                  f"weighs them together (its evidence is anomon_drift_martingale_log10; an alarm at 2).")
        before = d.metrics().get(alarms, 0.0)
        fed = flagged = 0
        raised = False
        for rnd in range(DRIFT_ROUNDS):
            blur = DRIFT_BLUR_STEP_PX * (rnd + 1)
            for p in live:
                name = f"blur{rnd + 1}_{p.name}"
                self._drift_names.add(name)
                with Image.open(p) as im:
                    buf = io.BytesIO()
                    im.filter(ImageFilter.GaussianBlur(blur)).save(buf, format="PNG")
                self._drop(buf.getvalue(), d.inbox / DRIFT_LINE / name)
                fed += 1
                time.sleep(self.opts.interval_s / 3)
                self.poll()
            self._wait_for_rows(fed)
            m = d.metrics()
            flagged = sum(r["verdict"] == "anomalous" for r in self._drift_rows)
            self.say(f"  blur {blur:.1f} px: {fed} images, {flagged} over the threshold; evidence "
                     f"10^{m.get(evidence, 0.0):.2f}")
            if m.get(alarms, 0.0) > before:
                raised = True
                break
            if flagged > fed / 2:
                break  # the threshold catches these itself: nothing for the drift test to show
        self.say()
        if flagged > fed / 2:
            self.say("  This model flags most blurred images on its own: a change this large is the "
                     "threshold's to catch, not the drift test's.")
        elif raised:
            row = self._conn.execute("SELECT direction FROM drift_alarms WHERE line = ? ORDER BY id DESC "
                                     "LIMIT 1", (DRIFT_LINE,)).fetchone() if self._conn is not None else None
            way = f": they score {row[0]} than the calibration images" if row and row[0] else ""
            self.say(f"  DRIFT ALARM on {DRIFT_LINE} after {fed} blurred images{way}. Recorded in the "
                     f"ledger (drift_alarms), logged, and AnomonDrift fires in Prometheus.")
            self.say(f"  After fixing the lens: kill -USR1 {d.pid}  resets the evidence.")
        else:
            self.say(f"  No drift alarm after {fed} blurred images (a model trained in less time than "
                     f"planned is less sensitive; see the training warning above).")

    def _wait_for_rows(self, n: int) -> None:
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while len(self._drift_rows) < n:
            if time.monotonic() > deadline:
                raise DemoError(f"only {len(self._drift_rows)} of {n} drift images judged after "
                                f"{VERDICT_TIMEOUT_S:.0f} s; see {show(self.daemon.log_path)}")  # type: ignore[union-attr]
            self.poll()
            time.sleep(POLL_S)

    def finish(self) -> int:
        d = self.daemon
        assert d is not None
        code = d.stop()
        self.say()
        self.say(f"Daemon stopped{'' if code == 0 else f' (exit status {code})'}. What it recorded stays in {show(d.state)}:")
        self.say(f"  anomon verdicts --state {show(d.state)} --format table")
        self.say("Run `anomon demo` without --once to keep the daemon running and try /metrics.")
        return 0

    def serve(self) -> int:
        d = self.daemon
        assert d is not None
        self.heading("Still running")
        self.say(f"Drop your own images into {show(d.inbox / LINES[0])} to have them judged.")
        self.say(f"Try: curl {d.url}/metrics    or    anomon verdicts --state {show(d.state)}")
        self.say("Prometheus and Grafana setups: deploy/ in the anomon repository.")
        self.say("Press Ctrl-C to stop.")
        try:
            while True:
                self.poll()
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.say()
            self.say("Stopping the daemon...")
            code = d.stop()
            self.say(f"Stopped{'' if code == 0 else f' (exit status {code})'}. Its records stay in {show(d.state)}.")
            return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_demo(opts: DemoOptions, out: TextIO | None = None) -> int:
    """Run the demo; returns the exit status. Raises DemoError for problems the user can fix."""
    # `kill` or a closed terminal stops the demo the way Ctrl-C does: the daemon is stopped too.
    # SIGINT is set as well: Python leaves it ignored when the demo was started from a script's
    # background job (`cmd &` ignores SIGINT), and then Ctrl-C or `kill -INT` did nothing.
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return Demo(opts, out or sys.stdout).run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
