"""The web console at /ui, driven by headless Chromium (Debian's `chromium`) through Playwright
against a real server on loopback with `--auth keys`: log in, open a policy, read its
provenance, lineage and evaluations, move an alias and roll it back through the UI and see the
catalog change; another tenant's key sees none of it; the training page draws a Tinker run's
loss curve and links its checkpoints to catalog revisions; the serving page updates while
requests run. Every page is screenshotted into $LORAFLEET_SCREENSHOTS (default build/ui-shots).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from lorafleet.catalog.records import ADMIN, Provenance
from tests.e2e.conftest import TINY, start_server
from tests.e2e.test_openai_serving import SPEC, adapter_weights

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test does)")

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("LORAFLEET_SCREENSHOTS", REPO / "build" / "ui-shots"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def console(paths, tiny_pair, tmp_path_factory):
    """alice owns alice/chat (3 revisions, prod -> #1, evaluations) and a branch of it."""
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("console"), engines={TINY: tiny_pair},
                        auth="keys", hold_s=5.0, max_slots=4, max_host_adapters=8)
    cat = live.app.state.catalog
    live.keys = {"alice": cat.create_key("alice"), "bob": cat.create_key("bob")}
    info = tiny_pair[0].info
    cat.create_policy(ADMIN, "alice/chat", TINY, SPEC, metadata={"team": "support"})
    revs, parent = [], None
    for i in range(3):
        pv = Provenance(parent, "cross_entropy", {}, {"learning_rate": 1e-4 * (i + 1), "beta1": 0.9},
                        f"{i:064x}", "git:abc123")
        rev = cat.publish_weights(ADMIN, "alice/chat", adapter_weights(info, 300 + i), step=10 * (i + 1),
                                  provenance=pv, aliases=["prod"] if i == 0 else [])
        revs.append(rev)
        parent = rev.id
    cat.record_evaluation(ADMIN, revs[1].id, "mmlu", {"accuracy": 0.91})
    cat.record_evaluation(ADMIN, revs[2].id, "mmlu", {"accuracy": 0.42})
    cat.create_policy(ADMIN, "alice/chat-dpo", TINY, SPEC, parent=revs[1].id)
    cat.publish_weights(ADMIN, "alice/chat-dpo", adapter_weights(info, 400),
                        provenance=Provenance(revs[1].id, "dpo"))
    live.revs = revs
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: apt-get install chromium (make test installs it)")
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    p = ctx.new_page()
    p.set_default_timeout(20_000)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def login(page, console, who: str) -> None:
    page.goto(f"{console.url}/ui/")
    page.fill("#key", console.keys[who])
    page.click("#login")
    wait_ready(page, "#/policies")


def wait_ready(page, hash_prefix: str) -> None:
    page.wait_for_function("p => (document.body.dataset.ready || '').startsWith(p)", arg=hash_prefix)


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def click(page, selector: str, hash_prefix: str) -> None:
    """Click a link or row and wait until the page it opens has rendered."""
    page.evaluate("() => { document.body.dataset.ready = ''; }")
    page.click(selector)
    wait_ready(page, hash_prefix)


def go(page, hash_: str) -> None:
    page.evaluate("h => { document.body.dataset.ready = ''; location.hash = h; }", hash_)
    wait_ready(page, hash_.split("?")[0])


def test_assets_are_public_and_data_needs_a_key(console):
    r = httpx.get(f"{console.url}/ui", follow_redirects=True)  # what a user types
    assert r.status_code == 200 and "app.js" in r.text and str(r.url).endswith("/ui/")
    assert httpx.get(f"{console.url}/ui/app.js").status_code == 200
    assert httpx.get(f"{console.url}/admin/v1/serving").status_code == 401
    assert httpx.get(f"{console.url}/catalog/v1/policies").status_code == 401


def test_wrong_key_is_refused_at_login(page, console):
    page.goto(f"{console.url}/ui/")
    page.fill("#key", "not-a-key")
    page.click("#login")
    page.wait_for_selector("#login-error:has-text('401')")
    assert page.locator("#nav").is_hidden()
    shot(page, "login")


