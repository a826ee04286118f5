"""Console page loads at catalog scale: the policy list at /ui with 10^5 policies (10^6
revisions), timed in headless Chromium from navigation to the rendered table. Prints ONE JSON line.

    python bench/console_load.py            # 10^5 policies, 10^6 revisions (SQLite)
    python bench/console_load.py --quick    # 10^3 policies, 10^4 revisions

The catalog is bulk-registered as in bench/catalog_scale.py (10 revisions per policy, a
`prod` alias each), then served by a real `lorafleet serve` app (no base model, `--auth none`)
on loopback. Each load opens a fresh browser context (no HTTP cache), so it pays for the HTML,
JS and CSS and the first page of 50 policies. Keys: policies, revisions, load_ms_median and
load_ms_max over the loads (target: under 1000 ms at 10^5), search_ms_median (typing a name
fragment: server-side search, re-rendered), next_page_ms_median (the cursor's next page),
api_ms_median (the JSON call alone, from httpx), populate_s, load_avg_1m.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from catalog_scale import populate  # noqa: E402

from lorafleet.catalog import Catalog  # noqa: E402


def serve(workdir: Path, url: str):  # type: ignore[no-untyped-def]
    import socket

    import uvicorn

    from lorafleet.api.app import ServeConfig, create_app
    from lorafleet.config import Paths

    app = create_app(ServeConfig(bases=[], paths=Paths(home=workdir, database_url=url,
                                                       store_url=str(workdir / "store")),
                                 state_dir=workdir / "tinker"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10^3 policies instead of 10^5")
    ap.add_argument("--loads", type=int, default=7, help="timed page loads (default 7)")
    args = ap.parse_args()
    n = 10_000 if args.quick else 1_000_000  # revisions; policies = n / 10
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    import httpx
    from playwright.sync_api import sync_playwright

    workdir = Path(tempfile.mkdtemp(prefix="console-bench-"))
    url = f"sqlite:///{workdir / 'catalog.db'}"
    cat = Catalog.open(url, str(workdir / "store"))
    populate_s, _ = populate(cat, n, random.Random(1))
    cat.close()
    server, base = serve(workdir, url)
    ready = "p => (document.body.dataset.ready || '') === p"
    loads, searches, nexts, apis = [], [], [], []
    try:
        with httpx.Client(base_url=base) as c:
            for _ in range(args.loads):
                t0 = time.perf_counter()
                c.get("/catalog/v1/policies", params={"limit": 50}).raise_for_status()
                apis.append((time.perf_counter() - t0) * 1000)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            for i in range(args.loads + 1):  # the first load warms the server, not timed
                ctx = browser.new_context()
                ctx.add_init_script("sessionStorage.setItem('lorafleet.key', '');"
                                    "sessionStorage.setItem('lorafleet.key.ok', '1');")  # --auth none
                page = ctx.new_page()
                t0 = time.perf_counter()
                page.goto(f"{base}/ui/#/policies")
                page.wait_for_function(ready, arg="#/policies")
                dt = (time.perf_counter() - t0) * 1000
                assert page.locator("#policies tbody tr").count() == 50
                if i:
                    loads.append(dt)
                    frag = f"p{random.Random(i).randrange(n // 10):07d}"[:6]
                    t0 = time.perf_counter()
                    page.fill("#q", frag)  # the page searches 250 ms after the last keystroke
                    page.wait_for_function(ready, arg=f"#/policies?q={frag}")
                    searches.append((time.perf_counter() - t0) * 1000 - 250)
                    page.fill("#q", "")
                    page.wait_for_function(ready, arg="#/policies?q=")
                    t0 = time.perf_counter()
                    page.evaluate("() => { document.body.dataset.ready = ''; }")
                    page.click("#next")
                    page.wait_for_function("() => (document.body.dataset.ready || '').includes('cursor=')")
                    nexts.append((time.perf_counter() - t0) * 1000)
                ctx.close()
            browser.close()
    finally:
        server.should_exit = True
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({
        "bench": "console_load", "policies": n // 10, "revisions": n,
        "load_ms_median": round(statistics.median(loads), 1), "load_ms_max": round(max(loads), 1),
        "search_ms_median": round(statistics.median(searches), 1),
        "next_page_ms_median": round(statistics.median(nexts), 1),
        "api_ms_median": round(statistics.median(apis), 2), "loads": len(loads),
        "populate_s": round(populate_s, 1), "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
