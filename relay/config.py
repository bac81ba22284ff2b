"""Settings: built-in defaults ← TOML file (optional) ← `RELAY_*` environment, validated once.

Any string value may be written `env:NAME` to read it (typically a secret) from the
environment. The environment is read in `load_settings` only, through the mapping it
is given; everything else here is plain frozen data. Every problem found is collected
into one `ConfigError`, one `key.path: what is wrong (got X)` line each. Secrets are
never echoed: not in problems, not in `repr`, and `Settings.redacted()` shows "***".
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relay.costs import QUALITY_KEYS, SIZE_KEYS, PriceTable
from relay.errors import RelayError
from relay.models import IDEMPOTENCY_WINDOW

PROVIDER_KINDS = ("gmicloud", "apimart", "evolink", "pixazo", "openai")
ROLES = ("all", "api", "worker")
SQLITE_SYNCHRONOUS = ("normal", "full")
SIMULATOR_URL = "http://127.0.0.1:8700"   # where `relay simulate` listens by default
SECTIONS = ("server", "auth", "storage", "worker", "polling", "archive", "network", "callbacks", "deliveries",
            "dashboard", "retention", "failover", "openai_compat")
STRATEGIES = ("ordered", "cheapest")
SECRET_KEYS = frozenset({"api_keys", "signing_secret", "api_key", "encryption_key", "previous_encryption_keys",
                         "task_webhook_secret", "access_key_id", "secret_access_key", "password"})

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$", re.IGNORECASE)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ConfigError(RelayError):
    """The configuration is invalid; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""            # "" → http://{host}:{port}; resolved in load_settings
    role: str = "all"               # all | api | worker
    allow_http_callbacks: bool = False
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    max_body_bytes: int = 1_048_576
    # Peers whose X-Forwarded-For / X-Forwarded-Proto relay believes (IPs, CIDRs or "*"): the client address
    # that the console's login limit counts by. () → uvicorn's default: $FORWARDED_ALLOW_IPS, else the loopback.
    forwarded_allow_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthSettings:
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    signing_secret: str = field(default="", repr=False)


@dataclass(frozen=True)
class S3Settings:
    """[storage.s3]: the S3-compatible service of `storage.images_url = "s3://…"`.

    A key left "" takes the standard AWS environment variable (resolved in load_settings):
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY; with no keys at all the client's own AWS chain applies (session token,
    web identity, container or instance role).
    """

    endpoint_url: str = ""      # "" → AWS's regional endpoint; MinIO/R2/Ceph: their URL
    region: str = ""            # "" → us-east-1
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class StorageSettings:
    data_dir: str = "./relay-data"
    database: str = field(default="", repr=False)   # may hold a password; "" → sqlite:///{data_dir}/relay.db
    images_dir: str = ""                             # "" → {data_dir}/images
    images_url: str = ""                             # "" → the local directory images_dir; or s3://BUCKET/PREFIX
    # SQLite only: "normal" (WAL, no fsync per commit) keeps what relay acknowledged across a crash of relay, not
    # of the machine (a power loss may take the last commits); "full" fsyncs every commit (relay.store.sqlite).
    sqlite_synchronous: str = "normal"
    s3: S3Settings = field(default_factory=S3Settings)


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = 32
    lease_seconds: float = 60.0
    idle_poll_seconds: float = 1.0
    max_attempts: int = 12
    retry_base: float = 2.0
    retry_cap: float = 300.0
    claim_batch: int = 32


@dataclass(frozen=True)
class PollingSettings:
    initial_delay: float = 2.0
    max_delay: float = 30.0
    backoff: float = 1.6
    jitter: float = 0.2
    task_timeout: float = 1800.0


@dataclass(frozen=True)
class ArchiveSettings:
    max_bytes: int = 50 * 1024 * 1024
    timeout: float = 120.0
    link_ttl: float = 7 * 86400.0
    input_max_bytes: int = 20 * 1024 * 1024


@dataclass(frozen=True)
class NetworkSettings:
    allow: tuple[str, ...] = ()      # CIDRs or hostnames exempt from the SSRF guard


@dataclass(frozen=True)
class CallbackSettings:
    trust_body: bool = False
    safety_net_seconds: float = 300.0


@dataclass(frozen=True)
class DeliverySettings:
    """Outbound webhooks to subscribers (relay.deliveries)."""

    # Delay before each attempt of a round (the first: at once); a delivery fails when it is used up.
    schedule: tuple[float, ...] = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    jitter: float = 0.2
    timeout: float = 15.0
    concurrency_per_subscription: int = 8
    auto_disable_after: float = 5 * 86400.0
    rotation_overlap: float = 86400.0
    encryption_key: str = field(default="", repr=False)        # "" → derived from the signing secret
    previous_encryption_keys: tuple[str, ...] = field(default=(), repr=False)
    task_webhook_secret: str = field(default="", repr=False)   # whsec_…; "" → derived from the signing secret


@dataclass(frozen=True)
class DashboardSettings:
    """The operator's console at GET / (relay.web.console): who may log in, and for how long."""

    password: str = field(default="", repr=False)   # "" → log in with an API key only
    session_ttl: float = 12 * 3600.0                 # seconds a login lasts


