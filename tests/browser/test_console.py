"""The operator's console in a real browser (headless Chromium), against relay and the simulator as processes,
on SQLite and on PostgreSQL. Every test also checks, in its fixture, that no page loaded anything from outside
relay and that nothing broke the Content-Security-Policy."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.e2e.harness import API_KEY, Relay, Simulator, wait_for
from tests.sink import Sink

from .harness import PASSWORD, SECRET, WAIT, Console, bury_a_job, open_a_circuit, wait_status

pytestmark = pytest.mark.e2e
MS = WAIT * 1000
expect.set_options(timeout=MS)
PAGES = ("/console/", "/console/archives", "/console/subscriptions", "/console/dead-letters",
         "/console/providers", "/console/queue")


def test_a_wrong_password_is_refused(console: Console) -> None:
    """A wrong password gets the login form again with a 401 and no session; the pages stay closed."""
    response = console.login("not-the-password")
    assert response is not None and response.status == 401
    expect(console.page.locator(".error")).to_have_text("Wrong API key or password.")
    assert not [c for c in console.context.cookies() if c["name"] == "relay_session"]
    console.goto("/console/queue")
    expect(console.page).to_have_url(f"{console.relay.url}/console/login?next=%2Fconsole%2Fqueue")


def test_password_guessing_is_throttled_per_client(console: Console) -> None:
    """Ten wrong tries from one address, then even the right password waits (429, Retry-After): guessing is
    held to one try every few seconds, across replicas (the bucket is in the store). The ten are the login form's
    POST sent back to back by Playwright's request API (it shares the page's cookies): as page loads they took over six seconds on a slow
    machine, and a token came back (one does every six) before the right password was tried."""
    console.goto("/")
    nonce = console.page.locator("input[name=nonce]").get_attribute("value")
    assert nonce
    for _ in range(10):
        wrong = console.page.request.post(console.relay.url + "/console/login", max_redirects=0,
                                          form={"credential": "not-the-password", "nonce": nonce})
        assert wrong.status == 401
    response = console.login(PASSWORD)
    assert response is not None and response.status == 429
    assert 1 <= int(response.headers["retry-after"]) <= 6
    expect(console.page.locator(".error")).to_contain_text("Too many login attempts")
    assert not [c for c in console.context.cookies() if c["name"] == "relay_session"]


def test_log_in_with_the_password_or_an_api_key(console: Console) -> None:
    """The dashboard password and an API key both log in; the session cookie is HttpOnly and SameSite=Strict."""
    console.login(PASSWORD)
    expect(console.page.locator("h1")).to_have_text("Tasks")
    cookie = next(c for c in console.context.cookies() if c["name"] == "relay_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert PASSWORD not in console.page.content()
    console.page.click("form.logout button")
    expect(console.page.locator("#credential")).to_be_visible()
    console.login(API_KEY)
    expect(console.page.locator(".who")).to_have_text("signed in with an API key")
    for path in PAGES:           # nothing secret in any page: not the key that logged in
        console.goto(path)
        assert API_KEY not in console.page.content()


def test_every_page_loads_only_from_relay(console: Console, relay: Relay) -> None:
    """Each page answers 200 with a strict CSP and loads its CSS and script from relay itself."""
    console.login()
    for path in PAGES:
        response = console.goto(path)
        assert response.status == 200, path
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert response.headers["cache-control"] == "no-store"
    assert any(url.endswith("/console/static/console.css") for url in console.requests)
    assert any(url.endswith("/console/static/console.js") for url in console.requests)
    assert console.outside_requests() == []


def test_a_task_goes_from_pending_to_succeeded_without_a_reload(console: Console, relay: Relay,
                                                               sim: Simulator) -> None:
    """The task list shows a new task pending and then succeeded by itself; its page shows the timeline and the
    archived image from relay's own image link."""
    console.login()
    sim.faults(latency=3.0)                        # the submit hangs: the task stays pending meanwhile
    task = relay.create({"provider": "gmicloud", "prompt": "a lighthouse", "metadata": {"order": "A-1042"}})
    console.page.evaluate("window.__noReload = 'still here'")
    row = console.page.locator(f"tr[data-task='{task['id']}']")
    expect(row.locator(".status")).to_have_text("pending", timeout=MS)
    sim.faults(latency=0.0)
    expect(row.locator(".status")).to_have_text("succeeded", timeout=MS)
    assert console.page.evaluate("window.__noReload") == "still here"
    expect(row).to_contain_text("1 / 1")

    console.page.fill("input[name=q]", "A-1042")        # search by a metadata value
    console.page.click(".filters button")
    expect(console.page.locator("tr[data-task]")).to_have_count(1)

    console.page.click(f"a[href='/console/tasks/{task['id']}']")
    events = console.page.locator("li.event")
    expect(events).to_have_count(4)
    assert [e.get_attribute("data-event") for e in events.all()] == [
        "task.queued", "task.running", "task.generated", "task.succeeded"]
    image = console.page.locator(".thumb img")
    expect(image).to_have_count(1)
    assert (image.get_attribute("src") or "").startswith("/v1/images/img_")
    wait_for(lambda: console.page.evaluate("document.querySelector('.thumb img').naturalWidth") > 0, WAIT,
             "the thumbnail to load")