def test_policy_provenance_lineage_evaluations_alias_move_and_rollback(page, console):
    cat, revs = console.app.state.catalog, console.revs
    login(page, console, "alice")
    assert page.locator("#policies tbody tr").count() == 2
    page.fill("#q", "dpo")
    page.wait_for_function("() => document.querySelectorAll('#policies tbody tr').length === 1")
    wait_ready(page, "#/policies?q=dpo")
    page.fill("#q", "")
    page.wait_for_function("() => document.body.dataset.ready === '#/policies?q='")
    shot(page, "policies")
    click(page, "#policies a[href='#/policy/alice/chat']", "#/policy/alice/chat")
    # prod's revision is selected by default: provenance, evaluations, lineage
    assert page.locator("#revisions tbody tr").count() == 3
    prov = page.locator("#provenance").inner_text()
    assert revs[0].sha256 in prov and "cross_entropy" in prov and "git:abc123" in prov
    click(page, f"#revisions tr[data-rev='{revs[1].id}']", f"#/policy/alice/chat?rev={revs[1].id}")
    prov = page.locator("#provenance").inner_text()
    assert revs[0].id in prov and "0.0002" in prov and f"{1:064x}" in prov  # parent, optimizer, data
    assert "accuracy = 0.91" in page.locator("#evaluations").inner_text()
    nodes = page.locator("#lineage .lineage-node")
    assert nodes.count() == 4  # #1 -> #2 -> (#3, alice/chat-dpo #1)
    assert "alice/chat-dpo #1" in page.locator("#lineage").inner_text()
    # move prod to #2 behind its gate, through the confirmation
    page.fill("#alias-name", "prod")
    page.fill("#alias-gate", "accuracy>=0.9")
    page.click("#move")
    page.click("#confirm-ok")
    page.wait_for_selector("#flash.ok")
    wait_ready(page, "#/policy/alice/chat")
    assert cat.resolve("alice/chat:prod", ADMIN).id == revs[1].id
    assert "passed" in page.locator("#gates").inner_text()
    assert "gate accuracy>=0.9" in page.locator("#alias-history").inner_text()
    shot(page, "policy")
    # the same gate refuses #3, with the API's error, and nothing moves
    click(page, f"#revisions tr[data-rev='{revs[2].id}']", f"#/policy/alice/chat?rev={revs[2].id}")
    page.fill("#alias-gate", "accuracy>=0.9")
    page.click("#move")
    page.click("#confirm-ok")
    page.wait_for_selector("#flash.error")
    api = httpx.put(f"{console.url}/catalog/v1/policies/alice/chat/aliases/prod",
                    headers={"X-API-Key": console.keys["alice"]},
                    json={"ref": revs[2].id, "require": "accuracy>=0.9"})
    assert api.status_code >= 400 and api.json()["detail"] in page.locator("#flash").inner_text()
    assert cat.resolve("alice/chat:prod", ADMIN).id == revs[1].id
    # a cancelled confirmation does nothing; a confirmed rollback moves prod back to #1
    page.click("#aliases tr[data-alias='prod'] .rollback")
    page.click("#confirm-cancel")
    assert cat.resolve("alice/chat:prod", ADMIN).id == revs[1].id
    page.click("#aliases tr[data-alias='prod'] .rollback")
    page.click("#confirm-ok")
    page.wait_for_selector("#flash.ok")
    wait_ready(page, "#/policy/alice/chat")
    assert cat.resolve("alice/chat:prod", ADMIN).id == revs[0].id
    assert "rollback" in page.locator("#alias-history").inner_text()
    # pin and unpin the selected revision (#3) through the UI reach the engine's residency
    page.click("#pin")
    page.click("#confirm-ok")
    page.wait_for_selector("#flash.ok:has-text(' pinned (')")  # not the rollback's flash
    residency = console.app.state.openai.runners[TINY].residency
    pinned = revs[2].id
    assert residency.is_pinned(pinned)
    page.click("#unpin")
    page.click("#confirm-ok")
    page.wait_for_selector("#flash.ok:has-text('unpinned')")
    assert not residency.is_pinned(pinned)


def test_another_tenant_sees_none_of_it(page, console):
    login(page, console, "bob")
    assert "No policies" in page.locator("#policies").inner_text()
    go(page, "#/policy/alice/chat")
    assert "404" in page.locator("#page-error").inner_text()
    go(page, f"#/rev/{console.revs[0].id}")
    assert "404" in page.locator("#page-error").inner_text()
    go(page, "#/runs")
    assert "0 run(s)" in page.locator("main").inner_text()


