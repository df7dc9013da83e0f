"""The review page (/review): operators look at alerts and drift alarms and judge them.

Plain server-rendered HTML with a little inline JavaScript (keyboard shortcuts, judging without a
reload): no build step and nothing fetched from elsewhere, so it works on a line's host without
internet. anomon.web routes /review* here; this module answers with `Response` objects and never
touches a socket, so it is tested without HTTP too.

Security, because the page shows what the line produces and its answers become training data:
- Read-only unless a review token is configured; judging (POST /review/judge) needs that token as
  `Authorization: Bearer TOKEN`, compared in constant time. The page asks for it once and keeps it
  in the tab's sessionStorage, never in a cookie, so a cross-site request carries no credential.
- CSRF, in depth: the judge request also needs `X-CSRF-Token` (an HMAC of the token, printed in
  the page, which another site cannot read), a JSON body (a plain HTML form cannot send one), and
  an Origin, when the browser sends one, equal to the daemon's own.
- Images are found by alert id in the ledger, and only under STATE/anomalies/: the request names a
  number, never a path; the ledger's file name is reduced to its last component and opened inside
  that folder without following links.
- Every ledger value is HTML-escaped (file names may hold quotes, `<`, newlines and bytes that are
  not UTF-8), and a Content-Security-Policy allows only this page's own script (a per-response
  nonce) and images from the daemon itself.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlencode

from anomon import judgements as J
from anomon.ledger import LedgerError, from_db_path, iso, open_readonly
from anomon.state import ANOMALIES_DIR, ledger_path

if TYPE_CHECKING:
    from anomon.metrics import Metrics

log = logging.getLogger("anomon.review")

PAGE_SIZE = 50
MAX_BODY_BYTES = 4096
_IMAGE_ROUTE = re.compile(r"/review/(image|heatmap)/([0-9]{1,18})")
# What a browser is told each kept file is; anything else is sent as a download.
_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                  ".bmp": "image/bmp", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}
_STATE_NAMES = {"unreviewed": "unreviewed", "false_alarm": "false alarm", "defect": "defect"}
_DRIFT_STATE_NAMES = {**_STATE_NAMES, "defect": "real drift"}


@dataclass
class Response:
    """An answer for anomon.web to send: a body, or an open file of `length` bytes to stream."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    file: IO[bytes] | None = None
    length: int = 0


def _json(status: int, obj: Any) -> Response:
    return Response(status, (json.dumps(obj) + "\n").encode())


def _text(value: Any) -> str:
    """Ledger text as HTML: escaped, quotes included, and bytes that are not UTF-8 as \\udcXX."""
    if value is None:
        return ""
    return html.escape(str(value).encode("utf-8", "backslashreplace").decode("utf-8"), quote=True)