def test_retry_dead_letters_and_see_them_succeed(console: Console, relay: Relay, sink: Sink) -> None:
    """Deliveries to a subscriber that was down end as dead letters; selected and retried from the page, they
    succeed, and the task's timeline shows every attempt."""
    sink.fail("/hook", 4)                   # both attempts of both deliveries fail; later ones succeed
    sub = relay.api.post("/v1/subscriptions", json={"url": sink.url("/hook"), "events": ["task.succeeded"]}).json()
    tasks = [relay.create({"provider": "gmicloud", "prompt": f"dead letter {i}"}) for i in range(2)]
    for task in tasks:
        relay.wait_succeeded(task["id"])
    wait_status(relay, {"subscription_id": sub["id"]}, "failed", count=2)

    console.login()
    console.goto("/console/dead-letters")
    rows = console.page.locator("tr[data-delivery]")
    expect(rows).to_have_count(2)
    console.page.check("input[data-select-all]")
    console.page.click("#dead-letters button[type=submit]")
    expect(console.page.locator(".note")).to_have_text("2 dead letter(s) queued for a new attempt.")
    wait_status(relay, {"subscription_id": sub["id"]}, "succeeded", count=2)
    assert len(sink.delivered("/hook")) == 2
    console.goto("/console/dead-letters")
    expect(console.page.locator("tr[data-delivery]")).to_have_count(0)

    console.goto(f"/console/tasks/{tasks[0]['id']}")
    delivery = console.page.locator(".delivery")
    expect(delivery.locator(".status")).to_have_text("succeeded")
    attempts = delivery.locator("table.attempts tbody tr")
    expect(attempts).to_have_count(3)
    expect(attempts.nth(0)).to_contain_text("503")
    expect(attempts.nth(2)).to_contain_text("retry")
    expect(attempts.nth(2)).to_contain_text("200")


def test_retry_one_failed_delivery_from_the_task_page(console: Console, relay: Relay, sink: Sink) -> None:
    """The task page's Retry button on a failed delivery sends it again; the page shows it succeed by itself."""
    sink.fail("/one", 2)
    relay.api.post("/v1/subscriptions", json={"url": sink.url("/one"), "events": ["task.succeeded"]})
    task = relay.create({"provider": "gmicloud", "prompt": "retry me"})
    relay.wait_succeeded(task["id"])
    wait_status(relay, {"task_id": task["id"]}, "failed")
    console.login()
    console.goto(f"/console/tasks/{task['id']}")
    console.page.click(".delivery button")
    expect(console.page.locator(".note")).to_have_text("The delivery was queued for a new attempt.")
    expect(console.page.locator(".delivery .status")).to_have_text("succeeded", timeout=MS)


def test_rotate_a_secret_shown_once(console: Console, relay: Relay, sink: Sink) -> None:
    """Creating and rotating show the secret once; no other page holds it; the new one signs the next webhook."""
    console.login()
    console.goto("/console/subscriptions")
    console.page.fill("input[name=url]", sink.url("/rotated"))
    console.page.fill("input[name=events]", "task.succeeded")
    console.page.click("form.create button")
    first = console.page.locator("#secret").inner_text()
    assert SECRET.fullmatch(first)
    console.goto("/console/subscriptions")
    assert "whsec_" not in console.page.content()

    console.page.click("tr[data-subscription] form[action$='/rotate'] button")
    expect(console.page.locator("h1")).to_have_text("Secret rotated")
    second = console.page.locator("#secret").inner_text()
    assert SECRET.fullmatch(second) and second != first
    for path in ("/console/subscriptions", "/console/", "/console/dead-letters"):
        console.goto(path)
        assert "whsec_" not in console.page.content()

    task = relay.create({"provider": "gmicloud", "prompt": "signed"})
    relay.wait_succeeded(task["id"])
    received = wait_for(lambda: sink.delivered("/rotated"), WAIT, "the webhook")
    assert received[0].verify(second)["type"] == "task.succeeded"