def test_training_run_curve_and_checkpoints_link_to_revisions(page, console):
    import tinker
    from tinker import types

    from tests.e2e.test_tinker_sdk_basic import BATCH

    def train() -> None:  # off this thread: Playwright's event loop runs on it
        tc = tinker.ServiceClient(base_url=console.url, api_key=console.keys["alice"]) \
            .create_lora_training_client(base_model=TINY, rank=4).result()
        for _ in range(4):
            tc.forward_backward(BATCH, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        tc.save_weights_for_sampler("w4").result()
        runs.append(tc.model_id)

    runs: list[str] = []
    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
    (run_id,) = runs
    bob = httpx.get(f"{console.url}/admin/v1/runs/{run_id}", headers={"X-API-Key": console.keys["bob"]})
    assert bob.status_code == 404  # another tenant's run: not even its metrics
    login(page, console, "alice")
    go(page, "#/runs")
    shot(page, "runs")
    click(page, f"#runs a:has-text('{run_id}')", "#/run/")
    page.wait_for_selector("#chart polyline")
    points = page.locator("#chart polyline").first.get_attribute("points").split()
    assert len(points) == 4  # one per step
    assert "train/loss:sum" in page.locator("#chart").inner_text()
    link = page.locator("#checkpoints .run-revision")
    assert link.count() == 1
    shot(page, "training")
    click(page, "#checkpoints .run-revision", "#/policy/")
    assert run_id in page.locator("#provenance").inner_text()


def test_serving_page_updates_while_requests_run(page, console):
    login(page, console, "alice")
    go(page, "#/serving")
    page.wait_for_selector(f"#engines tr[data-base='{TINY}']")
    before = int(page.locator("#total-requests").inner_text())
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=console.url, headers={"X-API-Key": console.keys["alice"]},
                          timeout=60) as c:
            while not stop.is_set():
                c.post("/v1/completions", json={"model": "alice/chat:prod", "prompt": "Hello",
                                                "max_tokens": 4}).raise_for_status()

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        # the page polls on its own: the counter and the rate change without a reload
        page.wait_for_function(f"() => Number(document.querySelector('#total-requests').textContent) >= {before + 3}")
        page.wait_for_function("() => Number(document.querySelector('#rate-requests').textContent) > 0")
        page.wait_for_function("() => document.querySelector('#rate-ttft').textContent.endsWith('ms')")
        assert int(page.locator("#cold-loads").inner_text()) >= 1  # prod came from the store once
        used, _, most = page.locator(f"#engines tr[data-base='{TINY}'] .slots").inner_text().partition(" / ")
        assert 1 <= int(used) <= int(most) == 4  # prod is resident in one of the 4 slots
        page.wait_for_function(  # a few seconds of the rate chart
            "() => (document.querySelector('#rate-chart polyline')?.getAttribute('points') || '').split(' ').length >= 4")
        shot(page, "serving")
    finally:
        stop.set()
        worker.join()


def test_auth_none_logs_in_without_a_key(page, paths, tiny_pair, tmp_path):
    live = start_server(paths, [TINY], tmp_path, engines={TINY: tiny_pair}, hold_s=5.0)
    try:
        live.app.state.catalog.create_policy(ADMIN, "local/solo", TINY, SPEC)
        page.goto(f"{live.url}/ui/")
        page.click("#login")  # the key field left empty
        wait_ready(page, "#/policies")
        assert "local/solo" in page.locator("#policies").inner_text()
        click(page, "#policies a[href='#/policy/local/solo']", "#/policy/local/solo")
        assert "No revisions yet" in page.locator("#revisions").inner_text()
    finally:
        live.stop()


def test_revision_older_than_the_page_and_more_revisions(page, console):
    revs = console.revs
    login(page, console, "alice")
    go(page, f"#/policy/alice/chat?rev={revs[0].id}&limit=1")
    assert page.locator("#revisions tbody tr").count() == 1  # only the newest, #3
    assert revs[0].sha256 in page.locator("#provenance").inner_text()  # #1, resolved by id
    click(page, "#more-revs", "#/policy/alice/chat")
    assert page.locator("#revisions tbody tr").count() == 3
    assert page.locator("#more-revs").count() == 0
