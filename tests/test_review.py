"""The review page over HTTP (anomon.review behind anomon.web), in-process on a free port against a
real ledger and real kept copies: what it lists, what it escapes, which requests it refuses, which
files it serves, and the metrics the judgements feed. The browser tests are test_review_browser.py."""

from __future__ import annotations

import http.client
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anomon.config import load_watch_config
from anomon.daemon_process import parse_metrics
from anomon.errors import ConfigError
from anomon.metrics import Metrics
from anomon.review import ReviewPage
from anomon.state import ANOMALIES_DIR
from anomon.web import WebServer
from test_judgements import make_state

TOKEN = "t0ken-for-tests-0123456789"
ODD = 'q"uote\'s <script>alert(1)</script>\nline & <b>bold</b>.png'


class Site:
    def __init__(self, state: Path, token: str | None) -> None:
        self.state = state
        self.metrics = Metrics(1.0, process_collectors=False)
        self.page = ReviewPage(state, token=token, metrics=self.metrics)
        self.srv = WebServer("127.0.0.1", 0, registry=self.metrics.registry, ready=lambda: {"ok": True},
                             healthy=lambda: True, ledger_file=state / "ledger.sqlite3", review=self.page)
        self.srv.start()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path)

    def judge(self, kind: str, item_id: Any, judgement: str | None, *, who: str = "ana",
              token: str | None = TOKEN, csrf: str | None = None, **headers: str) -> tuple[int, dict[str, Any]]:
        h = {"Content-Type": "application/json", "X-CSRF-Token": self.page.csrf if csrf is None else csrf}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        status, _, body = self.request("POST", "/review/judge", json.dumps(
            {"kind": kind, "id": item_id, "judgement": judgement, "who": who}).encode(), h)
        return status, json.loads(body)

    def metric_values(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics")[2].decode())


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "state"
    make_state(s, [("a.png", "l1", 10.0), (ODD, "l1", 20.0), ("c.png", "l2", 30.0)], drift=[("l1", 25.0)]).close()
    return s


@pytest.fixture
def site(state: Path) -> Iterator[Site]:
    s = Site(state, TOKEN)
    yield s
    s.srv.stop()


@pytest.fixture
def readonly(state: Path) -> Iterator[Site]:
    s = Site(state, None)
    yield s
    s.srv.stop()


def untagged(html: str) -> str:
    return re.sub(r"<[^>]*>", "", html)


def articles(html: str) -> list[str]:
    return re.findall(r'<article class="item [^"]*" id="([a-z]+-[0-9]+)"', html)


# -- the page ----------------------------------------------------------------------------------------


def test_the_page_lists_alerts_and_drift_alarms_newest_first_with_their_facts(site: Site) -> None:
    status, headers, body = site.get("/review?state=all")
    html = body.decode()
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert articles(html) == ["alert-3", "drift-1", "alert-2", "alert-1"]
    first = html[html.index('id="alert-3"'):html.index('id="drift-1"')]
    for fact in ("1970-01-01 00:00:30Z", ">l2<", ">7 <", "(7× threshold)", ">1<", ">0.001<", ">m1<",
                 'src="/review/heatmap/3"', "/cam/l2/c.png", "unreviewed"):
        assert fact in first, fact
    drift = html[html.index('id="drift-1"'):html.index('id="alert-2"')]
    assert "drift alarm" in drift and "10<sup>2.1</sup>" in drift and "scores higher" in drift
    assert "Real drift" in drift
    assert 'name="csrf-token" content="' + site.page.csrf + '"' in html
    assert "4 unreviewed · 0 false alarm · 0 defect" in untagged(html)


def test_every_ledger_value_is_escaped_and_only_the_pages_own_script_runs(site: Site) -> None:
    status, headers, body = site.get("/review?state=all")
    html = body.decode()
    assert "<script>alert(1)" not in html and "<b>bold" not in html
    assert "q&quot;uote&#x27;s &lt;script&gt;alert(1)&lt;/script&gt;\nline &amp; &lt;b&gt;bold&lt;/b&gt;.png" in html
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["content-security-policy"]).group(1)
    assert re.findall(r"<script[^>]*>", html) == [f'<script nonce="{nonce}">']
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert nonce != re.search(r"nonce-([^']+)'", site.get("/review")[1]["content-security-policy"]).group(1)