def test_disable_and_replay_a_subscription(console: Console, relay: Relay, sink: Sink) -> None:
    """Disable shows the subscription disabled; enabled again, Replay sends its failed deliveries again."""
    sink.fail("/replayed", 2)
    sub = relay.api.post("/v1/subscriptions", json={"url": sink.url("/replayed"), "events": ["task.succeeded"]}).json()
    task = relay.create({"provider": "gmicloud", "prompt": "replay"})
    relay.wait_succeeded(task["id"])
    wait_status(relay, {"subscription_id": sub["id"]}, "failed")
    console.login()
    console.goto("/console/subscriptions")
    row = console.page.locator(f"tr[data-subscription='{sub['id']}']")
    expect(row.locator(".status")).to_have_text("failing")
    row.locator("form[action$='/disable'] button").click()
    expect(row.locator(".status")).to_have_text("disabled")
    row.locator("form[action$='/enable'] button").click()
    expect(row.locator(".status")).to_have_text("active")        # enabling forgets the failures
    row.locator("form.replay button").click()
    expect(console.page.locator(".note")).to_have_text("1 deliveries queued again.")
    wait_status(relay, {"subscription_id": sub["id"]}, "succeeded")
    console.goto("/console/subscriptions")
    expect(row.locator(".status")).to_have_text("active")
    expect(row).to_contain_text("of 3")            # three attempts in the last hour, one of them a success


def test_a_form_without_its_csrf_token_is_refused(console: Console, relay: Relay, sim: Simulator) -> None:
    """A POST with the session cookie but no token, a wrong token, or the right token from another origin is 403
    and changes nothing; the page's own form goes through."""
    sim.faults(latency=5.0)                        # keeps the task pending, so it can be canceled
    task = relay.create({"provider": "gmicloud", "prompt": "csrf"})
    console.login()
    console.goto(f"/console/tasks/{task['id']}")
    token = console.csrf()
    path = f"/console/tasks/{task['id']}/cancel"
    for form, headers in (({}, {}), ({"csrf": "0" * 64}, {}), ({"csrf": token}, {"origin": "https://evil.example"})):
        refused = console.page.request.post(path, form=form, headers=headers, max_redirects=0)
        assert refused.status == 403, (form, headers, refused.status)
        assert "CSRF" in refused.text()
    assert relay.task(task["id"])["status"] == "pending"
    console.page.click("button.danger")
    expect(console.page.locator("#task-status")).to_have_text("canceled")
    assert relay.task(task["id"])["status"] == "canceled"
    sim.faults(latency=0.0)


def test_queue_shows_a_dead_job_and_retries_it(console: Console, relay: Relay) -> None:
    """A job that failed for good is listed with its last error; Retry queues it again and it runs."""
    task = relay.create({"provider": "gmicloud", "prompt": "watched"})
    relay.wait_succeeded(task["id"])
    job_id = bury_a_job(relay, task["id"], "provider_unavailable: provider error 500: internal server error")
    assert [j["id"] for j in relay.api.get("/v1/jobs", params={"state": "dead"}).json()["data"]] == [job_id]
    console.login()
    console.goto("/console/queue")
    row = console.page.locator(f"tr[data-job='{job_id}']")
    expect(row).to_contain_text("poll")
    expect(row).to_contain_text("provider error 500")
    expect(console.page.locator("tr[data-kind='poll']")).to_contain_text("1")
    row.locator("button").click()
    expect(console.page.locator(".note")).to_have_text("The job was queued again.")
    def gone() -> bool:
        return all(job_id not in {j["id"] for j in relay.api.get("/v1/jobs", params={"state": state}).json()["data"]}
                   for state in ("dead", "queued"))
    wait_for(gone, WAIT, "the retried job to run and finish")
    expect(console.page.locator(f"tr[data-job='{job_id}']")).to_have_count(0)


def test_providers_page_counts_requests_and_in_flight(console: Console, relay: Relay) -> None:
    """The Providers page shows each configured provider with its requests and in-flight tasks against its cap."""
    task = relay.create({"provider": "gmicloud", "prompt": "count me"})
    relay.wait_succeeded(task["id"])
    console.login()
    row = console.page.locator("tr[data-provider='gmicloud']")

    def counted() -> bool:
        console.goto("/console/providers")         # the stats are flushed by each process every few seconds
        return int(row.locator("td").nth(1).inner_text()) > 0
    wait_for(counted, 3 * WAIT, "gmicloud's requests to be counted", interval=1.0)
    expect(row).to_contain_text("0 / 256")