@dataclass(frozen=True)
class RetentionSettings:
    """What housekeeping deletes, and when (relay.retention). Ages in seconds; 0 keeps forever."""

    # An application reads a result within hours; a month covers disputes and audits with a provider's bill.
    # Finished archives of any link (POST /v1/archives) go at the same age, with their rows.
    finished_tasks: float = 30 * 86400.0
    # The event log is what subscribers replay from: a month outlasts any retry schedule (~27 h) and
    # auto-disable (5 days), so a subscriber back from a long outage can still replay it. Provider request stats
    # (per provider per minute; the console reads the last day) and dead jobs of no task (a delivery's, settled
    # as failed) go at the same age.
    events: float = 30 * 86400.0
    # The bulkiest rows (up to 4 KiB of response each) and only read to debug an endpoint: two weeks.
    delivery_attempts: float = 14 * 86400.0
    # Archiving images is what relay is for: kept, even after their task's rows are gone.
    images: float = 0.0
    interval: float = 3600.0        # seconds between housekeeping runs; 0 → none (run `relay retention`)
    batch_size: int = 500           # rows (tasks, events, attempts) deleted per transaction


@dataclass(frozen=True)
class FailoverSettings:
    """Moving a task to its next provider (relay.routing) and the per-provider circuit breaker (relay.circuit)."""

    # A 429 is waited out on the same provider while its Retry-After (added up over the task's 429s there)
    # stays within this many seconds; past it, a task with another provider left moves on.
    rate_limit_patience: float = 30.0
    breaker_threshold: int = 5          # consecutive failed submits that open a provider's circuit
    breaker_cooldown: float = 60.0      # seconds an open circuit is skipped before one probe submit


@dataclass(frozen=True)
class OpenAICompatSettings:
    """`[openai_compat]`: the OpenAI-shaped endpoints /openai/v1/images/* (relay.web.openai_compat)."""

    # A request waits this long for its task to be archived; past it, a 504 names the relay task to poll.
    wait_seconds: float = 120.0


@dataclass(frozen=True)
class RouteSettings:
    """`[routes.NAME]`: a name a task may give as its provider, for several providers in failover order."""

    name: str
    providers: tuple[str, ...]
    strategy: str = "ordered"           # ordered | cheapest (by the request's price, relay.costs)