def test_a_name_that_is_not_utf8_is_shown_escaped(tmp_path: Path) -> None:
    s = tmp_path / "state"
    make_state(s, [(os.fsdecode(b"bad\xff<i>.png"), "default", 1.0)]).close()
    site = Site(s, None)
    try:
        status, _, body = site.get("/review")
        assert status == 200 and "bad\\udcff&lt;i&gt;.png" in body.decode()
    finally:
        site.srv.stop()


@pytest.mark.parametrize("query, want", [
    ("", ["alert-3", "drift-1", "alert-2", "alert-1"]),  # default: unreviewed
    ("?line=l1&state=all", ["drift-1", "alert-2", "alert-1"]),
    ("?line=l2", ["alert-3"]),
    ("?kind=drift&state=all", ["drift-1"]),
    ("?state=defect", []),
    ("?state=all&before=drift-1", ["alert-2", "alert-1"]),
    ("?line=nowhere", []),
])
def test_filters(site: Site, query: str, want: list[str]) -> None:
    status, _, body = site.get(f"/review{query}")
    assert status == 200 and articles(body.decode()) == want


def test_filters_follow_judgements(site: Site) -> None:
    assert site.judge("alert", 2, "false_alarm")[0] == 200
    assert site.judge("drift", 1, "defect")[0] == 200
    assert articles(site.get("/review")[2].decode()) == ["alert-3", "alert-1"]
    assert articles(site.get("/review?state=false_alarm")[2].decode()) == ["alert-2"]
    html = site.get("/review?state=defect")[2].decode()
    assert articles(html) == ["drift-1"] and "real drift" in html and "by ana, " in html
    summary = "2 unreviewed · 1 false alarm · 1 defect · 50% of reviewed were false"
    assert summary in untagged(site.get("/review")[2].decode())


@pytest.mark.parametrize("query", ["state=maybe", "kind=image", "before=../etc", "before=alert-x",
                                   "state=all&state=defect", "line=" + "x" * 300])
def test_a_bad_query_is_a_one_line_400(site: Site, query: str) -> None:
    status, _, body = site.get(f"/review?{query}")
    assert status == 400 and body.count(b"\n") == 1 and json.loads(body)["error"]


def test_the_page_holds_many_alerts_in_pages(tmp_path: Path) -> None:
    s = tmp_path / "state"
    make_state(s, [(f"x{i}.png", "default", float(i)) for i in range(60)]).close()
    site = Site(s, None)
    try:
        html = site.get("/review")[2].decode()
        assert len(articles(html)) == 50 and articles(html)[0] == "alert-60"
        older = re.search(r'<a id="older" href="([^"]+)"', html).group(1).replace("&amp;", "&")
        html = site.get(older)[2].decode()
        assert articles(html) == [f"alert-{i}" for i in range(10, 0, -1)] and 'id="older"' not in html
    finally:
        site.srv.stop()


# -- judging: who may ---------------------------------------------------------------------------------


def test_without_a_token_in_the_config_the_page_is_read_only(readonly: Site) -> None:
    html = readonly.get("/review")[2].decode()
    assert "Read-only: judging is off" in html and 'id="token"' not in html
    assert html.count("disabled>") == 3 * 4
    status, body = readonly.judge("alert", 1, "defect")
    assert status == 403 and "judging is off" in body["error"]
    assert readonly.judge("alert", 1, "defect", token=None)[0] == 403


