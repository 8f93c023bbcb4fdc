"""Look at a flow run the way a user does: the Prefect UI in headless Chromium.

Chromium is Debian's (`make browser` installs it); Playwright only drives it, so no
browser is downloaded. Screenshots go under test-output/ (git-ignored) for a person to open.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

OUTPUT = Path(__file__).resolve().parents[1] / "test-output"
CHROMIUM = os.environ.get("ALIGNDIFF_CHROMIUM", "/usr/bin/chromium")


def chromium() -> str:
    assert Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM}: run `make browser` (or set ALIGNDIFF_CHROMIUM)"
    return CHROMIUM


def _basic(auth: str) -> tuple[str, str]:
    user, _, password = auth.partition(":")
    return user, password


def latest_completed_run(api_url: str, auth: str, flow_name: str) -> dict:
    runs = httpx.post(f"{api_url}/flow_runs/filter", auth=_basic(auth), json={
        "flows": {"name": {"any_": [flow_name]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "sort": "START_TIME_DESC", "limit": 1}).raise_for_status().json()
    assert runs, f"no completed {flow_name} flow run on {api_url}"
    return runs[0]


def capture_flow_run_report(api_url: str, auth: str, flow_name: str, artifact_key: str, expect_text: str,
                            out_dir: Path = OUTPUT) -> dict:
    """Log in to the UI with the server's auth string (as a user pastes it from .env),
    open the latest completed run of ``flow_name``, find its ``artifact_key``
    artifact in the run's Artifacts tab, open it and wait for ``expect_text`` in the
    rendered report; screenshot both pages. Returns what was seen and where it was saved."""
    from playwright.sync_api import sync_playwright

    ui_url = api_url.removesuffix("/api")
    run = latest_completed_run(api_url, auth, flow_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = {"run": out_dir / f"{flow_name}-run.png", "report": out_dir / f"{flow_name}-report.png"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui_url}/")  # the home page sends a new visitor to the login form
            login = page.get_by_placeholder("admin:pass")
            login.wait_for(timeout=60_000)
            login.fill(auth)
            login.press("Enter")
            login.wait_for(state="detached", timeout=30_000)
            page.goto(f"{ui_url}/runs/flow-run/{run['id']}")
            page.get_by_text(run["name"]).first.wait_for(timeout=60_000)
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
            page.get_by_text("Artifacts", exact=True).click()
            page.get_by_text(artifact_key, exact=True).last.wait_for(timeout=30_000)
            page.screenshot(path=str(shots["run"]), full_page=True)
            page.get_by_text(artifact_key, exact=True).last.click()
            page.get_by_text(expect_text).first.wait_for(timeout=30_000)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(shots["report"]), full_page=True)
            report_url = page.url
            # (alt text, rendered width): 0 is an image the browser could not load
            images = page.evaluate("[...document.querySelectorAll('img[alt]')]"
                                   ".filter(i => i.alt).map(i => [i.alt, i.naturalWidth])")
        finally:
            browser.close()
    return {"run": run, "report_url": report_url, "images": images, "screenshots": shots}
