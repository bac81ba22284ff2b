"""The CLI's connection to a running relay: where it is, which key, and its failures as one line and an exit code.

Every failure of a client command is a CliError, printed by `relay.cli.main` as
`relay: <message>` on stderr (never a traceback) with the exit code below:

    CliError                     1  anything else the API refused (its code and message shown)
    ├── UsageError               2  the command cannot be run as given (no API key anywhere, ids missing)
    ├── Unreachable              3  connection refused, DNS, TLS, timeout
    ├── Unauthorized             4  401: the key is missing or wrong
    └── NotFound                 5  404

Transport failures and 401s are mapped in `RelayClient.send`, the one place every
request passes; other error answers are mapped by `check`.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import certifi
import httpx

from relay.config import Settings

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_UNAUTHORIZED, EXIT_NOT_FOUND = 1, 2, 3, 4, 5
EXIT_CODES_HELP = ("exit codes: 0 done, 1 failed (the API refused, or an item failed), 2 usage, "
                   "3 relay unreachable, 4 API key refused (401), 5 not found (404)")


class CliError(Exception):
    exit_code = EXIT_FAILED


class UsageError(CliError):
    exit_code = EXIT_USAGE


class Unreachable(CliError):
    exit_code = EXIT_UNREACHABLE


class Unauthorized(CliError):
    exit_code = EXIT_UNAUTHORIZED


class NotFound(CliError):
    exit_code = EXIT_NOT_FOUND


def api_key(given: str | None, settings: Settings) -> str:
    """--api-key, else $RELAY_API_KEY, else the config's first key, else the key `relay serve` generated."""
    from relay.runtime import api_key_file

    if given:
        return given
    if os.environ.get("RELAY_API_KEY"):
        return os.environ["RELAY_API_KEY"]
    if settings.auth.api_keys:
        return settings.auth.api_keys[0]
    path = api_key_file(settings)
    if path.exists():
        return path.read_text().strip()
    raise UsageError("no API key: pass --api-key, set RELAY_API_KEY, or start `relay serve` once")


class RelayClient(httpx.Client):
    """An httpx.Client for relay's API whose transport failures and 401s are CliErrors."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        try:
            response = super().send(request, **kwargs)
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise Unreachable(f"cannot reach relay at {self.base_url}: {reason} (is `relay serve` running? "
                              "--url sets where)") from None
        if response.status_code == 401:
            response.read()
            raise Unauthorized(f"relay at {self.base_url} refused the API key (401 {_message(response)}); "
                               "pass --api-key or set RELAY_API_KEY")
        return response


def connect(settings: Settings, *, url: str | None, key: str | None) -> RelayClient:
    """A client for relay at `url` (default: the configured host and port, over HTTPS when relay serves TLS) with
    the API key found by `api_key`. TLS certificates are checked, always: against certifi's authorities (httpx's
    default) and, when set, the configured server.ssl_certfile (a `relay dev-cert` certificate is its own)."""
    server = settings.server
    verify: ssl.SSLContext | bool = True
    if server.ssl_certfile:     # relay's own certificate (a dev-cert one is its own authority), whatever the URL
        # Beside the authorities httpx trusts by default (certifi's): a remote relay's public certificate still
        # verifies where the system has no store of its own.
        context = ssl.create_default_context(cafile=certifi.where())
        try:
            context.load_verify_locations(cafile=server.ssl_certfile)
            verify = context
        except (OSError, ssl.SSLError) as exc:
            if url is None:     # relay's own address, over HTTPS, needs it
                raise CliError(f"server.ssl_certfile {server.ssl_certfile!r} cannot be read: {exc}") from None
    if url is not None:
        base = url
    else:       # on the machine relay runs on (a certificate for another name: pass --url with that name)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
        host = f"[{host}]" if ":" in host else host
        base = f"{'https' if server.ssl_certfile else 'http'}://{host}:{server.port}"
    try:
        return RelayClient(base_url=base, headers={"authorization": f"Bearer {api_key(key, settings)}"},
                           timeout=30, verify=verify)
    except httpx.InvalidURL as exc:
        raise CliError(f"--url {base!r} is not a URL: {exc}") from None


def _error(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _message(response: httpx.Response) -> str:
    err = _error(response)
    field = f" (field {err['field']})" if err.get("field") else ""
    text = err.get("message") or response.text[:300].strip() or response.reason_phrase
    return f"{err.get('code', '')}: {text}{field}" if err.get("code") else f"{text}{field}"


def error_of(response: httpx.Response) -> CliError | None:
    """The CliError an error answer stands for; None for a 2xx/3xx."""
    if response.status_code < 400:
        return None
    text = f"{response.status_code} {_message(response)}"
    return NotFound(text) if response.status_code == 404 else CliError(text)


def check(response: httpx.Response) -> Any:
    """The JSON body of a successful answer; raises the CliError of an error answer."""
    failure = error_of(response)
    if failure is not None:
        raise failure
    try:
        return response.json()
    except ValueError:
        raise CliError(f"relay answered {response.status_code} with a body that is not JSON") from None
