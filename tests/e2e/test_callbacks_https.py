"""The callback path over real HTTPS: relay serves TLS (a `relay dev-cert` certificate) and EvoLink calls back."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.devcert import make_dev_cert
from tests.e2e.harness import API_KEY, Relay, Simulator, wait_for

pytestmark = pytest.mark.e2e


class HttpsRelay(Relay):
    """`relay serve` over HTTPS with public_url https://localhost:<port> (http callbacks not allowed)."""

    def __init__(self, sim: Simulator, tmp_path: Path, **env: str) -> None:
        cert, key = make_dev_cert(tmp_path / "tls", ["localhost", "127.0.0.1"])
        self.cert = cert
        super().__init__(sim, tmp_path / "data", tmp_path, name="relay-https", extra_env={
            "RELAY_SERVER_SSL_CERTFILE": str(cert), "RELAY_SERVER_SSL_KEYFILE": str(key),
            "RELAY_SERVER_ALLOW_HTTP_CALLBACKS": "false", **env})
        self.url = f"https://localhost:{self.port}"
        self.process.env["RELAY_SERVER_PUBLIC_URL"] = self.url
        self.api.close()
        self.api = self._client()

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=10,
                            verify=ssl.create_default_context(cafile=str(self.cert)))

    def start(self) -> None:
        self.process.start()

        def up() -> bool:
            self.process.check_alive()
            try:
                return self.api.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, 20, f"relay to answer on {self.url}")

    def set_role(self, role: str) -> None:
        self.process.env["RELAY_SERVER_ROLE"] = role


@pytest.fixture
def https_relays(sim: Simulator, tmp_path: Path) -> Any:
    made: list[HttpsRelay] = []

    def make(**env: str) -> HttpsRelay:
        relay = HttpsRelay(sim, tmp_path, **env)
        made.append(relay)
        return relay
    yield make
    for relay in made:
        relay.close()


def callbacks_of(sim: Simulator, task: dict[str, Any]) -> list[dict[str, Any]]:
    return list(sim.task("evolink", task["provider_task_id"])["callbacks"])


def test_task_completes_by_callback_alone_over_https(sim: Simulator, https_relays: Any) -> None:
    """Polling an hour away: the HTTPS callback alone brings an EvoLink task to succeeded."""
    relay = https_relays(RELAY_CALLBACKS_SAFETY_NET_SECONDS="3600")
    relay.start()
    task = relay.wait_succeeded(relay.create({"provider": "evolink", "prompt": "p"})["id"])
    calls = callbacks_of(sim, task)
    assert calls and calls[0]["url"].startswith("https://localhost:") and calls[0]["status_code"] == 200
    assert sim.stats("evolink")["polls"] == 1     # one confirmation, no polling


def test_task_completes_by_safety_net_alone_over_https(sim: Simulator, https_relays: Any) -> None:
    """Callbacks dropped: the safety-net poll finishes the task."""
    relay = https_relays(RELAY_CALLBACKS_SAFETY_NET_SECONDS="1")
    relay.start()
    sim.faults(callbacks={"drop": True})
    task = relay.wait_succeeded(relay.create({"provider": "evolink", "prompt": "p"})["id"])
    assert callbacks_of(sim, task) == []


def test_relay_killed_after_acknowledging_still_processes(sim: Simulator, https_relays: Any) -> None:
    """A callback acknowledged by relay (API role, no worker) that is then SIGKILLed is processed after restart."""
    relay = https_relays(RELAY_CALLBACKS_SAFETY_NET_SECONDS="3600")
    sim.faults(duration=3.0)
    relay.start()
    task = relay.create({"provider": "evolink", "prompt": "p"})
    task = relay.wait_status(task["id"], ("queued", "running"))
    relay.kill()
    relay.set_role("api")            # the next run acknowledges callbacks but processes nothing
    relay.start()
    wait_for(lambda: any(c.get("status_code") == 200 for c in callbacks_of(sim, task)), 20,
             "the callback to be acknowledged")
    assert relay.task(task["id"])["status"] in ("queued", "running")
    relay.kill()                      # crash right after acknowledging
    relay.set_role("all")
    relay.start()
    final = relay.wait_succeeded(task["id"])
    assert sum(1 for e in relay.events(task["id"]) if e["type"] == "task.succeeded") == 1
    assert final["images"][0]["sha256"] == sim.task("evolink", task["provider_task_id"])["images"][0]["sha256"]


def test_http_public_url_is_refused_for_callback_providers(sim: Simulator, tmp_path: Path) -> None:
    """relay refuses to start when a callback provider would get a plain-http callback URL."""
    relay = Relay(sim, tmp_path / "data", tmp_path, name="relay-http",
                  extra_env={"RELAY_SERVER_ALLOW_HTTP_CALLBACKS": "false"})
    try:
        relay.process.start()
        assert relay.process.proc is not None
        code = relay.process.proc.wait(timeout=20)
        assert code != 0 and "HTTPS" in relay.process.output()
    finally:
        relay.close()


def test_the_cli_reaches_relay_over_https_and_checks_the_certificate(sim: Simulator, https_relays: Any) -> None:
    """`relay tasks` with relay's own configuration (ssl_certfile set) talks HTTPS to it and trusts that
    certificate, also at a --url; without it, given a --url whose certificate nobody it trusts signed, it refuses
    (exit 3) rather than hand the API key to whoever answers."""
    import subprocess
    import sys
    relay = https_relays()
    relay.start()
    task = relay.create({"provider": "evolink", "prompt": "p"})
    env = dict(relay.process.env)
    own = subprocess.run([sys.executable, "-m", "relay", "tasks", "--json"], env=env, capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert own.returncode == 0, own.stderr
    assert task["id"] in own.stdout
    at_url = subprocess.run([sys.executable, "-m", "relay", "tasks", "--json", "--url", relay.url], env=env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert at_url.returncode == 0 and task["id"] in at_url.stdout, at_url.stderr
    elsewhere = {k: v for k, v in env.items() if not k.startswith("RELAY_SERVER_SSL_")}
    stranger = subprocess.run([sys.executable, "-m", "relay", "tasks", "--json", "--url", relay.url], env=elsewhere,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert stranger.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in stranger.stderr, stranger.stderr
