"""Disk usage per 100,000 images, and what retention (anomon/retention.py) gives back.

  ledger     N images (default 100,000) recorded through the real write path,
             anomon.ledger.Ledger.record, in batches of 16 with their drift state, as the scoring
             worker records them: paths like /srv/inspection/line1/2026-11-30/cam1-00012345.png,
             real SHA-256s, 5 % anomalous (an alert each, with the paths of its copies). Ledger bytes
             (after a WAL checkpoint) per image, and per table and index (SQLite's dbstat).
  jsonl      the real JsonlExporter writes every alert to alerts.jsonl: bytes per alert.
  copies     anomaly copies as anomon.anomalies.AnomalyStore.save keeps them: the file's bytes as
             they arrived plus a heat-map overlay (anomon.heatmap; the map is one Gaussian blob at
             the model's working size, since its PNG size follows the photo far more than the map).
             Photos: sample_data/anomalous, and any folders given with --photos.
  retention  Retention.run_pass prunes all but the newest --keep rows while another thread records
             a batch of 16, then waits 20 ms (some 400 images/s, far above a camera line), on its own
             connection, as the scoring worker does: pruning transactions, the writer's commit
             latency with and without pruning, the ledger's size before and after, bytes kept per
             pruned image (its seen row and record), and after VACUUM.
  daemon     a cross-check: the real daemon (`anomon watch` subprocess, a tiny 32x32 model trained
             here in seconds) on --daemon images, 5 % anomalous: ledger bytes per image, alerts.jsonl
             bytes per alert, anomaly copy bytes.

    .venv/bin/python bench/disk_usage.py                  # -> bench/results/disk_usage.md (~3 min)
    .venv/bin/python bench/disk_usage.py --n 20000 --daemon 300 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from anomon.alerts import JsonlExporter
from anomon.anomalies import AnomalyStore
from anomon.daemon_process import DaemonProcess
from anomon.ledger import DriftRecord, Ledger, Verdict
from anomon.retention import Policy, Retention

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "disk_usage.md"
PER = 100_000
ANOMALY_RATE = 0.05
BATCH = 16


def ledger_bytes(path: Path) -> int:
    """The ledger's file after a checkpoint (the WAL folded in and truncated)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def used_bytes(path: Path) -> int:
    """Pages in use (the file less its free pages, which new rows reuse)."""
    conn = sqlite3.connect(path)
    page, count, free = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count", "freelist_count"))
    conn.close()
    return int(page * (count - free))