class ReviewPage:
    """The page, its images and its one write (a judgement) for one state folder."""

    def __init__(self, state_dir: Path, *, token: str | None = None, metrics: Metrics | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.ledger_file = ledger_path(state_dir)
        self._token = token.encode() if token else None
        # Stable across restarts (an open page keeps working), unguessable without the token.
        self.csrf = (hmac.new(self._token, b"anomon review csrf", hashlib.sha256).hexdigest()
                     if self._token else "")
        self._metrics = metrics
        self._tally = J.Tally()
        if metrics is not None:
            metrics.count_judgements(self.counts)

    @property
    def judging(self) -> bool:
        return self._token is not None

    def counts(self) -> dict[tuple[str, str, str], int]:
        """{(kind, line, state): n} from the ledger ({} while there is none): read at each scrape."""
        try:
            conn = open_readonly(self.ledger_file)
        except LedgerError:
            return {}
        try:
            return self._tally.counts(conn)
        finally:
            conn.close()

    # -- GET ------------------------------------------------------------------------------------

    def get(self, path: str, query: Mapping[str, list[str]]) -> Response:
        if path in ("/review", "/review/"):
            return self._page(query)
        m = _IMAGE_ROUTE.fullmatch(path)
        if m:
            return self._image(int(m.group(2)), heatmap=m.group(1) == "heatmap")
        return _json(404, {"error": f"no such endpoint: {path}"})

    def _page(self, query: Mapping[str, list[str]]) -> Response:
        try:
            q = _query(query)
        except ValueError as e:
            return _json(400, {"error": str(e)})
        try:
            conn = open_readonly(self.ledger_file)
        except LedgerError as e:
            return _json(503, {"error": str(e)})
        try:
            found = J.items(conn, J.Query(q.line, q.state, q.kind, q.before, PAGE_SIZE + 1))
            counts = self._tally.counts(conn)
        finally:
            conn.close()
        lines = sorted({line for _, line, _ in counts})
        more = len(found) > PAGE_SIZE
        nonce = secrets.token_urlsafe(16)
        body = render_page(found[:PAGE_SIZE], q, lines=lines, counts=counts, more=more,
                           judging=self.judging, csrf=self.csrf, nonce=nonce,
                           kept=self._kept).encode("utf-8")
        return Response(200, body, "text/html; charset=utf-8", {
            "Content-Security-Policy": (
                f"default-src 'none'; img-src 'self'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
                "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
            "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"})

    def _kept(self, stored: str | None) -> bool:
        opened = self._open_kept(stored)
        if opened is None:
            return False
        os.close(opened[0])
        return True

    def _open_kept(self, stored: str | None) -> tuple[int, os.stat_result] | None:
        """An open descriptor on a file under STATE/anomalies/ named like `stored`'s last
        component, or None. No link is followed, in the folder's path or at the file."""
        name = os.path.basename(stored or "")
        if not name or name in (".", ".."):
            return None
        try:
            dirfd = os.open(self.state_dir / ANOMALIES_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
        except OSError:
            return None
        finally:
            os.close(dirfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st

    def _image(self, alert_id: int, *, heatmap: bool) -> Response:
        try:
            conn = open_readonly(self.ledger_file)
        except LedgerError as e:
            return _json(503, {"error": str(e)})
        try:
            row = conn.execute("SELECT anomaly_image, heatmap FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        finally:
            conn.close()
        if row is None:
            return _json(404, {"error": f"no alert with id {alert_id}"})
        stored = from_db_path(row["heatmap" if heatmap else "anomaly_image"])
        opened = self._open_kept(stored)
        if opened is None:
            return _json(404, {"error": f"the {'heat map' if heatmap else 'image'} of alert {alert_id} is "
                                        "not kept (anomalies_dir off, or pruned at anomalies_max_bytes)"})
        fd, st = opened
        suffix = os.path.splitext(os.path.basename(stored or ""))[1].lower()
        ctype = _CONTENT_TYPES.get(suffix, "application/octet-stream")
        headers = {"Cache-Control": "private, max-age=3600", "Content-Security-Policy": "sandbox"}
        if ctype == "application/octet-stream":
            headers["Content-Disposition"] = "attachment"
        return Response(200, content_type=ctype, headers=headers, file=os.fdopen(fd, "rb"), length=st.st_size)

    # -- POST -----------------------------------------------------------------------------------

    def post(self, path: str, headers: Mapping[str, str], body: bytes, *, remote: str | None = None) -> Response:
        """POST /review/judge: {"kind": "alert"|"drift", "id": N, "judgement": "false_alarm"|"defect"|null,
        "who": NAME}, with the token and the CSRF token as headers."""
        if path != "/review/judge":
            return _json(404, {"error": f"no such endpoint: {path}"})
        refused = self._refusal(headers)
        if refused is not None:
            log.warning("review: judgement from %s refused (%s)", remote, refused.body.decode().strip(),
                        extra={"remote": remote})
            return refused
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _json(400, {"error": "the body must be JSON"})
        if not isinstance(req, dict):
            return _json(400, {"error": "the body must be a JSON object"})
        item_id = req.get("id")
        if type(item_id) is not int or not 0 <= item_id < 2**63:
            return _json(400, {"error": "id must be a whole number (an alert or drift alarm id)"})
        try:
            change = J.judge(self.ledger_file, str(req.get("kind")), item_id, req.get("judgement"),
                             req.get("who") if isinstance(req.get("who"), str) else "", remote=remote)
        except J.JudgementError as e:
            return _json(e.status, {"error": str(e)})
        if change.changed:
            log.info("review: %s %d judged %s by %s (was %s)", change.kind, change.item_id, change.after,
                     change.who, change.before, extra={"kind": change.kind, "item_id": change.item_id,
                                                       "judgement": change.after, "who": change.who})
            if self._metrics is not None:
                self._metrics.reviews.labels(judgement=change.after).inc()
        return _json(200, {"kind": change.kind, "id": change.item_id, "state": change.after,
                           "before": change.before, "who": change.who, "judged_at": iso(change.at)})

    def _refusal(self, headers: Mapping[str, str]) -> Response | None:
        if self._token is None:
            return _json(403, {"error": "judging is off: set review_token_file (or review_token) in the "
                                        "daemon's config"})
        auth = headers.get("Authorization") or ""
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return Response(401, b'{"error": "judging needs the review token (Authorization: Bearer TOKEN)"}\n',
                            headers={"WWW-Authenticate": 'Bearer realm="anomon review"'})
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return Response(401, b'{"error": "wrong review token"}\n',
                            headers={"WWW-Authenticate": 'Bearer realm="anomon review", error="invalid_token"'})
        if not hmac.compare_digest((headers.get("X-CSRF-Token") or "").encode(), self.csrf.encode()):
            return _json(403, {"error": "missing or wrong X-CSRF-Token: reload the review page"})
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _json(415, {"error": "the body must be sent as application/json"})
        origin, host = headers.get("Origin"), headers.get("Host")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            return _json(403, {"error": f"cross-origin request refused (Origin {origin})"})
        if headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return _json(403, {"error": "cross-site request refused"})
        return None


# -- the query string -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageQuery:
    line: str | None = None
    state: str | None = "unreviewed"
    kind: str | None = None
    before: str | None = None

    def url(self, **change: str | None) -> str:
        """/review with this query, `change` applied; empty values are left out."""
        values = {"line": self.line, "state": self.state or "all", "kind": self.kind, "before": self.before}
        values.update(change)
        return "/review?" + urlencode({k: v for k, v in values.items() if v})


def _query(query: Mapping[str, list[str]]) -> PageQuery:
    """The page's filters; ValueError names a bad one. Unknown parameters are ignored."""
    def one(name: str) -> str | None:
        values = query.get(name)
        if not values or values == [""]:
            return None
        if len(values) > 1:
            raise ValueError(f"{name} must be given once")
        return values[0]

    state = one("state") or "unreviewed"
    if state not in J.STATES + ("all",):
        raise ValueError(f"state must be one of {', '.join(J.STATES + ('all',))}")
    kind = one("kind")
    if kind is not None and kind not in J.KINDS:
        raise ValueError(f"kind must be one of {', '.join(J.KINDS)}")
    before = one("before")
    if before is not None and J.parse_key(before) is None:
        raise ValueError("before must be an item key such as alert-12 or drift-3")
    line = one("line")
    if line is not None and len(line) > 200:
        raise ValueError("line is too long")
    return PageQuery(line, None if state == "all" else state, kind, before)


# -- HTML ---------------------------------------------------------------------------------------------


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "–" if x is None else format(x, fmt)


def _times(ratio: float) -> str:
    """3.2×, 47×, 4,740×: how far past the threshold, readable at a glance."""
    return f"{ratio:.2g}×" if abs(ratio) < 10 else f"{ratio:,.0f}×"


def _when(ts: float | None) -> str:
    text = iso(ts)
    return text.replace("T", " ").replace(".000Z", "Z") if text else ""


def _select(name: str, label: str, options: list[tuple[str, str]], chosen: str) -> str:
    opts = "".join(f'<option value="{_text(v)}"{" selected" if v == chosen else ""}>{_text(t)}</option>'
                   for v, t in options)
    return f'<label>{label} <select name="{name}">{opts}</select></label>'


def _item_html(it: J.Item, *, judging: bool, kept: Any) -> str:
    names = _DRIFT_STATE_NAMES if it.kind == "drift" else _STATE_NAMES
    who = (f' <span class="who">by {_text(it.who)}, {_text(_when(it.judged_at))}</span>'
           if it.state != "unreviewed" else ' <span class="who"></span>')
    off = "" if judging else " disabled"
    buttons = (f'<button type="button" data-j="false_alarm"{off}>False alarm <kbd>f</kbd></button>'
               f'<button type="button" data-j="defect"{off}>{"Real drift" if it.kind == "drift" else "Defect"} '
               f'<kbd>d</kbd></button><button type="button" data-j=""{off}>Unreviewed <kbd>u</kbd></button>')
    if it.kind == "alert":
        name = os.path.basename(it.path or "")
        # Browsers show no TIFF: such an image is only opened (downloaded) with `o`.
        shown = os.path.splitext(it.anomaly_image or "")[1].lower() not in (".tif", ".tiff")
        has_heat, has_image = kept(it.heatmap), shown and kept(it.anomaly_image)
        if has_heat or has_image:
            first = "heatmap" if has_heat else "image"
            pic = (f'<img class="shot" src="/review/{first}/{it.id}" loading="lazy" alt="{_text(first)} of '
                   f'alert {it.id}" data-heat="{int(has_heat)}" data-image="{int(has_image)}">'
                   f'<figcaption><span class="what">{"heat map" if has_heat else "image"}</span>'
                   f'{" · <kbd>h</kbd> toggles" if has_heat and has_image else ""}</figcaption>')
        else:
            pic = '<div class="noimg">image not kept</div>'
        ratio = (f' <span class="dim">({_times(it.score / it.threshold)} threshold)</span>'
                 if it.score is not None and it.threshold else "")
        facts = (f"<dt>score</dt><dd>{_num(it.score)}{ratio}</dd><dt>threshold</dt><dd>{_num(it.threshold)}</dd>"
                 f"<dt>p-value</dt><dd>{_num(it.p_value, '.3g')}</dd>")
        wide = f'<dt>path</dt><dd class="path wide">{_text(it.path)}</dd>'
        title = f'<span class="kind">anomaly</span> <span class="name">{_text(name)}</span>'
    else:
        pic = '<div class="noimg drift">drift<br><small>many images, none alone</small></div>'
        level = _num(-math.log10(it.alpha), ".3g") if it.alpha else "–"
        facts = (f"<dt>evidence</dt><dd>10<sup>{_num(it.log10_martingale, '.3g')}</sup> "
                 f'<span class="dim">(alarm at 10<sup>{level}</sup>)</span></dd>'
                 f"<dt>direction</dt><dd>scores {_text(it.direction or '?')}</dd>"
                 f"<dt>images</dt><dd>{_text(it.images)} since the last reset</dd>")
        wide = ""
        title = '<span class="kind drift">drift alarm</span>'
    return (
        f'<article class="item st-{it.state}" id="{it.kind}-{it.id}" data-kind="{it.kind}" data-id="{it.id}" '
        f'data-state="{it.state}" tabindex="-1"><figure>{pic}</figure><div class="info">'
        f'<h2>{title}</h2><dl><dt>time</dt><dd>{_text(_when(it.time))}</dd>'
        f'<dt>line</dt><dd>{_text(it.line)}</dd>{facts}<dt>model</dt><dd class="mono">{_text(it.model_id)}</dd>'
        f'{wide}</dl>'
        f'<div class="judge"><span class="state">{_text(names[it.state])}</span>{who}'
        f'<span class="buttons">{buttons}</span></div></div></article>')


def render_page(found: list[J.Item], q: PageQuery, *, lines: list[str],
                counts: Mapping[tuple[str, str, str], int], more: bool, judging: bool, csrf: str,
                nonce: str, kept: Any) -> str:
    """The whole page. Every value from the ledger goes through _text."""
    line_opts = [("", "all lines")] + [(ln, ln) for ln in lines]
    state_opts = [("unreviewed", "unreviewed"), ("false_alarm", "false alarm"), ("defect", "defect"),
                  ("all", "all")]
    kind_opts = [("", "alerts and drift"), ("alert", "alerts"), ("drift", "drift alarms")]
    tally = {s: sum(n for (k, ln, st), n in counts.items()
                    if st == s and q.line in (None, ln) and q.kind in (None, k)) for s in J.STATES}
    reviewed = tally["false_alarm"] + tally["defect"]
    share = f" · {tally['false_alarm'] / reviewed:.0%} of reviewed were false" if reviewed else ""
    summary = (f'<span id="n-unreviewed">{tally["unreviewed"]}</span> unreviewed · <span id="n-false_alarm">'
               f'{tally["false_alarm"]}</span> false alarm · <span id="n-defect">{tally["defect"]}</span> defect'
               f'<span id="share">{share}</span>')
    if judging:
        auth = ('<form id="auth" autocomplete="off"><label>name <input id="who" maxlength="64" '
                'placeholder="your name"></label> <label>review token <input id="token" type="password" '
                'placeholder="from review_token_file"></label> <button type="submit">Use</button> '
                '<span id="whoami"></span></form>')
    else:
        auth = '<p class="ro">Read-only: judging is off (set <code>review_token_file</code> in the config).</p>'
    body = "".join(_item_html(it, judging=judging, kept=kept) for it in found)
    if not found:
        body = '<p class="empty">Nothing here.</p>'
    nav = []
    if q.before:
        nav.append(f'<a href="{_text(q.url(before=None))}">newest</a>')
    if more and found:
        nav.append(f'<a id="older" href="{_text(q.url(before=found[-1].key))}">older →</a>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{_text(csrf)}"><title>anomon review</title><link rel="icon" href="data:,">
<style nonce="{nonce}">{_CSS}</style></head>
<body><header><div class="row"><h1>anomon review</h1><span class="summary">{summary}</span></div>
<div class="row"><form id="filters" method="get" action="/review">{_select("line", "line", line_opts, q.line or "")}
{_select("state", "state", state_opts, q.state or "all")}{_select("kind", "show", kind_opts, q.kind or "")}
<noscript><button type="submit">Show</button></noscript></form>{auth}</div>
<p class="keys"><kbd>j</kbd>/<kbd>k</kbd> next/previous · <kbd>f</kbd> false alarm · <kbd>d</kbd> defect ·
<kbd>u</kbd> unreviewed · <kbd>h</kbd> heat map/image · <kbd>o</kbd> open image · <kbd>r</kbd> reload
<span id="status" role="status"></span></p></header>
<main id="items">{body}</main><nav>{" ".join(nav)}</nav>
<script nonce="{nonce}">{_JS}</script></body></html>
"""


_CSS = """
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,sans-serif;background:#f4f5f7;color:#1d2330}
header{position:sticky;top:0;z-index:1;background:#1d2330;color:#eef;padding:6px 16px}
header .row{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 24px;margin-bottom:4px}
header h1{font-size:18px;margin:0}.summary{color:#bcc}
header form{display:inline-block}header label{margin-right:8px}
header input{width:10em}.keys{margin:6px 0 0;color:#aab;font-size:12px}.ro{display:inline;color:#fc8}
kbd{font:11px monospace;border:1px solid #889;border-radius:3px;padding:0 3px;background:#fff;color:#223}
#status{margin-left:12px;color:#fd6;font-weight:600}#whoami{color:#9d9}
main{padding:12px 16px;display:flex;flex-direction:column;gap:10px}
.item{display:flex;gap:16px;background:#fff;border:2px solid #dde;border-left:8px solid #d93;
border-radius:6px;padding:10px;outline:none}
.item.sel{border-color:#36c;box-shadow:0 0 0 3px #9bd}.item.st-false_alarm{border-left-color:#6a6}
.item.st-defect{border-left-color:#c33}figure{margin:0;flex:0 0 auto;width:220px;text-align:center}
.shot{max-width:220px;max-height:220px;image-rendering:pixelated;background:#222;min-width:128px}
figcaption{font-size:12px;color:#667}.noimg{width:220px;height:128px;display:flex;align-items:center;
justify-content:center;flex-direction:column;background:#eee;color:#889}
.info{flex:1;min-width:0}h2{font-size:15px;margin:0 0 6px}.kind{font-size:11px;text-transform:uppercase;
background:#d93;color:#fff;border-radius:3px;padding:1px 5px;margin-right:6px}.kind.drift{background:#76c}
.name{white-space:pre-wrap;word-break:break-all}dl{display:grid;grid-template-columns:5.5em minmax(10em,1fr) 5.5em minmax(10em,2fr);margin:0;gap:2px 8px}
.wide{grid-column:2/-1}
dt{color:#778}dd{margin:0}.path,.mono{font-family:monospace;white-space:pre-wrap;word-break:break-all}
.dim{color:#889}.judge{margin-top:8px;display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.state{font-weight:700;text-transform:uppercase;font-size:12px;padding:2px 8px;border-radius:3px;
background:#fde9c8;color:#844}.st-false_alarm .state{background:#d7f0d7;color:#262}
.st-defect .state{background:#f6d0d0;color:#822}.who{color:#778;font-size:12px}
.buttons{margin-left:auto}button{font:inherit;margin-left:4px;padding:3px 10px;cursor:pointer}
nav{padding:0 16px 24px}.empty{color:#778}
"""

_JS = r"""
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const items = Array.from(document.querySelectorAll('.item'));
  const status = document.getElementById('status');
  const whoEl = document.getElementById('who'), tokenEl = document.getElementById('token');
  let sel = -1;
  const say = (text) => { status.textContent = text; };
  function showWho() {
    const w = document.getElementById('whoami');
    if (!w) return;
    const who = localStorage.getItem('anomon-review-who'), has = sessionStorage.getItem('anomon-review-token');
    w.textContent = who && has ? 'judging as ' + who : '';
    if (whoEl && who) whoEl.value = who;
  }
  const auth = document.getElementById('auth');
  if (auth) auth.addEventListener('submit', (e) => {
    e.preventDefault();
    if (whoEl.value.trim()) localStorage.setItem('anomon-review-who', whoEl.value.trim());
    if (tokenEl.value) sessionStorage.setItem('anomon-review-token', tokenEl.value);
    tokenEl.value = ''; showWho(); say(''); tokenEl.blur(); whoEl.blur();
  });
  showWho();
  function select(i) {
    if (!items.length) return;
    // scrollIntoView must not leave the item under the sticky header, however tall it wraps
    document.documentElement.style.scrollPaddingTop = (document.querySelector('header').offsetHeight + 8) + 'px';
    sel = Math.max(0, Math.min(items.length - 1, i));
    items.forEach((el, k) => el.classList.toggle('sel', k === sel));
    items[sel].scrollIntoView({block: 'nearest'});
  }
  const names = {unreviewed: 'unreviewed', false_alarm: 'false alarm', defect: 'defect'};
  async function judge(el, j) {
    const token = sessionStorage.getItem('anomon-review-token'), who = localStorage.getItem('anomon-review-who');
    if (!auth) { say('Read-only: judging is off on this daemon.'); return; }
    if (!token || !who) { say('Enter your name and the review token first.'); whoEl.focus(); return; }
    let r, body;
    try {
      r = await fetch('/review/judge', {method: 'POST', headers: {'Content-Type': 'application/json',
        'Authorization': 'Bearer ' + token, 'X-CSRF-Token': csrf},
        body: JSON.stringify({kind: el.dataset.kind, id: Number(el.dataset.id), judgement: j || null, who: who})});
      body = await r.json();
    } catch (e) { say('Not recorded: ' + e); return; }
    if (r.status === 401) sessionStorage.removeItem('anomon-review-token');  // ask for it again
    if (!r.ok) { say('Not recorded: ' + (body.error || r.status)); showWho(); return; }
    count(body.before, -1); count(body.state, +1);
    el.classList.remove('st-' + el.dataset.state);
    el.dataset.state = body.state;
    el.classList.add('st-' + body.state);
    const drift = el.dataset.kind === 'drift';
    el.querySelector('.state').textContent = drift && body.state === 'defect' ? 'real drift' : names[body.state];
    el.querySelector('.who').textContent = body.state === 'unreviewed' ? '' :
      'by ' + body.who + ', ' + body.judged_at.replace('T', ' ').replace('.000Z', 'Z');
    say('');
    if (items.indexOf(el) === sel && j) select(sel + 1);
  }
  function count(state, by) {  // the header's tally, kept in step without a reload
    const n = document.getElementById('n-' + state);
    if (n) n.textContent = String(Number(n.textContent) + by);
    const fa = Number(document.getElementById('n-false_alarm').textContent);
    const judged = fa + Number(document.getElementById('n-defect').textContent);
    document.getElementById('share').textContent =
      judged ? ' · ' + Math.round(100 * fa / judged) + '% of reviewed were false' : '';
  }
  function toggle(el) {
    const img = el.querySelector('.shot');
    if (!img || img.dataset.heat !== '1' || img.dataset.image !== '1') return;
    const heat = img.src.indexOf('/heatmap/') >= 0;
    img.src = '/review/' + (heat ? 'image' : 'heatmap') + '/' + el.dataset.id;
    el.querySelector('figcaption .what').textContent = heat ? 'image' : 'heat map';
  }
  items.forEach((el, k) => {
    el.addEventListener('click', () => select(k));
    el.querySelectorAll('button[data-j]').forEach((b) => b.addEventListener('click', (e) => {
      e.stopPropagation(); select(k); judge(el, b.dataset.j);
    }));
    const img = el.querySelector('.shot');
    if (img) img.addEventListener('click', () => toggle(el));
  });
  document.querySelectorAll('#filters select').forEach((s) => s.addEventListener('change', () => s.form.submit()));
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || /^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName)) return;
    const el = items[sel];
    switch (e.key) {
      case 'j': case 'ArrowDown': select(sel + 1); break;
      case 'k': case 'ArrowUp': select(sel - 1); break;
      case 'f': if (el) judge(el, 'false_alarm'); break;
      case 'd': if (el) judge(el, 'defect'); break;
      case 'u': if (el) judge(el, ''); break;
      case 'h': if (el) toggle(el); break;
      case 'o': if (el && el.dataset.kind === 'alert') window.open('/review/image/' + el.dataset.id); break;
      case 'r': location.reload(); break;
      default: return;
    }
    e.preventDefault();
  });
  select(0);
})();
"""
