"""Command line: argument parsing only; every command calls the modules that do the work.

User mistakes (a missing folder, a corrupt image, a tampered model, a bad flag) end in ONE line on
stderr, `anomon: error: ...`, and exit status 2. A traceback means a bug in anomon.

Heavy libraries (torch, scikit-learn, matplotlib) are imported inside the commands that need them:
`anomon --help`, `--version` and `anomon verdicts` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomon import __version__
from anomon.config import TrainConfig, WatchConfig
from anomon.errors import UserError

if TYPE_CHECKING:
    from anomon.detector import Detector
    from anomon.scoring import ScoreRecord

log = logging.getLogger("anomon")

EXIT_USER_ERROR = 2
TRAIN = TrainConfig()  # the one source of the defaults the help text shows
WATCH_DEFAULTS = WatchConfig.model_fields


# ---------------------------------------------------------------------------------------- helpers
def _image_files(folder: Path, what: str) -> list[Path]:
    from anomon.images import IMAGE_SUFFIXES, iter_image_files

    if not folder.exists():
        raise UserError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"{what} path is not a folder: {folder}")
    files = list(iter_image_files(folder))
    if not files:
        exts = ", ".join(sorted(IMAGE_SUFFIXES))
        raise UserError(f"no images found under {folder} (looked for {exts})")
    return files


def _load_folder(
    folder: Path, what: str, *, skip_bad: bool, image_size: int, channels: int, extra: Sequence[Path] = ()
) -> tuple[Any, list[Path]]:
    from anomon.images import load_arrays

    X, ok, failed = load_arrays(_image_files(folder, what) + list(extra), image_size=image_size, channels=channels)
    if failed and skip_bad:
        for path, err in failed:
            log.warning("skipping %s (%s)", err, err.reason)
    if failed and not skip_bad:
        path, err = failed[0]
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise UserError(f"unusable image in {what} data: {err} [{err.reason}]{more}; fix or remove it, or pass --skip-bad")
    if len(ok) == 0:
        raise UserError(f"no readable images under {folder}")
    return X, ok


def _inspect(files: list[Path]) -> tuple[list[tuple[int, int]], bool]:
    """Sizes and whether every image is greyscale, from headers only (cheap)."""
    from PIL import Image

    sizes: list[tuple[int, int]] = []
    grey = True
    for p in files:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
                grey = grey and im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
        except Exception:  # decoding errors are reported properly by the full load
            continue
    return sizes, grey


def _load_detector(path: Path, device: str = "auto") -> Detector:
    from anomon.detector import Detector

    return Detector.load(path, device=device)


def _score_folder(det: Detector, folder: Path | None, what: str, *, skip_bad: bool,
                  extra: Sequence[Path] = ()) -> tuple[Any, list[Path]]:
    """Scores of every image in a folder (and of `extra` files: judged alerts) through the one
    scoring path; bad images as in training."""
    import numpy as np

    from anomon.scoring import score_items

    files = (_image_files(folder, what) if folder is not None else []) + list(extra)
    if not files:
        raise UserError(f"no {what} images: give a folder, or judge some alerts as "
                        f"{'false alarms' if what == 'normal' else 'defects'} first")
    recs = list(score_items(det, files))
    failed = [r for r in recs if r.error is not None]
    if failed and skip_bad:
        for r in failed:
            log.warning("skipping %s (%s)", r.message, r.error)
    if failed and not skip_bad:
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise UserError(f"unusable image in {what} data: {failed[0].message} [{failed[0].error}]{more}; "
                        "fix or remove it, or pass --skip-bad")
    ok = [(r.score, p) for r, p in zip(recs, files) if r.error is None]
    if not ok:
        raise UserError(f"no readable {what} images" + (f" under {folder}" if folder is not None else ""))
    return np.array([s for s, _ in ok], dtype=np.float64), [p for _, p in ok]


def _judged(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """--judgements STATE_DIR: the judged alerts' images, false alarms as normal images and defects
    as anomalous ones (([], []) without the flag). Said on stderr, so the counts are on record."""
    if not getattr(args, "judgements", None):
        if getattr(args, "line", None):
            raise UserError("--line chooses the line of --judgements; give --judgements STATE_DIR too")
        return [], []
    from anomon.judgements import LabelsError, judged_lines, labelled_images

    state_dir = Path(args.judgements)
    try:
        line = args.line
        if line is None:
            found = judged_lines(state_dir)
            if len(found) > 1:
                raise UserError(f"the judgements in {state_dir} cover lines {', '.join(found)}; each line has "
                                "its own model: choose one with --line")
        labelled = labelled_images(state_dir, line=line)
    except LabelsError as e:
        raise UserError(str(e)) from None
    gone = (f"; {labelled.missing} judged alert(s) left out: their image is no longer kept"
            if labelled.missing else "")
    print(f"judgements from {state_dir}{f' (line {line})' if line else ''}: {len(labelled.normal)} false "
          f"alarm(s) as normal images, {len(labelled.anomalous)} defect(s) as anomalous images{gone}",
          file=sys.stderr)
    return labelled.normal, labelled.anomalous


def _warn_if_trained_on(det: Detector, folder: Path, doing: str) -> None:
    """Scores of training images say nothing about new parts (the model has seen them): a
    calibration or evaluation on them looks perfect and promises nothing."""
    trained = det.metadata.get("data_dir")
    if not trained:
        return
    a, b = Path(trained).resolve(), folder.resolve()
    if a == b or a in b.parents or b in a.parents:
        print(f"WARNING: {doing} on {folder}, which overlaps the training folder {trained}: the model has "
              "seen these images, so the figures are optimistic; use normal images it was not trained on",
              file=sys.stderr)


# ---------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from anomon.calibrate import min_images_for
    from anomon.detector import Detector, auto_image_size, holdout_size
    from anomon.images import shape_of

    defaults = TRAIN
    data = Path(args.data_dir)
    out = Path(args.output)
    _check_writable(out)  # before minutes of training, not after
    false_alarms, _ = _judged(args)  # judged normal: the model should learn them as such
    files = _image_files(data, "training") + false_alarms
    sizes, grey = _inspect(files)
    image_size = args.image_size or defaults.image_size or auto_image_size(sizes, defaults.max_auto_size)
    channels = args.channels or defaults.channels or (1 if grey else 3)
    X, ok = _load_folder(data, "training", skip_bad=args.skip_bad, image_size=image_size, channels=channels,
                         extra=false_alarms)
    fpr = args.target_fpr if args.target_fpr is not None else defaults.target_fpr
    holdout = defaults.holdout
    n_hold = holdout_size(len(ok), holdout)
    if len(ok) < 10:
        raise UserError(f"need at least 10 training images, found {len(ok)} under {data}")
    h, w = shape_of(image_size)
    log.info(
        "training on %d images (%d held out to calibrate) at %dx%d, %d channel(s)",
        len(ok) - n_hold, n_hold, w, h, channels,
    )
    det = Detector(
        image_size=image_size,
        channels=channels,
        latent_dim=args.latent_dim or defaults.latent_dim,
        epochs=args.epochs or defaults.epochs,
        # An explicit --epochs is what the user asked for; only the default is a step budget.
        max_steps=None if args.epochs else defaults.max_steps,
        batch_size=args.batch_size or defaults.batch_size,
        learning_rate=defaults.learning_rate,
        patience=defaults.patience,
        holdout=holdout,
        target_fpr=fpr,
        seed=args.seed if args.seed is not None else defaults.seed,
        device=args.device,
        time_budget_s=args.time_budget or defaults.time_budget_s,
    )
    det.fit(X)
    det.metadata["data_dir"] = str(data.resolve())
    det.metadata["n_images"] = len(ok)
    if false_alarms:
        det.metadata["judgements"] = str(Path(args.judgements).resolve())
        det.metadata["n_false_alarms"] = len(false_alarms)
    model_id = det.save(out)
    cal = det.calibration_info_
    print(
        f"model {model_id} written to {out}: threshold {det.threshold_:.4f} "
        f"at target false-alarm rate {fpr:.3g} (expected {cal['expected_fpr']:.3g}, {cal['n']} held-out images); "
        f"{det.metadata['epochs_run']} epochs in {det.metadata['train_seconds']:.1f}s"
    )
    for warning in det.warnings():
        print(f"WARNING: {warning}", file=sys.stderr)
    if not cal["guaranteed"]:
        log.warning(
            "only %d held-out images: the %.3g false-alarm target needs at least %d; "
            "recalibrate with `anomon calibrate` on more normal images",
            cal["n"], fpr, min_images_for(fpr),
        )
    return 0


def _check_writable(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder does not exist: {parent}")
    if out.is_dir():
        raise UserError(f"output path is a folder: {out}")


# ---------------------------------------------------------------------------------------- calibrate
def cmd_calibrate(args: argparse.Namespace) -> int:
    from anomon.calibrate import min_images_for

    out = Path(args.output or args.model)
    _check_writable(out)
    det = _load_detector(Path(args.model))
    normal_dir = Path(args.normal_dir)
    false_alarms, defects = _judged(args)
    normal_scores, _ = _score_folder(det, normal_dir, "normal", skip_bad=args.skip_bad, extra=false_alarms)
    anomalous_scores = None
    if args.anomalous or defects:
        anomalous_scores, _ = _score_folder(det, Path(args.anomalous) if args.anomalous else None, "anomalous",
                                            skip_bad=args.skip_bad, extra=defects)
    _warn_if_trained_on(det, normal_dir, "calibrating")
    fpr = args.target_fpr if args.target_fpr is not None else det.target_fpr
    old_id = det.model_id
    cal = det.calibrate(normal_scores, target_fpr=fpr)
    det.metadata["calibrated_on"] = str(normal_dir.resolve())
    new_id = det.save(out)
    print(
        f"threshold {det.threshold_:.4f} from {cal.n_calibration_} normal images at target false-alarm rate "
        f"{fpr:.3g}; expected false-alarm rate {cal.expected_fpr_:.3g}"
    )
    print(f"model {old_id} -> {new_id} written to {out}")
    if not cal.guaranteed_:
        log.warning(
            "%d images are too few for a %.3g false-alarm target (need at least %d): "
            "the threshold is the largest normal score",
            cal.n_calibration_, fpr, min_images_for(fpr),
        )
    if anomalous_scores is not None:
        _print_evaluation(det, normal_scores, anomalous_scores)
    return 0


def _print_evaluation(det: Detector, normal_scores: Any, anomalous_scores: Any) -> Any:
    from anomon.calibrate import evaluate

    ev = evaluate(normal_scores, anomalous_scores, det.threshold_)
    print(f"AUROC {ev.auroc:.4f}   average precision {ev.average_precision:.4f}")
    print(
        f"at threshold {ev.threshold:.4f}: detection rate {ev.detection_rate:.1%} "
        f"({round(ev.detection_rate * ev.n_anomalous)}/{ev.n_anomalous} anomalous), "
        f"false-alarm rate {ev.false_alarm_rate:.1%} ({round(ev.false_alarm_rate * ev.n_normal)}/{ev.n_normal} normal)"
    )
    return ev


# ---------------------------------------------------------------------------------------- score
def _expand(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, name relative to the argument it came from), so heat maps mirror the input layout."""
    from anomon.images import iter_image_files

    out: list[tuple[Path, Path]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend((f, f.relative_to(p)) for f in iter_image_files(p))
        elif p.exists() or p.is_symlink():
            out.append((p, Path(p.name)))
        else:
            raise UserError(f"no such file or folder: {p}")
    if not out:
        raise UserError("no images found in " + ", ".join(paths))
    return out


def _write_heatmap(det: Detector, rec: ScoreRecord, dest: Path) -> str:
    from anomon.heatmap import save_overlay

    return str(save_overlay(dest, rec.image, rec.heatmap, vmax=det.heat_vmax, vmin=det.heat_vmin))


def cmd_score(args: argparse.Namespace) -> int:
    det = _load_detector(Path(args.model))
    items = _expand(args.paths)
    fmt = args.format or ("table" if sys.stdout.isatty() else "jsonl")
    heatmaps = Path(args.heatmaps) if args.heatmaps else None
    errors = 0
    fields = ["path", "score", "threshold", "anomalous", "p_value", "model_id", "error"]
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore") if fmt == "csv" else None
    if writer:
        writer.writeheader()
    if fmt == "table":
        print(f"{'verdict':<10} {'score':>9} {'p-value':>8}  path")
    from anomon.scoring import score_items

    for (_, rel), r in zip(items, score_items(det, [p for p, _ in items], heatmaps=heatmaps is not None)):
        rec = {("path" if k == "source" else k): (round(v, 6) if isinstance(v, float) else v)
               for k, v in r.to_dict().items()}
        if heatmaps is not None and r.error is None:
            rec["heatmap"] = _write_heatmap(det, r, heatmaps / rel.with_suffix(".png"))
        errors += r.error is not None
        if fmt == "jsonl":
            print(json.dumps(rec), flush=True)
        elif writer:
            writer.writerow(rec)
        else:
            if "error" in rec:
                print(f"{'ERROR':<10} {'':>9} {'':>8}  {rec['path']}  ({rec['message']})")
            else:
                verdict = "ANOMALOUS" if rec["anomalous"] else "normal"
                print(f"{verdict:<10} {rec['score']:>9.3f} {rec['p_value']:>8.4f}  {rec['path']}")
    if errors:
        print(f"anomon: {errors} of {len(items)} images could not be scored", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


# ---------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    if not args.judgements and not (args.normal and args.anomalous):
        raise UserError("give --normal DIR and --anomalous DIR, or --judgements STATE_DIR (either or both)")
    false_alarms, defects = _judged(args)
    det = _load_detector(Path(args.model))
    normal_dir = Path(args.normal) if args.normal else None
    anomalous_dir = Path(args.anomalous) if args.anomalous else None
    sn, n_paths = _score_folder(det, normal_dir, "normal", skip_bad=args.skip_bad, extra=false_alarms)
    sa, a_paths = _score_folder(det, anomalous_dir, "anomalous", skip_bad=args.skip_bad, extra=defects)
    print(f"model {det.model_id}: {len(sn)} normal, {len(sa)} anomalous images")
    if normal_dir is not None:
        _warn_if_trained_on(det, normal_dir, "evaluating")
    for warning in det.warnings():
        print(f"WARNING: {warning}")
    ev = _print_evaluation(det, sn, sa)
    if args.report:
        from anomon.report import write_report

        out = write_report(Path(args.report), det, ev, sn, sa, n_paths, a_paths)
        print(f"report written to {out}")
    return 0


# ---------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    det = _load_detector(Path(args.model))
    print(json.dumps(det.info(), indent=2, sort_keys=True))
    return 0


# ---------------------------------------------------------------------------------------- watch
def cmd_watch(args: argparse.Namespace) -> int:
    from anomon.config import load_watch_config
    from anomon.service import run

    cfg = load_watch_config(Path(args.config) if args.config else None, {
        "model": args.model, "watch": args.watch, "state": args.state, "listen": args.listen,
        "device": args.device, "polling": True if args.polling else None,
        "new_ledger": True if args.new_ledger else None,
    })
    return run(cfg)


def cmd_verdicts(args: argparse.Namespace) -> int:
    from anomon.verdicts import VerdictsError, parse_since, write_verdicts

    fmt = args.format or ("table" if sys.stdout.isatty() else "jsonl")
    try:
        since = parse_since(args.since) if args.since else None
        write_verdicts(Path(args.state), sys.stdout, since=since, anomalous_only=args.anomalous_only, fmt=fmt,
                       line=args.line)
    except VerdictsError as e:
        raise UserError(str(e)) from None
    return 0


# ---------------------------------------------------------------------------------------- review
def cmd_review_export(args: argparse.Namespace) -> int:
    from anomon.judgements import LabelsError, export

    fmt = args.format or ("csv" if sys.stdout.isatty() else "jsonl")
    try:
        n = export(Path(args.state), sys.stdout, fmt=fmt, line=args.line, everything=args.all, audit_trail=args.audit)
    except LabelsError as e:
        raise UserError(str(e)) from None
    print(f"anomon: {n} record(s)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from anomon.demo import DemoError, DemoOptions, run_demo

    opts = DemoOptions(
        once=args.once, workdir=Path(args.workdir), model=Path(args.model) if args.model else None,
        port=args.port, epochs=args.epochs, image_size=args.image_size,
        time_budget_s=args.time_budget, interval_s=args.interval,
    )
    try:
        return run_demo(opts)
    except DemoError as e:
        raise UserError(str(e)) from None


# ---------------------------------------------------------------------------------------- parser
def _number(text: str, kind: type, ok: Callable[[Any], bool], rule: str) -> Any:
    """Parse one numeric flag; argparse turns the error into a one-line usage message."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"{rule}, got {v}")
    return v


def _fpr(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v < 1.0, "must be between 0 and 1 (exclusive)")


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "must be at least 1")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "must be positive")


def _port(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= 65535, "must be between 0 and 65535")


def _image_size(text: str) -> int | tuple[int, int]:
    """N (a square) or WxH (width x height, both above 64: smaller sizes use a square code)."""
    if "x" in text.lower():
        w_text, _, h_text = text.lower().partition("x")
        w, h = _positive_int(w_text), _positive_int(h_text)
        if not (65 <= w <= 2048 and 65 <= h <= 2048):
            raise argparse.ArgumentTypeError(f"WxH needs both sides between 65 and 2048, got {text}")
        return h, w
    return _number(text, int, lambda v: 8 <= v <= 1024, "must be between 8 and 1024")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors end in one line, like every other anomon error."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"anomon: error: {message} (see '{self.prog} --help')\n")


def _d(value: Any) -> str:
    return f" (default {value})"


WATCH_EPILOG = """\
endpoints (on --listen, 127.0.0.1 unless configured otherwise):
  /metrics   Prometheus metrics (anomon_*; see deploy/grafana and deploy/prometheus)
  /healthz   200 while the scoring and intake loops are alive (503 when stuck)
  /readyz    200 once the model is loaded and the start-up rescan is done; JSON of each check
  /alerts    recent anomaly alerts as JSON (?since=ALERT_ID&limit=N)
  /review    the review page: alerts and drift alarms with images and heat maps; judging them
             (false alarm / defect, keyboard f/d) needs review_token_file; `anomon review export`

signals:
  SIGTERM, SIGINT  stop: finish the batch in hand; images still waiting are scored at the next start
  SIGHUP           reload the model file (also automatic when the file is replaced); a bundle that
                   fails to load is refused and the old model keeps serving
  SIGUSR1          reset the drift test: its evidence starts again (systemd: `systemctl kill
                   --kill-whom=main -s USR1 anomon`)

drift: after every image judged normal, a test martingale weighs the evidence that images no longer
look like the calibration images (a dimming lamp, a blurred lens, a moved camera: every score a little
higher or lower, none over the threshold). /metrics: anomon_drift_martingale_log10; when it reaches
log10(1/drift_alpha) (2 at the default 0.01) the daemon logs a DRIFT warning, records the alarm in the
ledger (table drift_alarms) and counts it in anomon_drift_alarms_total; a false alarm has probability
at most drift_alpha per reset. The evidence is kept in the ledger across restarts; it starts again when
another model serves and on SIGUSR1 (after fixing the cause, or recalibrating for a wanted change).

state folder: ledger.sqlite3 (every verdict, exactly once), alerts.jsonl, anomalies/ (copies and
heat maps of anomalous images), the webhook spool and dead letters, and a lock (one daemon per folder).

logging: log_format = auto (the default) writes text lines when stderr is a terminal and JSON lines
otherwise (journald, files); set "json" or "text" in the config to choose.

Every setting (with its default and meaning) is in deploy/anomon.toml; flags override the file.
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="anomon", description="Anomaly detection for visual inspection lines.")
    p.add_argument("--version", action="version", version=f"anomon {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a model on a folder of normal images",
                       description="Train an autoencoder on normal images only, hold out a share of them to "
                       "calibrate the threshold, and write one bundle file (weights, preprocessing, threshold).")
    t.add_argument("data_dir", metavar="DATA_DIR", help="folder of normal images (subfolders included)")
    t.add_argument("-o", "--output", metavar="MODEL", required=True, help="bundle file to write (its folder must exist)")
    t.add_argument("--image-size", type=_image_size, help="working size: N for N x N pixels, or WxH (default: from the training images, about 256x256 pixels at most, keeping the aspect ratio of elongated photos)")
    t.add_argument("--channels", type=int, choices=(1, 3), help="1 = greyscale, 3 = colour (default: 1 if every training image is greyscale, else 3)")
    t.add_argument("--epochs", type=_positive_int, help=f"train exactly this many epochs (default: at most {TRAIN.epochs} epochs and {TRAIN.max_steps} optimiser steps, stopping early when the held-out loss stops improving)")
    t.add_argument("--batch-size", type=_positive_int, help="images per optimiser step" + _d(TRAIN.batch_size))
    t.add_argument("--latent-dim", type=_positive_int, help="size of the bottleneck vector of small images" + _d(TRAIN.latent_dim))
    t.add_argument("--seed", type=int, help="random seed: the same seed on the same data gives the same model" + _d(TRAIN.seed))
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default=TRAIN.device, help="auto = CUDA when present" + _d(TRAIN.device))
    t.add_argument("--target-fpr", type=_fpr, help="target false-alarm rate" + _d(TRAIN.target_fpr))
    t.add_argument("--time-budget", type=_positive_float, metavar="SECONDS", help="stop training after this long (default: no limit); a cut-short model is flagged in `anomon info`")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    _judgement_flags(t, "train on the alerts operators judged false alarms too (their kept copies)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="recompute the threshold from normal images",
                       description="Score normal images the model was not trained on and set the threshold at the "
                       "target false-alarm rate (a conformal quantile: the rate is guaranteed on new normal images).")
    c.add_argument("model", metavar="MODEL", help="bundle file")
    c.add_argument("normal_dir", metavar="NORMAL_DIR", help="folder of normal images not used in training")
    c.add_argument("--target-fpr", type=_fpr, help="target false-alarm rate (default: the bundle's)")
    c.add_argument("--anomalous", metavar="DIR", help="also report how the threshold does on these")
    c.add_argument("-o", "--output", metavar="MODEL", help="write here instead of rewriting MODEL")
    c.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    _judgement_flags(c, "add the alerts operators judged false alarms to the normal images, and the defects to "
                     "--anomalous (false alarms are the top of the normal scores only, so the threshold rises "
                     "more than the target asks: see README, Review page)")
    c.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("score", help="score image files or folders",
                       description="One line per image: verdict, score, threshold, p-value, model id; the same "
                       "scoring path as the daemon. Exit status 2 if any image could not be scored.")
    s.add_argument("model", metavar="MODEL", help="bundle file")
    s.add_argument("paths", metavar="PATH", nargs="+", help="image files or folders (subfolders included)")
    s.add_argument("--format", choices=("jsonl", "csv", "table"), help="output format (default: table on a terminal, else jsonl)")
    s.add_argument("--heatmaps", metavar="DIR", help="write a heat-map overlay PNG per image, mirroring the input layout")
    s.set_defaults(func=cmd_score)

    e = sub.add_parser("evaluate", help="AUROC, AP and rates at the threshold on labelled folders",
                       description="Ranking quality (AUROC, average precision) and the false-alarm and detection "
                       "rates at the bundle's threshold, on images the model was not trained on.")
    e.add_argument("model", metavar="MODEL", help="bundle file")
    e.add_argument("--normal", metavar="DIR", help="normal images not used in training (required without --judgements)")
    e.add_argument("--anomalous", metavar="DIR", help="defective images (required without --judgements)")
    e.add_argument("--report", metavar="DIR", help="write ROC curve, histogram, top heat maps and summary.json")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    _judgement_flags(e, "add the alerts operators judged false alarms to the normal images and the defects to "
                     "the anomalous ones")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("info", help="print a model bundle's metadata", description="Print a bundle's metadata as JSON "
                       "(model id, sizes, threshold, calibration, training, warnings); loads no code from the file.")
    i.add_argument("model", metavar="MODEL", help="bundle file")
    i.set_defaults(func=cmd_info)

    w = sub.add_parser("watch", help="the monitoring daemon: watch folders, score new images, alert",
                       description="Watch folders for new images, score each exactly once, record every verdict "
                       "in the state folder's ledger, alert on anomalies, and serve metrics.",
                       epilog=WATCH_EPILOG, formatter_class=fmt)
    w.add_argument("--config", metavar="TOML", help="anomon.toml (every setting: deploy/anomon.toml); the flags below override it")
    w.add_argument("--model", metavar="MODEL", help="bundle file written by `anomon train` (required here or in the config)")
    w.add_argument("--watch", metavar="DIR", action="append", help="folder to watch, subfolders included (repeatable; required here or in the config)")
    w.add_argument("--state", metavar="DIR", help="ledger, alerts.jsonl, anomalies/" + _d(WATCH_DEFAULTS["state"].default))
    w.add_argument("--listen", metavar="HOST:PORT", help="HTTP address of the endpoints below" + _d(WATCH_DEFAULTS["listen"].default))
    w.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto = CUDA when present" + _d(WATCH_DEFAULTS["device"].default))
    w.add_argument("--polling", action="store_true", help="poll the folders instead of inotify (network shares)")
    w.add_argument("--new-ledger", action="store_true", help="start a new ledger in a state folder whose ledger is missing (every image already there is scored and alerted again)")
    w.set_defaults(func=cmd_watch, setup_logging=False)  # the daemon sets up its own (JSON) logging

    v = sub.add_parser("verdicts", help="list the verdicts a daemon's ledger holds",
                       description="Read a state folder's ledger (read-only; safe while the daemon runs).")
    v.add_argument("--state", metavar="DIR", required=True, help="the daemon's state folder")
    v.add_argument("--since", metavar="TIME", help="ISO date/time (UTC), a duration back (2h, 30m), or Unix time (default: all)")
    v.add_argument("--anomalous-only", action="store_true", help="only anomalous verdicts")
    v.add_argument("--line", metavar="NAME", help="only this line's verdicts (default: every line)")
    v.add_argument("--format", choices=("jsonl", "csv", "table"), help="output format (default: table on a terminal, else jsonl)")
    v.set_defaults(func=cmd_verdicts)

    r = sub.add_parser("review", help="the operators' judgements of alerts (the /review page)",
                       description="Work with the judgements operators gave on the daemon's /review page.")
    rsub = r.add_subparsers(dest="review_command", required=True, metavar="ACTION", parser_class=_Parser,
                            help="export: write the judgements (CSV or JSON lines)")
    x = rsub.add_parser("export", help="write the judgements as CSV or JSON lines",
                        description="One record per judged alert or drift alarm, newest first: what was judged "
                        "(time, line, path, score, threshold, p-value, model id, kept copy) and the judgement "
                        "(false_alarm / defect, who, when). Reads the ledger read-only: safe while the daemon runs.")
    x.add_argument("--state", metavar="DIR", required=True, help="the daemon's state folder")
    x.add_argument("--format", choices=("csv", "jsonl"), help="output format (default: csv on a terminal, else jsonl)")
    x.add_argument("--line", metavar="NAME", help="only this line (default: every line)")
    x.add_argument("--all", action="store_true", help="unreviewed alerts and drift alarms too")
    x.add_argument("--audit", action="store_true", help="every change ever made (before, after, who, when, "
                   "from where) instead of the current judgements")
    x.set_defaults(func=cmd_review_export)

    d = sub.add_parser("demo", help="see it work: train on the sample images, run the daemon, feed it images")
    d.add_argument("--once", action="store_true", help="exit after the last image is judged (default: serve until Ctrl-C)")
    d.add_argument("--model", metavar="MODEL", help="use this bundle instead of training one")
    d.add_argument("--workdir", metavar="DIR", default=".anomon-demo", help="demo folder, rebuilt each run (default .anomon-demo)")
    d.add_argument("--port", type=_port, help="HTTP port on 127.0.0.1 (default 9108, or a free one if busy; 0 = any free one)")
    d.add_argument("--epochs", type=_positive_int, help="training epochs (default: as `anomon train`)")
    d.add_argument("--image-size", type=_image_size, help="training image size (default: as `anomon train`)")
    d.add_argument("--time-budget", type=_positive_float, default=90.0, metavar="SECONDS", help="stop training after this long (default 90)")
    d.add_argument("--interval", type=_positive_float, default=0.3, metavar="SECONDS", help="pause between images fed (default 0.3)")
    d.set_defaults(func=cmd_demo)
    return p


def _judgement_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--judgements", metavar="STATE_DIR", help=f"a daemon's state folder: {what}")
    p.add_argument("--line", metavar="NAME", help="with --judgements: only this line's (required when the "
                   "judgements cover several lines)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="anomon: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "setup_logging", True):
        _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as e:  # BundleError, ConfigError, ImageError, StartupError... (anomon.errors)
        print(f"anomon: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("anomon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `anomon score ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