@dataclass(frozen=True)
class ProviderSettings:
    name: str
    kind: str
    base_url: str
    api_key: str = field(repr=False)
    model: str | None = None
    timeout: float = 60.0
    rate_limit: float = 10.0         # requests/second to this provider
    max_in_flight: int = 256
    poll_initial_delay: float | None = None   # None → polling.initial_delay


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    polling: PollingSettings = field(default_factory=PollingSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)
    deliveries: DeliverySettings = field(default_factory=DeliverySettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    failover: FailoverSettings = field(default_factory=FailoverSettings)
    openai_compat: OpenAICompatSettings = field(default_factory=OpenAICompatSettings)
    providers: dict[str, ProviderSettings] = field(default_factory=dict)
    routes: dict[str, RouteSettings] = field(default_factory=dict)
    prices: dict[str, PriceTable] = field(default_factory=dict)       # provider name → [providers.NAME.prices]
    source: str | None = None        # the file loaded, or None for the embedded simulator profile

    def provider(self, name: str) -> ProviderSettings:
        """The provider called `name`; ValueError naming the known ones otherwise."""
        try:
            return self.providers[name]
        except KeyError:
            known = ", ".join(self.providers) or "none"
            raise ValueError(f"unknown provider {name!r}; configured providers: {known}") from None

    def redacted(self) -> dict[str, Any]:
        """Every setting as JSON-able data, secrets replaced by "***" (for `relay check-config`)."""
        out: dict[str, Any] = {s: _public(getattr(self, s)) for s in SECTIONS}
        out["providers"] = {name: _public(p) for name, p in self.providers.items()}
        out["routes"] = {name: {"providers": list(r.providers), "strategy": r.strategy} for name, r in self.routes.items()}
        out["prices"] = {name: {**_public(t), "by_quality_size": {f"{q}/{z}": v for (q, z), v in
                                                                   t.by_quality_size.items()}}
                         for name, t in self.prices.items()}
        out["source"] = self.source
        return out


_SECTION_CLASSES: dict[str, type] = {
    "server": ServerSettings, "auth": AuthSettings, "storage": StorageSettings, "worker": WorkerSettings,
    "polling": PollingSettings, "archive": ArchiveSettings, "network": NetworkSettings,
    "callbacks": CallbackSettings, "deliveries": DeliverySettings, "dashboard": DashboardSettings,
    "retention": RetentionSettings, "failover": FailoverSettings,
    "openai_compat": OpenAICompatSettings,
}
_KIND_OF_TYPE: dict[Any, str] = {
    int: "int", float: "float", bool: "bool", str: "str", str | None: "optstr",
    float | None: "optfloat", tuple[str, ...]: "strs", tuple[float, ...]: "floats",
}
_KIND_TEXT = {
    "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
    "optstr": "a string", "optfloat": "a number", "strs": "a list of strings", "floats": "a list of numbers",
}


def _kinds(cls: type) -> dict[str, str]:
    hints = typing.get_type_hints(cls)
    return {f.name: _KIND_OF_TYPE[hints[f.name]] for f in fields(cls)
            if f.name != "name" and f.name not in _SUBTABLES.get(cls, {})}


# Tables inside a section (`[storage.s3]`): section class → {key: class of the subtable}.
_SUBTABLES: dict[type, dict[str, type]] = {StorageSettings: {"s3": S3Settings}}
_FIELD_KINDS = {name: _kinds(cls) for name, cls in _SECTION_CLASSES.items()}
_SUB_KINDS = {(section, key): _kinds(sub) for section, cls in _SECTION_CLASSES.items()
              for key, sub in _SUBTABLES.get(cls, {}).items()}
_PROVIDER_KINDS_OF = _kinds(ProviderSettings)
_POSITIVE = {
    "server": ("max_body_bytes",),
    "worker": ("concurrency", "lease_seconds", "idle_poll_seconds", "max_attempts", "retry_base", "retry_cap",
               "claim_batch"),
    "polling": ("initial_delay", "max_delay", "task_timeout"),
    "archive": ("max_bytes", "timeout", "link_ttl", "input_max_bytes"),
    "callbacks": ("safety_net_seconds",),
    "deliveries": ("timeout", "concurrency_per_subscription", "auto_disable_after", "rotation_overlap"),
    "dashboard": ("session_ttl",),
    "retention": ("batch_size",),
    "failover": ("breaker_threshold", "breaker_cooldown"),
    "openai_compat": ("wait_seconds",),
}
EXAMPLE_API_KEY = "rk_example_0123456789abcdef"    # config.example.toml's: accepted only on the loopback
_BAD: Any = object()   # a value that failed to convert (its problem is already recorded)


_SECRET_QUERY = re.compile(r"((?:^|&)(?:password|sslpassword)=)[^&]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """A URL with its secrets as ***: the password of its userinfo, and password= (sslpassword=) in its query,
    which asyncpg reads as well."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.partition("://")[0] + "://***"
    if parts.password is not None:
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}")
    return urlunsplit(parts._replace(query=_SECRET_QUERY.sub(r"\1***", parts.query)))


def _public(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in SECRET_KEYS:
            value = ["***"] * len(value) if isinstance(value, tuple) else ("***" if value else "")
        elif is_dataclass(value):
            value = _public(value)
        elif f.name in ("database", "base_url", "endpoint_url", "public_url"):
            value = mask_url(value)      # a password in a URL's userinfo is a secret like any other
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _show(value: Any, secret: bool) -> str:
    return "***" if secret else repr(value)


class _Text(str):
    """Shown as is in a problem's (got …), e.g. a secret's length."""

    def __repr__(self) -> str:
        return str(self)


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _env_name(provider: str) -> str:
    return provider.upper().replace("-", "_")


def _embedded_profile() -> dict[str, Any]:
    """The built-in profile used when no file is given: every dialect against the local simulator."""
    return {
        "server": {"allow_http_callbacks": True},
        "network": {"allow": ["127.0.0.0/8", "::1/128", "localhost"]},
        "providers": {k: {"kind": k, "base_url": f"{SIMULATOR_URL}/{k}", "api_key": "sim", "prices": DEMO_PRICES[k]}
                      for k in PROVIDER_KINDS},
    }


# Illustrative prices (USD per image, or per credit / million tokens where the provider reports those) for the
# embedded simulator profile, so the demo shows costs; a real config states its own ([providers.NAME.prices]).
DEMO_PRICES: dict[str, dict[str, Any]] = {
    "gmicloud": {"low": 0.009, "medium": 0.034, "high": 0.133, "default": 0.034},
    "apimart": {"only_successful": True, "low": 0.008, "medium": 0.03, "high": 0.12, "default": 0.03},
    "evolink": {"credit_price": 0.012, "default": 0.03},
    "pixazo": {"default": 0.05},
    "openai": {"input_token_price": 5.0, "output_token_price": 40.0, "default": 0.042},
}


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is not a file" if path.exists() else "file not found"
        raise ConfigError([f"config: {what} (got {str(path)!r})"])
    try:
        with path.open("rb") as fp:
            return tomllib.load(fp)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"config: {path} is not valid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"config: cannot read {path}: {exc.strerror}"]) from None


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, merge and validate settings; raise ConfigError listing every problem.

    With no `path`, `RELAY_CONFIG` names the file; with neither, the embedded simulator profile is used.
    `environ` defaults to `os.environ` and is the only place the environment is read.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    if path is None and env.get("RELAY_CONFIG"):
        path = env["RELAY_CONFIG"]
    if path is None:
        data, source = _embedded_profile(), None
    else:
        data, source = _read_toml(Path(path).expanduser()), str(path)
    return _Loader(env).load(data, source)


_Raw = dict[str, tuple[Any, str | None]]   # key → (value, env variable it came from or None for the file)


class _Loader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.raw: dict[str, _Raw] = {s: {} for s in SECTIONS}
        self.sub: dict[tuple[str, str], _Raw] = {k: {} for k in _SUB_KINDS}   # [storage.s3] …
        self.prov: dict[str, _Raw] = {}
        self.route_tables: dict[str, Any] = {}     # [routes.NAME], checked once the providers are known
        self.price_tables: dict[str, Any] = {}     # [providers.NAME.prices]

    def problem(self, path: str, what: str, got: Any = _BAD, secret: bool = False) -> None:
        self.problems.append(f"{path}: {what}" + ("" if got is _BAD else f" (got {_show(got, secret)})"))

    def load(self, data: dict[str, Any], source: str | None) -> Settings:
        self.read_tables(data)
        self.read_environ()
        sections = {s: self.build(s, _SECTION_CLASSES[s]) for s in SECTIONS}
        sections["server"] = self.check_server(sections["server"])
        self.check_auth(sections["auth"], sections["server"])
        sections["storage"] = self.check_storage(sections["storage"])
        self.check_numbers(sections)
        self.check_allow(sections["network"])
        sections["network"] = self.embedded_exemption(sections["network"], sections["server"], source)
        self.check_deliveries(sections["deliveries"])
        self.check_dashboard(sections["dashboard"])
        self.check_retention(sections["retention"])
        providers = self.build_providers()
        if sections["failover"].rate_limit_patience < 0:
            self.problem("failover.rate_limit_patience", "must not be negative",
                         sections["failover"].rate_limit_patience)
        routes = self.build_routes(providers)
        prices = {name: table for name, raw in self.price_tables.items()
                  if (table := self.build_prices(f"providers.{name}.prices", raw)) is not None}
        if self.problems:
            raise ConfigError(self.problems)
        return Settings(**sections, providers=providers, routes=routes, prices=prices, source=source)

    # -- merging ---------------------------------------------------------------------------------
    def read_tables(self, data: dict[str, Any]) -> None:
        for top, table in data.items():
            if top not in SECTIONS and top not in ("providers", "routes"):
                self.problem(top, f"unknown key{_suggest(top, (*SECTIONS, 'providers', 'routes'))}")
            elif not isinstance(table, dict):
                self.problem(top, "must be a table", table)
            elif top == "routes":
                self.route_tables = dict(table)
            elif top == "providers":
                for name, entry in table.items():
                    path = f"providers.{name}"
                    if not isinstance(entry, dict):
                        self.problem(path, "must be a table", entry)
                        continue
                    if "prices" in entry:
                        entry = dict(entry)
                        self.price_tables[name] = entry.pop("prices")
                    self.prov[name] = self.keys_of(path, entry, _PROVIDER_KINDS_OF)
            else:
                table = dict(table)
                for (section, key), kinds in _SUB_KINDS.items():
                    if section != top or key not in table:
                        continue
                    subtable = table.pop(key)
                    if isinstance(subtable, dict):
                        self.sub[section, key] = self.keys_of(f"{top}.{key}", subtable, kinds)
                    else:
                        self.problem(f"{top}.{key}", "must be a table", subtable)
                self.raw[top] = self.keys_of(top, table, _FIELD_KINDS[top])

    def keys_of(self, path: str, table: dict[str, Any], known: dict[str, str]) -> _Raw:
        out: _Raw = {}
        for key, value in table.items():
            if key in known:
                out[key] = (value, None)
            else:
                self.problem(f"{path}.{key}", f"unknown key{_suggest(key, known)}")
        return out

    def read_environ(self) -> None:
        for var, text in sorted(self.env.items()):
            if not var.startswith("RELAY_") or var == "RELAY_CONFIG":
                continue
            rest = var[len("RELAY_"):].upper()
            if rest.startswith("PROVIDERS_"):
                self.provider_override(var, rest[len("PROVIDERS_"):], text)
                continue
            for section in SECTIONS:
                if rest.startswith(section.upper() + "_"):
                    key = rest[len(section) + 1:].lower()
                    sub = next((k for k in _SUB_KINDS if k[0] == section and key.startswith(k[1] + "_")), None)
                    if sub is not None:   # RELAY_STORAGE_S3_ENDPOINT_URL → [storage.s3] endpoint_url
                        subkey = key[len(sub[1]) + 1:]
                        if subkey in _SUB_KINDS[sub]:
                            self.sub[sub][subkey] = (text, var)
                        else:
                            self.problem(f"{section}.{sub[1]}.{subkey}", f"unknown key (from {var})"
                                         f"{_suggest(subkey, _SUB_KINDS[sub])}")
                    elif key in _FIELD_KINDS[section]:
                        self.raw[section][key] = (text, var)
                    else:
                        self.problem(f"{section}.{key}", f"unknown key (from {var})"
                                     f"{_suggest(key, _FIELD_KINDS[section])}")
                    break
            # other RELAY_* variables (e.g. ones named by env:NAME references) are not ours to judge

    def provider_override(self, var: str, rest: str, text: str) -> None:
        guesses = [(k, rest[: -len(k) - 1]) for k in _PROVIDER_KINDS_OF if rest.endswith("_" + k.upper())]
        for key, env_name in guesses:
            for name in self.prov:
                if _env_name(name) == env_name:
                    self.prov[name][key] = (text, var)
                    return
        known = ", ".join(self.prov) or "none"
        if guesses:
            self.problem(f"providers.{guesses[0][1].lower()}", f"{var} overrides a provider that is not "
                         f"configured (configured: {known})")
        else:
            keys = ", ".join(k.upper() for k in _PROVIDER_KINDS_OF)
            self.problem("providers", f"{var} must be RELAY_PROVIDERS_<NAME>_<KEY> with KEY one of {keys}")

    # -- conversion ------------------------------------------------------------------------------
    def deref(self, path: str, text: str) -> Any:
        """Resolve an `env:NAME` reference; other strings pass through."""
        if not text.startswith("env:"):
            return text
        name = text[len("env:"):]
        if not _ENV_VAR_RE.match(name):
            self.problem(path, "env: must be followed by an environment variable name", text)
        elif name not in self.env:
            self.problem(path, f"environment variable {name} is not set", text)
        elif not self.env[name]:
            self.problem(path, f"environment variable {name} is empty", text)
        else:
            return self.env[name]
        return _BAD

    def convert(self, path: str, kind: str, value: Any, origin: str | None, secret: bool) -> Any:
        via = f" (from {origin})" if origin else ""
        if isinstance(value, str):
            textual = origin is not None or value.startswith("env:")
            if kind == "floats" and textual:   # a comma list: RELAY_DELIVERIES_SCHEDULE=0,5,300
                text = self.deref(path, value)
                if text is _BAD:
                    return _BAD
                numbers = []
                for item in (i.strip() for i in text.split(",") if i.strip()):
                    number = self.parse(path, "float", item, via, secret)
                    if number is _BAD:
                        return _BAD
                    numbers.append(number)
                return tuple(numbers)
            if kind == "strs" and textual:   # a comma list: RELAY_AUTH_API_KEYS=a,b or "env:KEYS"
                text = self.deref(path, value)
                if text is _BAD:
                    return _BAD
                return self.convert(path, kind, [i.strip() for i in text.split(",") if i.strip()], None, secret)
            value = self.deref(path, value)
            if value is _BAD:
                return _BAD
            if textual and kind not in ("str", "optstr"):
                return self.parse(path, kind, value, via, secret)
            if kind == "str":
                return value
            if kind == "optstr":
                return value or None
        elif isinstance(value, list) and kind == "strs":
            out = []
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    self.problem(f"{path}[{i}]", f"must be a string{via}", item, secret)
                    return _BAD
                item = self.deref(f"{path}[{i}]", item)
                if item is _BAD:
                    return _BAD
                out.append(item)
            return tuple(out)
        elif isinstance(value, list) and kind == "floats":
            numbers = []
            for i, item in enumerate(value):
                if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                    self.problem(f"{path}[{i}]", f"must be a finite number{via}", item, secret)
                    return _BAD
                numbers.append(float(item))
            return tuple(numbers)
        elif (kind == "bool" and isinstance(value, bool)) or (kind == "int" and type(value) is int):
            return value
        elif kind in ("float", "optfloat") and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            self.problem(path, f"must be a finite number{via}", value, secret)
            return _BAD
        self.problem(path, f"must be {_KIND_TEXT[kind]}{via}", value, secret)
        return _BAD

    def parse(self, path: str, kind: str, text: str, via: str, secret: bool) -> Any:
        word = text.strip().lower()
        try:
            if kind == "bool" and word in _TRUE + _FALSE:
                return word in _TRUE
            if kind == "int":
                return int(word)
            if kind == "optfloat" and not word:
                return None
            if kind in ("float", "optfloat") and math.isfinite(float(word)):
                return float(word)
        except ValueError:
            pass
        self.problem(path, f"must be {_KIND_TEXT[kind]}{via}", text, secret)
        return _BAD

    def values(self, path: str, raw: _Raw, kinds: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, (value, origin) in raw.items():
            converted = self.convert(f"{path}.{key}", kinds[key], value, origin, key in SECRET_KEYS)
            if converted is not _BAD:
                out[key] = converted
        return out

    def build(self, section: str, cls: type) -> Any:
        values = self.values(section, self.raw[section], _FIELD_KINDS[section])
        for key, sub in _SUBTABLES.get(cls, {}).items():
            values[key] = sub(**self.values(f"{section}.{key}", self.sub[section, key], _SUB_KINDS[section, key]))
        return cls(**values)

    # -- validation ------------------------------------------------------------------------------
    def http_url(self, path: str, url: str) -> str:
        """Check an http(s) URL with a host; return it without a trailing slash."""
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:   # .port raises on a port that is not a number below 65536
            ok = False
        if not ok:
            self.problem(path, "must be an http:// or https:// URL with a host", url)
        elif parts.query or parts.fragment:
            self.problem(path, "must not have a query or fragment", url)
        return url.rstrip("/")

    def check_server(self, s: ServerSettings) -> ServerSettings:
        if not s.host:
            self.problem("server.host", "must not be empty", s.host)
        if not 1 <= s.port <= 65535:
            self.problem("server.port", "must be between 1 and 65535", s.port)
        if s.role not in ROLES:
            self.problem("server.role", f"must be one of {', '.join(ROLES)}", s.role)
        for i, peer in enumerate(s.forwarded_allow_ips):
            if peer != "*" and not _is_network(peer):
                self.problem(f"server.forwarded_allow_ips[{i}]", 'must be an IP address, a CIDR or "*"', peer)
        if (s.ssl_certfile is None) != (s.ssl_keyfile is None):
            self.problem("server.ssl_keyfile", "ssl_certfile and ssl_keyfile must be set together",
                         (s.ssl_certfile, s.ssl_keyfile))
        # "~/tls/cert.pem" for every reader (uvicorn, the CLI's own check of relay's certificate).
        s = replace(s, ssl_certfile=s.ssl_certfile and os.path.expanduser(s.ssl_certfile),
                    ssl_keyfile=s.ssl_keyfile and os.path.expanduser(s.ssl_keyfile))
        if s.public_url:
            public_url = self.http_url("server.public_url", s.public_url)
        else:
            host = f"[{s.host}]" if ":" in s.host else s.host
            public_url = f"http://{host}:{s.port}"
        return replace(s, public_url=public_url)

    def check_auth(self, a: AuthSettings, server: ServerSettings) -> None:
        for i, key in enumerate(a.api_keys):
            if len(key) < 16 or any(c.isspace() for c in key):
                self.problem(f"auth.api_keys[{i}]", "must be at least 16 characters without spaces",
                             _Text(f"{len(key)} characters"))
            elif key == EXAMPLE_API_KEY and not is_loopback_host(server.host):
                self.problem(f"auth.api_keys[{i}]", f"is the example key published in config.example.toml and the "
                             f"README, and relay listens on {server.host}: anyone could use it. Set a key of your "
                             "own (or none: relay then generates one in storage.data_dir/api-key)",
                             _Text("the example key"))
        if a.signing_secret and len(a.signing_secret) < 32:
            self.problem("auth.signing_secret", "must be at least 32 characters",
                         _Text(f"{len(a.signing_secret)} characters"))

    def check_storage(self, s: StorageSettings) -> StorageSettings:
        if not s.data_dir:
            self.problem("storage.data_dir", "must not be empty", s.data_dir)
        # "~/relay-data" is the home directory's for every file relay keeps (the database's path was expanded
        # where its secrets and images were not: two folders, neither whole).
        s = replace(s, data_dir=os.path.expanduser(s.data_dir), images_dir=os.path.expanduser(s.images_dir))
        base = s.data_dir if s.data_dir.endswith("/") else s.data_dir + "/"
        database = s.database or f"sqlite:///{base}relay.db"
        scheme, sep, rest = database.partition("://")
        ok = bool(sep and rest) and (
            (scheme == "sqlite" and rest.startswith("/") and rest.strip("/") != "")
            or scheme in ("postgresql", "postgres"))
        if not ok:
            self.problem("storage.database", "must be sqlite:///path or a postgresql:// URL", mask_url(database))
        if s.sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            self.problem("storage.sqlite_synchronous", f"must be one of {', '.join(SQLITE_SYNCHRONOUS)}",
                         s.sqlite_synchronous)
        return self.check_images(replace(s, database=database, images_dir=s.images_dir or f"{base}images"))

    def check_images(self, s: StorageSettings) -> StorageSettings:
        """storage.images_url and [storage.s3]; an s3 key left "" takes the standard AWS variable."""
        given = sorted(k for k, (value, _) in self.sub["storage", "s3"].items() if value != "")
        if not s.images_url:
            if given:
                self.problem("storage.s3", f"{', '.join(given)} set, but storage.images_url is not an s3:// URL, so "
                             'images would stay in storage.images_dir; set storage.images_url = "s3://BUCKET/PREFIX"')
            return s
        try:
            bucket, prefix = s3_url_parts(s.images_url)
            s = replace(s, images_url=f"s3://{bucket}/{prefix}".rstrip("/"))
        except ValueError as exc:
            self.problem("storage.images_url", f"{exc} (leave it empty to keep images in storage.images_dir)",
                         s.images_url)
        c, env = s.s3, self.env
        endpoint, endpoint_from = c.endpoint_url, "storage.s3.endpoint_url"
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if not endpoint and env.get(var):
                endpoint, endpoint_from = env[var], f"{endpoint_from} (from {var})"
        if endpoint:
            endpoint = self.http_url(endpoint_from, endpoint)
            if urlsplit(endpoint).path not in ("", "/"):
                self.problem(endpoint_from, "must be the service's URL without a path (the bucket goes in "
                             "storage.images_url)", endpoint)
        region = c.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        if not _REGION_RE.match(region):
            self.problem("storage.s3.region", "must be a region name such as us-east-1 (R2: auto)", region)
        key_id, secret = c.access_key_id, c.secret_access_key
        names = ("storage.s3.access_key_id", "storage.s3.secret_access_key")
        if not key_id and not secret:
            key_id, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
            names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        if bool(key_id) != bool(secret):
            missing, present = (names[1], names[0]) if key_id else names
            self.problem(missing, f"is required with {present} (credentials are a pair)")
        return replace(s, s3=S3Settings(endpoint_url=endpoint, region=region, access_key_id=key_id,
                                        secret_access_key=secret))

    def check_numbers(self, sections: dict[str, Any]) -> None:
        for section, keys in _POSITIVE.items():
            for key in keys:
                value = getattr(sections[section], key)
                if value <= 0:
                    self.problem(f"{section}.{key}", "must be greater than 0", value)
        w, p = sections["worker"], sections["polling"]
        if 0 < w.retry_cap < w.retry_base:
            self.problem("worker.retry_cap", f"must be at least worker.retry_base ({w.retry_base})", w.retry_cap)
        if 0 < p.max_delay < p.initial_delay:
            self.problem("polling.max_delay", f"must be at least polling.initial_delay ({p.initial_delay})",
                         p.max_delay)
        if p.backoff < 1:
            self.problem("polling.backoff", "must be at least 1", p.backoff)
        if not 0 <= p.jitter < 1:
            self.problem("polling.jitter", "must be at least 0 and below 1", p.jitter)

    def check_deliveries(self, d: DeliverySettings) -> None:
        if not 1 <= len(d.schedule) <= 50:
            self.problem("deliveries.schedule", "must list 1 to 50 delays (seconds before each attempt)",
                         list(d.schedule))
        elif any(delay < 0 for delay in d.schedule):
            self.problem("deliveries.schedule", "delays must not be negative", list(d.schedule))
        if not 0 <= d.jitter < 1:
            self.problem("deliveries.jitter", "must be at least 0 and below 1", d.jitter)
        if d.encryption_key and len(d.encryption_key) < 32:
            self.problem("deliveries.encryption_key", "must be at least 32 characters",
                         _Text(f"{len(d.encryption_key)} characters"))
        for i, key in enumerate(d.previous_encryption_keys):
            if not key:
                self.problem(f"deliveries.previous_encryption_keys[{i}]", "must not be empty")
        if d.task_webhook_secret:
            from relay.signing import SignatureError, secret_bytes
            try:
                secret_bytes(d.task_webhook_secret)
            except SignatureError as exc:
                self.problem("deliveries.task_webhook_secret", f"{exc} (whsec_ followed by base64)",
                             _Text(f"{len(d.task_webhook_secret)} characters"))

    def check_retention(self, r: RetentionSettings) -> None:
        for key in ("finished_tasks", "events", "delivery_attempts", "images", "interval"):
            if getattr(r, key) < 0:
                self.problem(f"retention.{key}", "must not be negative (0: keep forever / no housekeeping job)",
                             getattr(r, key))
        # A finished task takes its Idempotency-Keys with it: deleted sooner, a client's retry within the
        # window would create (and bill) a second task.
        if 0 < r.finished_tasks < IDEMPOTENCY_WINDOW:
            self.problem("retention.finished_tasks", f"must be 0 or at least {IDEMPOTENCY_WINDOW:g} seconds "
                         "(the Idempotency-Key window)", r.finished_tasks)

    def check_dashboard(self, d: DashboardSettings) -> None:
        if d.password and len(d.password) < 12:
            self.problem("dashboard.password", "must be at least 12 characters (or empty: API keys only)",
                         _Text(f"{len(d.password)} characters"))

    def check_allow(self, n: NetworkSettings) -> None:
        for i, entry in enumerate(n.allow):
            if not (_is_network(entry) or _is_hostname(entry)):
                self.problem(f"network.allow[{i}]", "must be a CIDR (10.0.0.0/8), an IP address or a hostname",
                             entry)

    def embedded_exemption(self, n: NetworkSettings, server: ServerSettings, source: str | None) -> NetworkSettings:
        """The embedded profile exempts the loopback from the SSRF guard so relay can reach the local simulator.
        Served beyond this machine (RELAY_SERVER_HOST=0.0.0.0, as the Docker image does) that would let any API
        client make relay call its host's or pod's loopback (a sidecar's admin port, relay itself), and read the
        answers back from its deliveries. So the profile's exemption holds only while relay listens on the
        loopback; a config file or RELAY_NETWORK_ALLOW states one explicitly, wherever relay listens."""
        if source is not None or self.raw["network"].get("allow", (None, None))[1] is not None or \
                is_loopback_host(server.host):
            return n
        return replace(n, allow=())

    def build_providers(self) -> dict[str, ProviderSettings]:
        out: dict[str, ProviderSettings] = {}
        if not self.prov:
            self.problem("providers", "at least one [providers.NAME] table is required")
        for name, raw in self.prov.items():
            path = f"providers.{name}"
            before = len(self.problems)
            if not _NAME_RE.match(name):
                self.problem(path, "name must be 1-32 of a-z 0-9 _ - starting with a letter or digit", name)
            values = self.values(path, raw, _PROVIDER_KINDS_OF)
            kinds = ", ".join(PROVIDER_KINDS)
            if "kind" not in raw:
                if name in PROVIDER_KINDS:
                    values["kind"] = name
                else:
                    self.problem(f"{path}.kind", f"is required unless the name is a kind (one of {kinds})")
            elif "kind" in values and values["kind"] not in PROVIDER_KINDS:
                self.problem(f"{path}.kind", f"must be one of {kinds}", values["kind"])
            if "base_url" in values:
                values["base_url"] = self.http_url(f"{path}.base_url", values["base_url"])
            elif "base_url" not in raw:
                self.problem(f"{path}.base_url", "is required (an http:// or https:// URL)")
            if "api_key" not in raw:
                self.problem(f"{path}.api_key", "is required (write env:NAME to read it from the environment)")
            elif values.get("api_key") == "":
                self.problem(f"{path}.api_key", "must not be empty")
            for key in ("timeout", "rate_limit", "max_in_flight", "poll_initial_delay"):
                value = values.get(key)
                if value is not None and value <= 0:
                    self.problem(f"{path}.{key}", "must be greater than 0", value)
            if len(self.problems) == before:
                out[name] = ProviderSettings(name=name, **values)
        return out

    def build_routes(self, providers: dict[str, ProviderSettings]) -> dict[str, RouteSettings]:
        out: dict[str, RouteSettings] = {}
        for name, raw in self.route_tables.items():
            path = f"routes.{name}"
            if not isinstance(raw, dict):
                self.problem(path, "must be a table", raw)
                continue
            before = len(self.problems)
            if not _NAME_RE.match(name):
                self.problem(path, "name must be 1-32 of a-z 0-9 _ - starting with a letter or digit", name)
            if name in self.prov:
                self.problem(path, "a route must not have the name of a provider")
            for key in sorted(set(raw) - {"providers", "strategy"}):
                self.problem(f"{path}.{key}", f"unknown key{_suggest(key, ('providers', 'strategy'))}")
            names = raw.get("providers")
            if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
                    or len(set(names)) != len(names)):
                self.problem(f"{path}.providers", "must be a non-empty list of distinct provider names", names)
            else:
                for item in names:
                    if item not in self.prov:
                        self.problem(f"{path}.providers", f"{item!r} is not a configured provider"
                                     f"{_suggest(item, self.prov)}")
            strategy = raw.get("strategy", "ordered")
            if strategy not in STRATEGIES:
                self.problem(f"{path}.strategy", f"must be one of {', '.join(STRATEGIES)}", strategy)
            if len(self.problems) == before:
                out[name] = RouteSettings(name=name, providers=tuple(names or ()), strategy=strategy)
        return out

    def build_prices(self, path: str, raw: Any) -> PriceTable | None:
        """`[providers.NAME.prices]`: currency, default, a number per quality or a table per quality of sizes."""
        if not isinstance(raw, dict):
            self.problem(path, "must be a table", raw)
            return None
        before = len(self.problems)
        flat: dict[str, Any] = {"by_quality": {}, "by_quality_size": {}}

        def price(key: str, value: Any) -> float | None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                self.problem(f"{path}.{key}", "must be a price: a number, 0 or more", value)
                return None
            return float(value)
        for key, value in raw.items():
            if key == "currency":
                if not isinstance(value, str) or not 1 <= len(value) <= 16:
                    self.problem(f"{path}.currency", "must be a currency code like USD", value)
                else:
                    flat["currency"] = value
            elif key == "only_successful":
                if not isinstance(value, bool):
                    self.problem(f"{path}.{key}", "must be true or false", value)
                else:
                    flat[key] = value
            elif key in ("default", "credit_price", "input_token_price", "output_token_price"):
                flat[key] = price(key, value)
            elif key in QUALITY_KEYS and isinstance(value, dict):
                for size, each in value.items():
                    if size not in SIZE_KEYS:
                        self.problem(f"{path}.{key}.{size}", f"must be a size: one of {', '.join(SIZE_KEYS)}")
                    elif (number := price(f"{key}.{size}", each)) is not None:
                        flat["by_quality_size"][key, size] = number
            elif key in QUALITY_KEYS:
                if (number := price(key, value)) is not None:
                    flat["by_quality"][key] = number
            else:
                known = ("currency", "default", "only_successful", "credit_price", "input_token_price",
                         "output_token_price", *QUALITY_KEYS)
                self.problem(f"{path}.{key}", f"unknown key{_suggest(key, known)}")
        return PriceTable(**flat) if len(self.problems) == before else None


def s3_url_parts(url: str) -> tuple[str, str]:
    """`s3://BUCKET/PREFIX` → (bucket, prefix without slashes at either end); ValueError saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    if scheme != "s3" or not sep:
        raise ValueError("must be s3://BUCKET or s3://BUCKET/PREFIX")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise ValueError("must name the bucket only: credentials and the endpoint go in [storage.s3]")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError("the bucket name must be 3-63 of a-z 0-9 . - starting and ending with a letter or digit")
    prefix = prefix.strip("/")
    if prefix and (any(part in ("", ".", "..") for part in prefix.split("/"))
                   or any(ch in prefix for ch in "?#\\") or not prefix.isprintable()):
        raise ValueError("the prefix must be path segments without empty, . or .. parts, ?, # or \\")
    return bucket, prefix


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def _is_hostname(entry: str) -> bool:
    labels = entry.removesuffix(".").split(".")
    return (len(entry) <= 253 and all(_LABEL_RE.match(label) for label in labels)
            and not labels[-1].isdigit())


def database_path(settings: Settings | str) -> Path | None:
    """The file of a sqlite database URL (`sqlite:///rel/x.db` → rel/x.db, `sqlite:////abs/x.db` → /abs/x.db).

    None for non-sqlite URLs and for `sqlite:///:memory:`. Relative paths are relative to the working directory.
    """
    url = settings if isinstance(settings, str) else settings.storage.database
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///"):].partition("?")[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)
