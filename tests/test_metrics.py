"""The metric catalogue: fixed names, help text, children at zero, no path labels, and every
anomon_* name that deploy/ (alert rules, dashboards) refers to actually exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from anomon.daemon_process import parse_metrics
from anomon.errors import REASONS
from anomon.metrics import P_VALUE_BUCKETS, SCORE_BUCKET_FACTORS, Metrics, score_buckets

REPO = Path(__file__).resolve().parents[1]

REQUIRED = {
    "anomon_images_scored_total": "counter", "anomon_image_errors_total": "counter",
    "anomon_anomaly_score": "histogram", "anomon_score_threshold": "gauge",
    "anomon_scoring_duration_seconds": "histogram", "anomon_intake_latency_seconds": "histogram",
    "anomon_queue_depth": "gauge", "anomon_last_scored_timestamp_seconds": "gauge",
    "anomon_model_info": "gauge", "anomon_model_reloads_total": "counter",
    "anomon_build_info": "gauge", "anomon_alerts_total": "counter",
    "anomon_duplicates_total": "counter", "anomon_webhook_deliveries_total": "counter",
    "anomon_ready": "gauge", "anomon_rescans_total": "counter",
    "anomon_p_value": "histogram", "anomon_drift_martingale_log10": "gauge",
    "anomon_drift_images": "gauge", "anomon_drift_alarms_total": "counter",
    "anomon_drift_resets_total": "counter", "anomon_line_up": "gauge",
    "anomon_drift_alarm_level_log10": "gauge", "anomon_target_false_alarm_ratio": "gauge",
}


def _samples(m: Metrics) -> dict[str, float]:
    return parse_metrics(generate_latest(m.registry).decode())


def test_every_required_metric_is_declared_with_type_and_help() -> None:
    m = Metrics(0.5)
    m.line("default").set_model("abc123", "32", 1, 0.5)
    text = generate_latest(m.registry).decode()
    for name, kind in REQUIRED.items():
        assert f"# TYPE {name} {kind}\n" in text, name
        help_line = next(x for x in text.splitlines() if x.startswith(f"# HELP {name} "))
        assert len(help_line) > len(f"# HELP {name} ") + 10, f"{name} has no real help text"
    assert "process_resident_memory_bytes" in text and "python_gc_objects_collected_total" in text


def test_labelled_children_exist_at_zero_from_the_start() -> None:
    s = _samples(Metrics({"left": 1.0, "right": None}))
    for ln in ("left", "right"):
        for v in ("normal", "anomalous"):
            assert s[f'anomon_images_scored_total{{line="{ln}",verdict="{v}"}}'] == 0
        for r in REASONS:
            assert s[f'anomon_image_errors_total{{line="{ln}",reason="{r}"}}'] == 0
        for r in ("success", "failure"):
            assert s[f'anomon_model_reloads_total{{line="{ln}",result="{r}"}}'] == 0
        for r in ("success", "retry", "dead_letter"):
            assert s[f'anomon_webhook_deliveries_total{{line="{ln}",result="{r}"}}'] == 0
        for r in ("model", "operator"):
            assert s[f'anomon_drift_resets_total{{line="{ln}",reason="{r}"}}'] == 0
        assert s[f'anomon_drift_martingale_log10{{line="{ln}"}}'] == 0
        assert s[f'anomon_drift_alarms_total{{line="{ln}"}}'] == 0
    assert s['anomon_score_threshold{line="left"}'] == 1.0
    assert not any(k == "up" or k.startswith("up{") for k in s)
    assert not any(k.endswith("_created") for k in s)


def test_model_info_shows_only_the_current_model() -> None:
    m = Metrics(1.0)
    m.line("default").set_model("aaa", "32", 1, 1.0)
    m.line("default").set_model("bbb", "64", 3, 2.0, 0.05)
    s = _samples(m)
    assert s['anomon_target_false_alarm_ratio{line="default"}'] == 0.05
    info = [k for k in s if k.startswith("anomon_model_info")]
    assert info == ['anomon_model_info{channels="3",image_size="64",line="default",model_id="bbb"}']
    assert s['anomon_score_threshold{line="default"}'] == 2.0
    assert s['anomon_line_up{line="default"}'] == 1
    assert any(k.startswith("anomon_build_info{version=") for k in s)


def test_score_buckets_sit_around_the_threshold() -> None:
    b = score_buckets(0.02)
    assert len(b) == len(SCORE_BUCKET_FACTORS) and 0.02 in b and b == tuple(sorted(b))
    assert min(b) == pytest.approx(0.005) and max(b) == pytest.approx(0.08)
    assert score_buckets(float("nan")) == score_buckets(1.0)  # no crash on a strange model
    m = Metrics(0.02)
    m.line("default").anomaly_score.observe(0.019)
    m.line("default").anomaly_score.observe(0.5)
    s = _samples(m)
    assert s['anomon_anomaly_score_bucket{le="0.02",line="default"}'] == 1
    assert s['anomon_anomaly_score_bucket{le="+Inf",line="default"}'] == 2


def test_one_score_histogram_resolves_every_lines_threshold() -> None:
    b = score_buckets([0.02, 5.0, float("nan")])
    assert {0.02, 5.0} <= set(b) and 1.0 in b  # NaN: placed around 1.0
    m = Metrics({"a": 0.02, "b": 5.0})
    les = {k.split('le="')[1].split('"')[0] for k in _samples(m) if k.startswith("anomon_anomaly_score_bucket")}
    assert {"0.02", "5.0"} <= les


def test_p_value_buckets_are_fixed_from_0_01_to_1() -> None:
    """Unlike the score's, the p-value buckets do not move with the model: a p-value means the
    same under any model, and a uniform histogram is what an unchanged line looks like."""
    assert P_VALUE_BUCKETS[0] == 0.01 and P_VALUE_BUCKETS[-1] == 1.0
    assert list(P_VALUE_BUCKETS) == sorted(set(P_VALUE_BUCKETS))
    for threshold in (0.02, 50.0):
        m = Metrics(threshold)
        m.line("default").p_value.observe(0.005)
        m.line("default").p_value.observe(0.55)
        s = _samples(m)
        les = sorted(float(k.split('le="')[1].split('"')[0]) for k in s if k.startswith("anomon_p_value_bucket"))
        assert les == [*P_VALUE_BUCKETS, float("inf")]
        assert s['anomon_p_value_bucket{le="0.01",line="default"}'] == 1
        assert s['anomon_p_value_bucket{le="0.6",line="default"}'] == 2


def test_separate_instances_do_not_collide() -> None:
    Metrics(1.0)
    Metrics(1.0, registry=CollectorRegistry())  # no "Duplicated timeseries"


def test_deploy_files_only_use_metrics_that_exist() -> None:
    m = Metrics(1.0)
    m.line("default").set_model("x", "32", 1, 1.0)
    m.count_judgements(lambda: {})  # the review page's counts (registered when the daemon serves it)
    exposed = {k.split("{")[0] for k in _samples(m)}
    used = set()
    for f in (REPO / "deploy").rglob("*"):
        if f.is_file() and f.suffix in (".yml", ".yaml", ".json"):
            used |= set(re.findall(r"\b(anomon_[a-z0-9_]+)", f.read_text(errors="replace")))
    missing = {u for u in used if u not in exposed}
    assert not missing, f"deploy/ refers to metrics the daemon does not export: {sorted(missing)}"
