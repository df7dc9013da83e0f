"""The review page in a real browser (Debian's chromium, driven by Selenium through chromium-driver)
against the real `anomon watch` daemon: files dropped into its folder become alerts on the page, a
judgement given with the keyboard survives a restart, a request without the token is refused, and
a file name holding `<script>` is shown as text.

Needs `chromium` and `chromedriver` on PATH (apt-get install chromium chromium-driver) and the
selenium package (test extra): skipped without them, a failure when CI is set (.ci/run installs
them). Set ANOMON_SCREENSHOTS=DIR to keep the screenshots the tests take.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, TinyModel

pytestmark = pytest.mark.e2e

TOKEN = "browser-test-token-0123456789"
EVIL = 'x"<script>alert(1)<\\script>\'.png'  # no "/" in a file name: the tag is made to look closed


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what}; CI must install it (.ci/run)")
    pytest.skip(f"{what}; set CI=1 to fail instead")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        _missing("chromium and chromedriver are not on PATH (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -c constraints.txt -e '.[test]')")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not go looking online
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager would otherwise look for (and download) one.
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def daemon(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("review")
    token = work / "review-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    d = Daemon(work, tiny_model.path, review_token_file=str(token))
    d.start()
    yield d
    assert d.stop() == 0, d.log_tail()


def shoot(drv: Any, path: Path, name: str) -> Path:
    out = path / f"{name}.png"
    drv.save_screenshot(str(out))
    keep = os.environ.get("ANOMON_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(keep) / out.name)
    return out


def drop(d: Daemon, tiny_model: TinyModel, folder: str, names: list[str], normals: int = 0) -> dict[str, int]:
    """Write anomalous images named `names` (and `normals` normal ones) into the watched folder;
    returns {name: alert id}, newest alert first, once the daemon has raised them."""
    sub = d.watch / folder
    for i, name in enumerate(names):
        tiny_model.anomalous_png(sub / name, zlib.crc32(f"{folder}/{i}".encode()) % 1000)
    for i in range(normals):
        tiny_model.normal_png(sub / f"normal_{i}.png", i)
    want = {str((sub / n).resolve()) for n in names}

    def alerts() -> dict[str, int]:
        return {a["path"]: a["id"] for a in d.get("/alerts?since=0").json()["alerts"] if a["path"] in want}

    d.wait_for(lambda: len(alerts()) == len(names), 60, f"{len(names)} alerts under {folder}")
    d.wait_for(lambda: len([r for r in d.table() if r["path"].startswith(str(sub.resolve()))])
               == len(names) + normals, 60, "every verdict")
    return {Path(p).name: i for p, i in sorted(alerts().items(), key=lambda kv: -kv[1])}


def wait(drv: Any, cond: Any, timeout: float = 10.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(cond)


def state_of(drv: Any, alert_id: int) -> str:
    return drv.find_element("id", f"alert-{alert_id}").get_attribute("data-state")


def press(drv: Any, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(drv).send_keys(keys).perform()


def judgements(d: Daemon) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{d.state / 'ledger.sqlite3'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM judgements ORDER BY item_id")]
    except sqlite3.OperationalError:  # no table: nobody has judged yet
        return []
    finally:
        conn.close()


def test_dropped_files_are_listed_newest_first_and_a_script_name_is_text(browser: Any, daemon: Daemon,
                                                                        tiny_model: TinyModel, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    m = daemon.metrics()  # the judgement series exist from the start, at zero
    for state in ("unreviewed", "false_alarm", "defect"):
        assert m[f'anomon_alert_judgements{{judgement="{state}",line="default"}}'] == 0
        assert m[f'anomon_reviews_total{{judgement="{state}"}}'] == 0
    ids = drop(daemon, tiny_model, "listing", ["part_1.png", "part_2.png", EVIL], normals=3)
    browser.get(daemon.url + "/review?kind=alert")
    shown = [e.get_attribute("id") for e in browser.find_elements("css selector", "article.item")]
    assert shown[:3] == [f"alert-{i}" for i in ids.values()]  # newest first; normal images raise nothing
    evil_id = ids[EVIL]
    evil = browser.find_element("id", f"alert-{evil_id}")
    assert evil.find_element("css selector", ".name").text == EVIL
    assert EVIL in evil.find_element("css selector", ".path").text
    assert browser.execute_script("return document.scripts.length") == 1  # the page's own
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 (the property raises when no dialog is open)
    evil.click()  # selects it
    img = evil.find_element("css selector", "img.shot")
    assert img.get_attribute("src").endswith(f"/review/heatmap/{evil_id}")
    wait(browser, lambda drv: drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    press(browser, "h")  # h shows the selected alert's image as it arrived
    assert img.get_attribute("src").endswith(f"/review/image/{evil_id}")
    wait(browser, lambda drv: drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    press(browser, "h")
    assert img.get_attribute("src").endswith(f"/review/heatmap/{evil_id}")
    shoot(browser, tmp_path, "review-listing")


def test_a_judgement_without_the_right_token_is_refused(browser: Any, daemon: Daemon, tiny_model: TinyModel,
                                                        tmp_path: Path) -> None:
    first = max(drop(daemon, tiny_model, "refused", ["r1.png", "r2.png"]).values())
    browser.get(daemon.url + "/review?kind=alert")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.refresh()
    press(browser, "f")  # no name, no token yet
    status = browser.find_element("id", "status")
    wait(browser, lambda drv: "review token first" in status.text)
    browser.find_element("id", "who").send_keys("mallory")
    browser.find_element("id", "token").send_keys("not-the-token-0123456789\n")
    press(browser, "f")
    wait(browser, lambda drv: "wrong review token" in status.text)
    assert state_of(browser, first) == "unreviewed"
    shoot(browser, tmp_path, "review-refused")
    # and without a browser: no token, or the token but no CSRF header
    for headers in ({"Content-Type": "application/json"},
                    {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}):
        req = urllib.request.Request(daemon.url + "/review/judge", method="POST", headers=headers, data=json.dumps(
            {"kind": "alert", "id": first, "judgement": "defect", "who": "curl"}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code in (401, 403)
    assert [j for j in judgements(daemon) if j["item_id"] == first] == []


def test_a_keyboard_judgement_survives_a_daemon_restart(browser: Any, daemon: Daemon, tiny_model: TinyModel,
                                                        tmp_path: Path) -> None:
    newest, middle, oldest = drop(daemon, tiny_model, "judged", ["j1.png", "j2.png", "j3.png"]).values()
    browser.get(daemon.url + "/review?kind=alert")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.refresh()
    who = browser.find_element("id", "who")
    who.send_keys("ana")
    browser.find_element("id", "token").send_keys(TOKEN + "\n")
    wait(browser, lambda drv: drv.find_element("id", "whoami").text == "judging as ana")
    press(browser, "f")  # the newest: a false alarm; the page moves on to the next
    wait(browser, lambda drv: state_of(drv, newest) == "false_alarm")
    selected = browser.find_element("css selector", "article.sel").get_attribute("id")
    assert selected == f"alert-{middle}"
    press(browser, "d")
    wait(browser, lambda drv: state_of(drv, middle) == "defect")
    press(browser, "d")  # the oldest: a defect, then taken back with k (up) and u
    wait(browser, lambda drv: state_of(drv, oldest) == "defect")
    for _ in range(2):  # k: back up to the middle one (past an older alert of another test, if any)
        if browser.find_element("css selector", "article.sel").get_attribute("id") != f"alert-{middle}":
            press(browser, "k")
    assert browser.find_element("css selector", "article.sel").get_attribute("id") == f"alert-{middle}"
    press(browser, "u")  # back to unreviewed
    wait(browser, lambda drv: state_of(drv, middle) == "unreviewed")
    press(browser, "d")  # and judged again: changeable
    wait(browser, lambda drv: state_of(drv, middle) == "defect")
    badge = browser.find_element("id", f"alert-{newest}").find_element("css selector", ".state").text
    assert badge.lower() == "false alarm"
    shoot(browser, tmp_path, "review-judged")

    daemon.stop()
    daemon.start()
    browser.get(daemon.url + "/review?kind=alert&state=all")
    assert [state_of(browser, i) for i in (newest, middle, oldest)] == ["false_alarm", "defect", "defect"]
    assert "by ana" in browser.find_element("id", f"alert-{newest}").text
    browser.get(daemon.url + "/review?kind=alert")  # unreviewed only: they are gone from the queue
    shown = {e.get_attribute("id") for e in browser.find_elements("css selector", "article.item")}
    assert not shown & {f"alert-{i}" for i in (newest, middle, oldest)}
    shoot(browser, tmp_path, "review-after-restart")

    rows = {j["item_id"]: (j["judgement"], j["who"]) for j in judgements(daemon)}
    assert rows[newest] == ("false_alarm", "ana") and rows[middle] == ("defect", "ana")
    m = daemon.metrics()
    assert m['anomon_alert_judgements{judgement="false_alarm",line="default"}'] >= 1
    assert m['anomon_alert_judgements{judgement="defect",line="default"}'] >= 2