@pytest.mark.parametrize("change, status, says", [
    ({"token": None}, 401, "needs the review token"),
    ({"token": "wrong-token-0123456789"}, 401, "wrong review token"),
    ({"token": TOKEN[:-1]}, 401, "wrong review token"),
    ({"csrf": ""}, 403, "X-CSRF-Token"),
    ({"csrf": "0" * 64}, 403, "X-CSRF-Token"),
    ({"Origin": "http://evil.example"}, 403, "cross-origin"),
    ({"Sec_Fetch_Site": "cross-site"}, 403, "cross-site"),
    ({"Content_Type": "text/plain"}, 415, "application/json"),
])
def test_a_judgement_without_the_token_or_from_elsewhere_is_refused(site: Site, change: dict[str, Any],
                                                                     status: int, says: str) -> None:
    got, body = site.judge("alert", 1, "defect", **change)
    assert got == status and says in body["error"]
    assert articles(site.get("/review?state=defect")[2].decode()) == []  # nothing recorded
    assert site.metric_values()['anomon_reviews_total{judgement="defect"}'] == 0


def test_a_judgement_with_the_token_is_recorded_and_counted(site: Site) -> None:
    status, body = site.judge("alert", 1, "false_alarm", Origin=f"http://127.0.0.1:{site.srv.port}")
    assert status == 200 and body["state"] == "false_alarm" and body["before"] == "unreviewed"
    assert body["who"] == "ana" and body["judged_at"].endswith("Z")
    assert site.judge("alert", 1, "defect", who="bo")[1]["before"] == "false_alarm"
    assert site.judge("alert", 3, "false_alarm")[0] == 200
    assert site.judge("alert", 3, None)[1]["state"] == "unreviewed"
    m = site.metric_values()
    assert m['anomon_reviews_total{judgement="false_alarm"}'] == 2
    assert m['anomon_reviews_total{judgement="defect"}'] == 1
    assert m['anomon_reviews_total{judgement="unreviewed"}'] == 1
    assert m['anomon_alert_judgements{judgement="defect",line="l1"}'] == 1
    assert m['anomon_alert_judgements{judgement="unreviewed",line="l1"}'] == 1
    assert m['anomon_alert_judgements{judgement="false_alarm",line="l2"}'] == 0
    assert m['anomon_alert_judgements{judgement="unreviewed",line="l2"}'] == 1
    assert m['anomon_drift_alarm_judgements{judgement="unreviewed",line="l1"}'] == 1


@pytest.mark.parametrize("payload, status", [
    (b"not json", 400), (b"[1]", 400), (b'{"kind": "alert", "id": "1", "judgement": "defect", "who": "a"}', 400),
    (b'{"kind": "alert", "id": true, "judgement": "defect", "who": "a"}', 400),
    (b'{"kind": "alert", "id": 1, "judgement": "defect", "who": 5}', 400),
    (b'{"kind": "alert", "id": 1, "judgement": "great", "who": "a"}', 400),
    (b'{"kind": "alert", "id": 12345, "judgement": "defect", "who": "a"}', 404),
])
def test_a_bad_judgement_body_is_refused(site: Site, payload: bytes, status: int) -> None:
    got, _, body = site.request("POST", "/review/judge", payload, {
        "Authorization": f"Bearer {TOKEN}", "X-CSRF-Token": site.page.csrf, "Content-Type": "application/json"})
    assert got == status and json.loads(body)["error"]


def test_oversized_or_unsized_bodies_and_other_posts_are_refused(site: Site) -> None:
    h = {"Authorization": f"Bearer {TOKEN}", "X-CSRF-Token": site.page.csrf, "Content-Type": "application/json"}
    assert site.request("POST", "/review/judge", b"x" * 5000, h)[0] == 413
    assert site.request("POST", "/metrics", b"{}", h)[0] == 405
    assert site.request("POST", "/review", b"{}", h)[0] == 405
    assert site.request("POST", "/review/other", b"{}", h)[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", site.srv.port, timeout=5)
    try:
        conn.putrequest("POST", "/review/judge")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"0\r\n\r\n")
        assert conn.getresponse().status == 411
    finally:
        conn.close()
    assert site.get("/healthz")[0] == 200


# -- images ---------------------------------------------------------------------------------------------