def per_table(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {str(n): int(b) for n, b in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")}
    except sqlite3.OperationalError:  # SQLite built without dbstat
        return {}
    finally:
        conn.close()


def verdicts(start: int, n: int, t0: float, rng: np.random.Generator) -> list[Verdict]:
    out = []
    for i in range(start, start + n):
        day = 1 + (i // 20_000) % 28
        path = f"/srv/inspection/line1/2026-11-{day:02d}/cam1-{i:08d}.png"
        sha = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
        anomalous = rng.random() < ANOMALY_RATE
        t = t0 + i * 0.5
        v = Verdict(path=path, verdict="anomalous" if anomalous else "normal", arrived_at=t - 0.05, scored_at=t,
                    size=int(rng.integers(20_000, 400_000)), mtime_ns=int(t * 1e9), sha256=sha,
                    model_id="3f9a1c0d5e7b2a41", score=float(rng.gamma(2.0, 0.5)),
                    p_value=float(rng.random()), threshold=2.3456)
        if anomalous:
            v.anomaly_image = f"/var/lib/anomon/anomalies/{sha[:16]}-cam1-{i:08d}.png"
            v.heatmap = f"/var/lib/anomon/anomalies/{sha[:16]}-cam1-{i:08d}.heatmap.png"
        out.append(v)
    return out


def record(led: Ledger, n: int, start: int = 0, t0: float = 1.7e9, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    state = json.dumps({"log10": 0.12, "images": 0, "model_id": "3f9a1c0d5e7b2a41", "reset_reason": "model",
                        "reset_at": t0, "weights": [0.2] * 8})
    t = time.perf_counter()
    for b in range(start, start + n, BATCH):
        vs = verdicts(b, min(BATCH, start + n - b), t0, rng)
        keys = [(int(k), 1) for k in rng.integers(1000, 1400, len(vs))]
        led.record(vs, drift=DriftRecord("default", state, added=keys))
    return time.perf_counter() - t


class Writer:
    """Records a batch of 16 every 20 ms on its own connection, timing each commit."""

    def __init__(self, led: Ledger, start: int) -> None:
        self._led = led.reopen()
        self._next = start
        self.waits: list[float] = []
        self._stop = threading.Event()
        self._rng = np.random.default_rng(1)
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            vs = verdicts(self._next, BATCH, time.time() - self._next * 0.5, self._rng)
            self._next += BATCH
            t = time.perf_counter()
            self._led.record(vs)
            self.waits.append(time.perf_counter() - t)
            self._stop.wait(0.02)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._led.close()

    @property
    def written(self) -> int:
        return self._next


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def copies(photos: dict[str, Path], tmp: Path) -> dict[str, tuple[int, float, float, str]]:
    """{set: (images, mean copy bytes, mean heat-map bytes, size)} through AnomalyStore.save."""
    out = {}
    for name, folder in photos.items():
        folder = folder.resolve()
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})[:40]
        if not files:
            continue
        store = AnomalyStore(tmp / f"copies-{len(out)}", max_bytes=1 << 40)
        cb, hb, sizes = [], [], set()
        for f in files:
            data = f.read_bytes()
            img = Image.open(io.BytesIO(data))
            img.load()
            sizes.add(f"{img.size[0]}x{img.size[1]}")
            yy, xx = np.mgrid[0:64, 0:64]
            amap = np.exp(-((xx - 40) ** 2 + (yy - 24) ** 2) / 60.0)
            c, h = store.save(str(f), hashlib.sha256(data).hexdigest(), data, img, amap, vmax=0.8)
            cb.append(Path(c).stat().st_size)
            hb.append(Path(h).stat().st_size)
        out[name] = (len(files), float(np.mean(cb)), float(np.mean(hb)), ", ".join(sorted(sizes)[:3]))
    return out


def tiny_model(tmp: Path) -> Path:
    data = tmp / "train"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(normal(rng)).save(data / f"n{i:03d}.png")
    out = tmp / "tiny.anomon"
    subprocess.run([sys.executable, "-m", "anomon", "train", str(data), "-o", str(out), "--epochs", "2",
                    "--image-size", "32", "--channels", "1", "--device", "cpu"], check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out


def normal(rng: np.random.Generator) -> np.ndarray:
    x = np.linspace(60, 190, 32, dtype=np.float32)
    return np.clip(np.tile(x, (32, 1)) + rng.normal(0, 4, (32, 32)), 0, 255).astype(np.uint8)


def daemon_check(n: int, tmp: Path) -> dict[str, float]:
    model = tiny_model(tmp)
    d = DaemonProcess(tmp / "daemon", {"model": str(model), "watch": [str(tmp / "in")], "state": str(tmp / "state"),
                                       "device": "cpu", "log_format": "json", "stable_s": 0.2},
                      env={"OMP_NUM_THREADS": "1"}, cwd=REPO)
    (tmp / "in" / "2026-11-30").mkdir(parents=True)
    (tmp / "daemon").mkdir()
    d.start()
    rng = np.random.default_rng(5)
    try:
        for i in range(n):
            arr = normal(rng)
            if rng.random() < ANOMALY_RATE:
                arr[10:22, 10:22] = 255
            tmp_name = tmp / "in" / "2026-11-30" / f".cam1-{i:08d}.png.tmp"
            Image.fromarray(arr).save(tmp_name, format="PNG")
            os.rename(tmp_name, tmp_name.with_name(f"cam1-{i:08d}.png"))
        d.wait_for(lambda: sum(v for k, v in d.metrics().items() if k.startswith(("anomon_images_scored_total{",
                   "anomon_image_errors_total{"))) >= n, 600, f"{n} images scored", poll_s=1.0)
        time.sleep(2.0)  # alerts.jsonl catches up
        alerts = d.metric('anomon_alerts_total{line="default"}')
    finally:
        d.stop()
    state = tmp / "state"
    anomalies = sum(p.stat().st_size for p in (state / "anomalies").iterdir())
    jsonl = (state / "alerts.jsonl").stat().st_size if (state / "alerts.jsonl").exists() else 0
    path_len = len(str((tmp / "in" / "2026-11-30" / "cam1-00000000.png").resolve()))
    return {"images": n, "ledger": ledger_bytes(state / "ledger.sqlite3"), "alerts": alerts, "jsonl": jsonl,
            "anomalies": anomalies, "path_len": path_len}


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}, SQLite "
            f"{sqlite3.sqlite_version}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def mb(x: float) -> str:
    return f"{x / 1e6:.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=PER, help="images recorded through Ledger.record (default %(default)s)")
    ap.add_argument("--keep", type=int, default=10_000, help="rows the retention pass keeps (default %(default)s)")
    ap.add_argument("--daemon", type=int, default=2000, help="images through the real daemon (0: skip)")
    ap.add_argument("--photos", nargs="*", default=[], metavar="NAME=DIR",
                    help="more photo folders for the copies' sizes, each named")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/disk_usage.md")
    args = ap.parse_args()
    folders = {"sample_data/anomalous": REPO / "sample_data" / "anomalous"}
    for spec in args.photos:
        name, sep, folder = spec.partition("=")
        if not sep or not Path(folder).is_dir():
            sys.exit(f"--photos: give NAME=DIR with an existing folder, not {spec!r}")
        folders[name] = Path(folder)
    started = datetime.now(timezone.utc)
    before = machine()
    t_all = time.monotonic()
    lines: list[str] = []
    say = lambda s="": (print(s, flush=True), lines.append(s))  # noqa: E731

    with tempfile.TemporaryDirectory(prefix="anomon-disk-") as tmp_s:
        tmp = Path(tmp_s)
        sd = tmp / "state"
        led = Ledger.open(sd / "ledger.sqlite3")
        took = record(led, args.n)
        size = ledger_bytes(led.path)
        tables = per_table(led.path)
        n_alerts = int(led._conn.execute("SELECT COUNT(*) FROM alerts").fetchone()[0])
        scale = PER / args.n

        ex = JsonlExporter(led.reopen(), sd)
        while ex.step():
            pass
        jsonl = (sd / "alerts.jsonl").stat().st_size

        say("## Ledger, through Ledger.record")
        say()
        say(f"{args.n:,} images in batches of {BATCH} with their drift state ({took:.1f} s, "
            f"{args.n / took:,.0f} images/s), {n_alerts:,} anomalous ({100 * n_alerts / args.n:.1f} %); paths of "
            f"{len(verdicts(0, 1, 0, np.random.default_rng())[0].path)} characters.")
        say()
        say("| what | bytes per image | per 100,000 images |")
        say("|---|---|---|")
        say(f"| ledger.sqlite3 (after a WAL checkpoint) | {size / args.n:.0f} | {mb(size * scale)} |")
        for name, b in list(tables.items())[:9]:
            say(f"| - {name} | {b / args.n:.0f} | {mb(b * scale)} |")
        say(f"| alerts.jsonl | {jsonl / n_alerts:.0f} per alert | {mb(jsonl * scale)} |")
        say()

        # -- retention
        with Writer(led, args.n) as w0:
            time.sleep(3.0)
        base = w0.waits
        ret = Retention(led.reopen(), Policy(max_images=args.keep), cursors=[JsonlExporter.CURSOR])
        with Writer(led, w0.written) as w:
            r = ret.run_pass()
        rows_now = int(led._conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        records = int(led._conn.execute("SELECT COUNT(*) FROM pruned").fetchone()[0])
        after = ledger_bytes(led.path)
        used = used_bytes(led.path)
        t_after = per_table(led.path)
        record_bytes = t_after.get("pruned", 0) + t_after.get("seen", 0)
        led.close()
        conn = sqlite3.connect(sd / "ledger.sqlite3")
        conn.execute("VACUUM")
        conn.close()
        vacuumed = ledger_bytes(sd / "ledger.sqlite3")

        say("## Retention")
        say()
        say(f"Retention.run_pass with retention_max_images = {args.keep:,} on those {args.n:,} rows (plus "
            f"{w0.written - args.n:,} written before), while a writer recorded a batch of {BATCH} and waited "
            f"20 ms, over and over ({len(w.waits) * BATCH / r.seconds:,.0f} images/s during the pass).")
        say()
        say("| | |")
        say("|---|---|")
        say(f"| pruned | {r.images:,} image rows, {r.alerts:,} alerts, in {r.batches} transactions, {r.seconds:.1f} s |")
        say(f"| longest pruning transaction | {r.longest_s * 1000:.0f} ms |")
        say(f"| writer's commit of 16, no pruning ({len(base)} batches) | p50 {pct(base, 50) * 1000:.1f} ms, "
            f"p99 {pct(base, 99) * 1000:.1f} ms, max {max(base) * 1000:.1f} ms |")
        say(f"| ... during the pass ({len(w.waits)} batches) | p50 {pct(w.waits, 50) * 1000:.1f} ms, "
            f"p99 {pct(w.waits, 99) * 1000:.1f} ms, max {max(w.waits) * 1000:.1f} ms |")
        say(f"| rows left | {rows_now:,} images, {records:,} records of pruned images |")
        say(f"| ledger file after | {mb(after)} (pages in use {mb(used)}: SQLite reuses the freed pages, the file does not shrink) |")
        say(f"| kept per pruned image (its seen row + record) | {record_bytes / max(1, records):.0f} bytes "
            f"({mb(record_bytes / max(1, records) * PER)} per 100,000, until the file leaves the folder) |")
        say(f"| after VACUUM (offline) | {mb(vacuumed)} |")
        say()

        # -- copies
        cp = copies(folders, tmp)
        say("## Anomaly copies (AnomalyStore.save)")
        say()
        say(f"| photos | images | size | copy | heat map | per anomaly | {int(ANOMALY_RATE * 100)} % of 100,000 images |")
        say("|---|---|---|---|---|---|---|")
        for name, (k, c, h, sz) in cp.items():
            say(f"| {name} | {k} | {sz} | {c / 1e3:.1f} kB | {h / 1e3:.1f} kB | {(c + h) / 1e3:.1f} kB | "
                f"{mb((c + h) * PER * ANOMALY_RATE)} |")
        say()

        if args.daemon:
            dc = daemon_check(args.daemon, tmp / "d")
            say("## Cross-check: the real daemon")
            say()
            say(f"`anomon watch` on {dc['images']:,} 32x32 PNGs ({dc['alerts']:.0f} anomalous; paths of "
                f"{dc['path_len']} characters): ledger {dc['ledger'] / dc['images']:.0f} bytes per image "
                f"({mb(dc['ledger'] / dc['images'] * PER)} per 100,000), alerts.jsonl "
                f"{dc['jsonl'] / max(1, dc['alerts']):.0f} bytes per alert, anomaly copies "
                f"{dc['anomalies'] / max(1, dc['alerts']) / 1e3:.1f} kB per anomaly (32x32 images).")
            say()

    say("## Notes")
    say()
    say("- Written through the real code: the ledger by `Ledger.record` (batches of 16, drift state "
        "included), alerts.jsonl by `JsonlExporter`, copies by `AnomalyStore.save`, pruning by "
        "`Retention.run_pass`; the last section runs the real daemon. Ledger bytes per image grow with "
        "the path's length (it is stored in images, their (path, SHA-256) index and seen: about 3 bytes "
        "per character) and a little with the share of anomalies (an alert row each); the daemon's "
        "cross-check has longer paths and its 2-epoch model flags far more than 5 %.")
    say("- A pruned image keeps its seen row and a (path, image id, SHA-256) record while its file is "
        "in the folder (exactly once); the record goes once the file has gone from a folder that is there.")
    say("- SQLite reuses freed pages: after pruning the file keeps its size and stops growing while the "
        "daemon runs at a steady state; `VACUUM` with the daemon stopped gives the space back.")
    cmd = "python " + " ".join(shlex.quote(a) for a in ["bench/disk_usage.py", *sys.argv[1:]])
    head = [
        "# Disk usage per 100,000 images, and retention",
        "",
        f"`{cmd}`",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC, {before} before, {machine().split('load average ')[1]} after "
        f"({(time.monotonic() - t_all) / 60:.1f} min; a shared machine)",
        "",
    ]
    if not args.no_write:
        RESULTS.write_text("\n".join(head + lines).rstrip() + "\n")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