def test_providers_page_shows_circuits_and_cost_today(console: Console, relay: Relay) -> None:
    """Each provider's circuit (closed, or open with its failures, until when and the last error) and the cost of
    its tasks that ended today, from the store every replica shares."""
    task = relay.create({"provider": "evolink", "prompt": "priced"})
    done = relay.wait_succeeded(task["id"])
    open_a_circuit(relay, "pixazo", "provider error 503: service unavailable")
    console.login()
    console.goto("/console/providers")
    pixazo = console.page.locator("tr[data-provider='pixazo'] td.circuit")
    expect(pixazo).to_have_attribute("data-state", "open")
    expect(pixazo).to_contain_text("open")
    expect(pixazo).to_contain_text("1 failure")
    expect(pixazo).to_contain_text("probe after 20")          # a UTC time: 2026-…
    expect(pixazo).to_contain_text("service unavailable")
    expect(console.page.locator("tr[data-provider='evolink'] td.circuit")).to_have_attribute("data-state", "closed")
    cost = console.page.locator("tr[data-provider='evolink'] td.cost")
    expect(cost).to_contain_text(f"{done['cost']['amount']:.4f} {done['cost']['currency']}")
    expect(cost).to_contain_text("(1 task)")
    expect(console.page.locator("tr[data-provider='pixazo'] td.cost")).to_have_text("—")


def test_archives_page_lists_filters_pages_and_opens_an_archive(console: Console, relay: Relay, sink: Sink) -> None:
    """Archives from the nav: the list by status, an older page by cursor; an archive's page shows its thumbnail
    from relay's own image link and its archive.succeeded event with the delivery and its attempt."""
    relay.api.post("/v1/subscriptions", json={"url": sink.url("/archives"), "events": ["archive.*"]})
    links = []
    for n in range(2):
        task = relay.create({"provider": "gmicloud", "prompt": f"to archive {n}"})
        links.append(relay.wait_succeeded(task["id"])["images"][0]["url"])
    made = []
    for link in links:
        created = relay.api.post("/v1/archives", json={"url": link, "metadata": {"batch": "B-7"}})
        assert created.status_code == 202, created.text
        made.append(created.json()["id"])
    for archive_id in made:
        wait_for(lambda a=archive_id: relay.api.get(f"/v1/archives/{a}").json()["status"] == "succeeded", WAIT,
                 f"{archive_id} to succeed")
    wait_status(relay, {"status": "succeeded"}, "succeeded", count=2)
    console.login()
    console.page.click("header nav a[href='/console/archives']")
    expect(console.page.locator("h1")).to_have_text("Archives")
    rows = console.page.locator("tr[data-archive]")
    expect(rows).to_have_count(2)
    assert [r.get_attribute("data-archive") for r in rows.all()] == made[::-1]       # newest first
    expect(rows.first.locator(".status")).to_have_text("succeeded")
    console.page.select_option("select[name=status]", "failed")
    console.page.click(".filters button")
    expect(console.page.locator("td.empty")).to_have_text("No archives with this status.")
    console.goto(f"/console/archives?status=succeeded&cursor={made[1]}")              # the page after the newest
    expect(console.page.locator("tr[data-archive]")).to_have_count(1)
    expect(console.page.locator(f"tr[data-archive='{made[0]}']")).to_have_count(1)

    console.page.click(f"a[href='/console/archives/{made[0]}']")
    expect(console.page.locator("#archive-status")).to_have_text("succeeded")
    expect(console.page.locator(".json")).to_contain_text("B-7")
    image = console.page.locator(".thumb img")
    expect(image).to_have_count(1)
    assert (image.get_attribute("src") or "").startswith("/v1/images/img_")
    wait_for(lambda: console.page.evaluate("document.querySelector('.thumb img').naturalWidth") > 0, WAIT,
             "the thumbnail to load")
    event = console.page.locator("li.event")
    expect(event).to_have_count(1)
    assert event.get_attribute("data-event") == "archive.succeeded"
    expect(event.locator(".delivery .status")).to_have_text("succeeded")
    expect(event.locator("table.attempts tbody tr")).to_have_count(1)
    assert console.goto("/console/archives/arc_nope").status == 404