def test_images_are_served_by_alert_id_from_the_kept_copies_only(site: Site, state: Path) -> None:
    status, headers, body = site.get("/review/image/1")
    (copy,) = (state / ANOMALIES_DIR).glob("*-a.png")
    assert status == 200 and headers["content-type"] == "image/png" and body == copy.read_bytes()
    assert headers["content-security-policy"] == "sandbox" and headers["x-content-type-options"] == "nosniff"
    status, headers, body = site.get("/review/heatmap/1")
    assert status == 200 and body == copy.with_name(copy.stem + ".heatmap.png").read_bytes()
    for path in ("/review/image/99", "/review/image/..%2F..%2Fledger.sqlite3", "/review/image/-1",
                 "/review/image/1/../../etc/passwd", "/review/image/%2Fetc%2Fpasswd", "/review/heatmap/"):
        status, _, body = site.get(path)
        assert status == 404, path
        assert b"root:" not in body


def test_a_ledger_row_naming_a_file_elsewhere_or_a_link_serves_nothing(site: Site, state: Path, tmp_path: Path) -> None:
    import sqlite3

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the page")
    (state / ANOMALIES_DIR / "link.png").symlink_to(secret)
    conn = sqlite3.connect(state / "ledger.sqlite3")
    with conn:  # a ledger tampered with, or written on another host
        conn.execute("UPDATE alerts SET anomaly_image = ?, heatmap = ? WHERE id = 1",
                     (str(secret), str(state / ANOMALIES_DIR / "link.png")))
        conn.execute("UPDATE alerts SET anomaly_image = '..', heatmap = ? WHERE id = 2", (str(state / ANOMALIES_DIR),))
    conn.close()
    for path in ("/review/image/1", "/review/heatmap/1", "/review/image/2", "/review/heatmap/2"):
        status, _, body = site.get(path)
        assert status == 404 and b"not for the page" not in body, path
    html = site.get("/review?state=all")[2].decode()
    assert html.count("image not kept") == 2


def test_a_pruned_copy_shows_as_not_kept(site: Site, state: Path) -> None:
    for p in (state / ANOMALIES_DIR).glob("*-c*"):
        p.unlink()
    html = site.get("/review")[2].decode()
    first = html[html.index('id="alert-3"'):html.index('id="drift-1"')]
    assert "image not kept" in first and "/review/heatmap/3" not in first
    status, _, body = site.get("/review/heatmap/3")
    assert status == 404 and b"not kept" in body


def test_the_index_names_the_page(site: Site) -> None:
    assert "/review" in json.loads(site.get("/")[2])["endpoints"]


# -- configuration --------------------------------------------------------------------------------------


def test_the_token_comes_from_the_config_or_a_file_and_a_bad_one_fails_by_name(tmp_path: Path) -> None:
    base = {"model": "m.anomon", "watch": ["in"]}
    assert load_watch_config(None, base).review_secret() is None
    assert load_watch_config(None, {**base, "review_token": TOKEN}).review_secret() == TOKEN
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    cfg = load_watch_config(None, {**base, "review_token_file": str(f)})
    assert cfg.review_secret() == TOKEN and TOKEN not in repr(load_watch_config(None, {**base, "review_token": TOKEN}))
    bad = [({"review_token": "short"}, "review_token: the token must be at least 16"),
           ({"review_token": "has spaces in it, sixteen+"}, "review_token: the token must be"),
           ({"review_token_file": str(tmp_path / "none")}, "review_token_file: cannot read"),
           ({"review_token": TOKEN, "review_token_file": str(f)}, "review_token_file: give review_token or"),
           ({"review_page": "sometimes"}, "review_page:")]
    for extra, says in bad:
        with pytest.raises(ConfigError) as e:
            load_watch_config(None, {**base, **extra})
        assert says in str(e.value) and TOKEN not in str(e.value), extra
    f.write_text("tiny")
    with pytest.raises(ConfigError, match="review_token_file: the token must be"):
        cfg.review_secret()  # changed since the config was read: checked again at start
