"""Settings: defaults, the example file, environment overrides, env: secrets, validation, redaction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from relay.config import (
    PROVIDER_KINDS,
    SECTIONS,
    ConfigError,
    ProviderSettings,
    Settings,
    database_path,
    load_settings,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SECRET = "s3cr3t-provider-key-do-not-print"
MINIMAL = """
[providers.evolink]
base_url = "https://api.evolink.ai/"
api_key = "env:EVO_KEY"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def problems(path: Path | None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={} if environ is None else environ)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_embedded_defaults_are_the_simulator_profile() -> None:
    """No file and no RELAY_CONFIG: five simulator providers, loopback allowed, http callbacks allowed."""
    s = load_settings(environ={})
    assert s.source is None
    assert list(s.providers) == list(PROVIDER_KINDS)
    for kind, p in s.providers.items():
        assert (p.name, p.kind, p.base_url, p.api_key) == (kind, kind, f"http://127.0.0.1:8700/{kind}", "sim")
        assert p.poll_initial_delay is None and p.model is None
    assert s.network.allow == ("127.0.0.0/8", "::1/128", "localhost")
    assert s.server.allow_http_callbacks is True
    assert s.server.public_url == "http://127.0.0.1:8080"
    assert s.storage.database == "sqlite:///./relay-data/relay.db"
    assert s.storage.images_dir == "./relay-data/images"
    assert s.auth.api_keys == () and s.auth.signing_secret == ""
    assert s.worker.concurrency == 32 and s.polling.task_timeout == 1800.0


def test_example_file_loads_clean() -> None:
    """config.example.toml loads with no problems and matches the simulator."""
    s = load_settings(EXAMPLE, environ={})
    assert s.source == str(EXAMPLE)
    assert list(s.providers) == list(PROVIDER_KINDS)
    assert s.provider("evolink").base_url == "http://127.0.0.1:8700/evolink"
    assert s.server.port == 8080 and s.server.allow_http_callbacks is True
    assert s.auth.api_keys == ("rk_example_0123456789abcdef",)
    assert s.network.allow == ("127.0.0.0/8", "::1/128", "localhost")


def test_example_file_documents_every_key() -> None:
    """Every setting's name appears in config.example.toml as `key =`."""
    text = EXAMPLE.read_text()
    tables = [getattr(Settings(), s) for s in SECTIONS]
    tables += [getattr(t, f.name) for t in tables for f in dataclasses.fields(t)
               if dataclasses.is_dataclass(getattr(t, f.name))]     # [storage.s3] …
    names = {f.name for t in tables for f in dataclasses.fields(t) if not dataclasses.is_dataclass(getattr(t, f.name))}
    names |= {f.name for f in dataclasses.fields(ProviderSettings)} - {"name"}
    missing = [n for n in sorted(names) if f"{n} =" not in text]
    assert missing == []


def test_relay_config_names_the_file(tmp_path: Path) -> None:
    """RELAY_CONFIG is used when no path is given; a file's providers replace the simulator profile."""
    path = write(tmp_path, MINIMAL)
    s = load_settings(environ={"RELAY_CONFIG": str(path), "EVO_KEY": SECRET})
    assert s.source == str(path)
    assert list(s.providers) == ["evolink"]
    p = s.provider("evolink")
    assert (p.kind, p.base_url, p.api_key) == ("evolink", "https://api.evolink.ai", SECRET)
    assert s.network.allow == () and s.server.allow_http_callbacks is False


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A path that does not exist is reported, not silently replaced by defaults."""
    [problem] = problems(tmp_path / "nope.toml")
    assert "file not found" in problem and "nope.toml" in problem
    [problem] = problems(None, {"RELAY_CONFIG": str(tmp_path / "gone.toml")})
    assert "gone.toml" in problem


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    """A syntax error names the file."""
    [problem] = problems(write(tmp_path, "[server\nport = 1"))
    assert "not valid TOML" in problem


def test_env_overrides_convert_by_type(tmp_path: Path) -> None:
    """RELAY_<SECTION>_<KEY> wins over the file and is converted to the field's type."""
    path = write(tmp_path, MINIMAL + "[server]\nport = 8081\n")
    s = load_settings(path, environ={
        "EVO_KEY": SECRET,
        "RELAY_SERVER_PORT": "9000",
        "RELAY_SERVER_ALLOW_HTTP_CALLBACKS": "yes",
        "RELAY_SERVER_PUBLIC_URL": "https://relay.example.com/base/",
        "RELAY_SERVER_SSL_CERTFILE": "",
        "RELAY_WORKER_LEASE_SECONDS": "12.5",
        "RELAY_CALLBACKS_TRUST_BODY": "0",
        "RELAY_STORAGE_DATA_DIR": "/var/lib/relay",
        "RELAY_AUTH_API_KEYS": "aaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbb,",
        "RELAY_NETWORK_ALLOW": "10.0.0.0/8,minio.internal",
        "RELAY_SIGNING_SECRET": "not ours: unknown RELAY_* sections are ignored",
    })
    assert s.server.port == 9000
    assert s.server.allow_http_callbacks is True
    assert s.server.public_url == "https://relay.example.com/base"
    assert s.server.ssl_certfile is None
    assert s.worker.lease_seconds == 12.5
    assert s.callbacks.trust_body is False
    assert s.auth.api_keys == ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb")
    assert s.network.allow == ("10.0.0.0/8", "minio.internal")
    assert s.storage.database == "sqlite:////var/lib/relay/relay.db"
    assert s.storage.images_dir == "/var/lib/relay/images"
    assert database_path(s) == Path("/var/lib/relay/relay.db")


def test_env_overrides_provider_keys(tmp_path: Path) -> None:
    """RELAY_PROVIDERS_<NAME>_<KEY> overrides one key of a configured provider; '-' is written '_'."""
    path = write(tmp_path, MINIMAL + '[providers.apimart-2]\nkind = "apimart"\nbase_url = "https://a.example"\n'
                                     'api_key = "plain-key"\n')
    s = load_settings(path, environ={
        "EVO_KEY": "unused",
        "OTHER": SECRET,
        "RELAY_PROVIDERS_EVOLINK_API_KEY": "env:OTHER",
        "RELAY_PROVIDERS_EVOLINK_POLL_INITIAL_DELAY": "0.5",
        "RELAY_PROVIDERS_APIMART_2_RATE_LIMIT": "3",
        "RELAY_PROVIDERS_APIMART_2_MODEL": "gpt-image-1.5",
    })
    assert s.provider("evolink").api_key == SECRET
    assert s.provider("evolink").poll_initial_delay == 0.5
    assert s.provider("apimart-2").rate_limit == 3.0
    assert s.provider("apimart-2").model == "gpt-image-1.5"
    assert list(s.providers) == ["evolink", "apimart-2"]


def test_env_overrides_apply_to_embedded_defaults() -> None:
    """Without a file, env variables still override the simulator profile."""
    s = load_settings(environ={"RELAY_PROVIDERS_OPENAI_BASE_URL": "http://127.0.0.1:9999/openai",
                               "RELAY_SERVER_HOST": "::1"})
    assert s.provider("openai").base_url == "http://127.0.0.1:9999/openai"
    assert s.server.public_url == "http://[::1]:8080"


def test_bad_env_values_name_the_variable() -> None:
    """Unparseable overrides, unknown keys and unknown providers are all reported together."""
    found = problems(None, {
        "RELAY_SERVER_PORT": "eighty",
        "RELAY_SERVER_ALLOW_HTTP_CALLBACKS": "maybe",
        "RELAY_POLLING_JITTER": "nan",
        "RELAY_SERVER_PROT": "1",
        "RELAY_PROVIDERS_NOPE_API_KEY": "x",
        "RELAY_PROVIDERS_OPENAI_COLOUR": "x",
    })
    assert "server.port: must be an integer (from RELAY_SERVER_PORT) (got 'eighty')" in found
    assert "server.allow_http_callbacks: must be true or false (from RELAY_SERVER_ALLOW_HTTP_CALLBACKS) " \
           "(got 'maybe')" in found
    assert "polling.jitter: must be a number (from RELAY_POLLING_JITTER) (got 'nan')" in found
    assert "server.prot: unknown key (from RELAY_SERVER_PROT); did you mean port?" in found
    assert any(p.startswith("providers.nope: RELAY_PROVIDERS_NOPE_API_KEY") for p in found)
    assert any(p.startswith("providers: RELAY_PROVIDERS_OPENAI_COLOUR must be") for p in found)
    assert len(found) == 6


def test_env_secret_present_and_missing(tmp_path: Path) -> None:
    """env:NAME reads the variable; a missing or empty one names both the key and the variable."""
    auth = '[auth]\nsigning_secret = "env:SIGN"\napi_keys = ["env:K1", "rk_plain_0123456789"]\n'
    path = write(tmp_path, MINIMAL + auth)
    s = load_settings(path, environ={"EVO_KEY": SECRET, "SIGN": "x" * 40, "K1": "k" * 20})
    assert s.auth.signing_secret == "x" * 40
    assert s.auth.api_keys == ("k" * 20, "rk_plain_0123456789")
    found = problems(path, {"SIGN": ""})
    assert found == [
        "auth.signing_secret: environment variable SIGN is empty (got 'env:SIGN')",
        "auth.api_keys[0]: environment variable K1 is not set (got 'env:K1')",
        "providers.evolink.api_key: environment variable EVO_KEY is not set (got 'env:EVO_KEY')",
    ]


def test_env_reference_works_for_any_string_value(tmp_path: Path) -> None:
    """A number may come from env:NAME too; it is parsed like an override."""
    path = write(tmp_path, MINIMAL + '[server]\nport = "env:PORT"\n')
    assert load_settings(path, environ={"EVO_KEY": SECRET, "PORT": "7000"}).server.port == 7000


def test_every_problem_is_listed_together(tmp_path: Path) -> None:
    """One ConfigError carries every problem, one `key.path: what (got X)` line each."""
    path = write(tmp_path, """
[server]
port = 70000
role = "everything"
public_url = "ftp://relay.example"
ssl_certfile = "cert.pem"
max_body_bytes = "big"
[auth]
api_keys = ["short"]
signing_secret = "too-short"
[storage]
database = "mysql://db/relay"
[worker]
concurrency = 0
retry_base = 10.0
retry_cap = 5.0
[polling]
backoff = 0.5
jitter = 1.5
[network]
allow = ["10.0.0.0/33", "bad host", "localhost"]
[providers.mystery]
base_url = "not a url"
api_key = "k"
[providers."Bad Name"]
kind = "dalle"
base_url = "https://x.example"
[providers.openai]
base_url = "https://api.openai.com"
api_key = ""
timeout = -1
""")
    found = problems(path)
    assert found == [
        "server.max_body_bytes: must be an integer (got 'big')",
        "server.port: must be between 1 and 65535 (got 70000)",
        "server.role: must be one of all, api, worker (got 'everything')",
        "server.ssl_keyfile: ssl_certfile and ssl_keyfile must be set together (got ('cert.pem', None))",
        "server.public_url: must be an http:// or https:// URL with a host (got 'ftp://relay.example')",
        "auth.api_keys[0]: must be at least 16 characters without spaces (got 5 characters)",
        "auth.signing_secret: must be at least 32 characters (got 9 characters)",
        "storage.database: must be sqlite:///path or a postgresql:// URL (got 'mysql://db/relay')",
        "worker.concurrency: must be greater than 0 (got 0)",
        "worker.retry_cap: must be at least worker.retry_base (10.0) (got 5.0)",
        "polling.backoff: must be at least 1 (got 0.5)",
        "polling.jitter: must be at least 0 and below 1 (got 1.5)",
        "network.allow[0]: must be a CIDR (10.0.0.0/8), an IP address or a hostname (got '10.0.0.0/33')",
        "network.allow[1]: must be a CIDR (10.0.0.0/8), an IP address or a hostname (got 'bad host')",
        "providers.mystery.kind: is required unless the name is a kind (one of " + ", ".join(PROVIDER_KINDS) + ")",
        "providers.mystery.base_url: must be an http:// or https:// URL with a host (got 'not a url')",
        "providers.Bad Name: name must be 1-32 of a-z 0-9 _ - starting with a letter or digit (got 'Bad Name')",
        "providers.Bad Name.kind: must be one of gmicloud, apimart, evolink, pixazo, openai (got 'dalle')",
        "providers.Bad Name.api_key: is required (write env:NAME to read it from the environment)",
        "providers.openai.api_key: must not be empty",
        "providers.openai.timeout: must be greater than 0 (got -1.0)",
    ]


def test_at_least_one_provider(tmp_path: Path) -> None:
    """A file with no providers is refused (the simulator profile is only for no file at all)."""
    assert problems(write(tmp_path, "[server]\nport = 8080\n")) == [
        "providers: at least one [providers.NAME] table is required"]


def test_unknown_keys_suggest_the_nearest(tmp_path: Path) -> None:
    """Typos in the file are reported with difflib's nearest known key."""
    found = problems(write(tmp_path, MINIMAL + '[server]\nprot = 1\n[sever]\n[providers.evolink2]\nkind = "evolink"\n'
                                              'base_url = "https://e.example"\napi_key = "k"\napikey = "x"\n'),
                     {"EVO_KEY": SECRET})
    assert sorted(found) == [
        "providers.evolink2.apikey: unknown key; did you mean api_key?",
        "server.prot: unknown key; did you mean port?",
        "sever: unknown key; did you mean server?",
    ]


def test_database_urls(tmp_path: Path) -> None:
    """sqlite paths map to files (relative or absolute); postgres URLs are accepted and have no path."""
    assert database_path("sqlite:///relative/x.db") == Path("relative/x.db")
    assert database_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert database_path("sqlite:///:memory:") is None
    assert database_path("postgresql://u:p@h/db") is None
    path = write(tmp_path, MINIMAL + '[storage]\ndatabase = "postgres://relay:hunter2hunter2@db/relay"\n')
    s = load_settings(path, environ={"EVO_KEY": SECRET})
    assert s.storage.database == "postgres://relay:hunter2hunter2@db/relay"
    assert s.redacted()["storage"]["database"] == "postgres://relay:***@db/relay"
    assert "hunter2" not in repr(s)


def test_redacted_hides_secrets(tmp_path: Path) -> None:
    """redacted() is plain data with every secret shown as ***."""
    auth = f'[auth]\napi_keys = ["{SECRET}a", "{SECRET}b"]\nsigning_secret = "{SECRET * 2}"\n'
    path = write(tmp_path, MINIMAL + auth)
    data = load_settings(path, environ={"EVO_KEY": SECRET}).redacted()
    assert SECRET not in str(data)
    assert data["auth"] == {"api_keys": ["***", "***"], "signing_secret": "***"}
    assert data["providers"]["evolink"]["api_key"] == "***"
    assert data["providers"]["evolink"]["base_url"] == "https://api.evolink.ai"
    assert data["server"]["port"] == 8080 and data["source"] == str(path)


def test_redacted_masks_passwords_in_every_url(tmp_path: Path) -> None:
    """A password written into a URL's userinfo (a provider's base_url behind basic auth, the database, an S3
    endpoint, the public URL) is shown as *** by check-config, the user name kept."""
    environ = {"EVO_KEY": SECRET, "RELAY_PROVIDERS_EVOLINK_BASE_URL": f"https://relay:{SECRET}@api.evolink.ai",
               "RELAY_STORAGE_DATABASE": f"postgresql://relay:{SECRET}@db/relay",
               "RELAY_STORAGE_S3_ENDPOINT_URL": f"https://minio:{SECRET}@minio.internal:9000",
               "RELAY_STORAGE_IMAGES_URL": "s3://bucket/relay",
               "RELAY_SERVER_PUBLIC_URL": f"https://ops:{SECRET}@relay.example",
               "RELAY_AUTH_SIGNING_SECRET": SECRET * 2}
    data = load_settings(write(tmp_path, MINIMAL), environ=environ).redacted()
    assert SECRET not in str(data)
    assert data["providers"]["evolink"]["base_url"] == "https://relay:***@api.evolink.ai"
    assert data["storage"]["database"] == "postgresql://relay:***@db/relay"


def test_repr_contains_no_secret(tmp_path: Path) -> None:
    """Neither repr(settings) nor a problem line ever shows a secret."""
    path = write(tmp_path, MINIMAL + f'[auth]\napi_keys = ["{SECRET}"]\nsigning_secret = "{SECRET * 2}"\n')
    s = load_settings(path, environ={"EVO_KEY": SECRET})
    assert SECRET not in repr(s) and SECRET not in str(s)
    found = problems(write(tmp_path, MINIMAL + '[auth]\napi_keys = ["tiny-secret"]\nsigning_secret = 42\n'),
                     {"EVO_KEY": SECRET})
    assert "tiny-secret" not in "\n".join(found)
    assert "auth.signing_secret: must be a string (got ***)" in found


def test_provider_lookup_names_known_providers() -> None:
    """Settings.provider raises ValueError (not KeyError) listing the configured names."""
    s = load_settings(environ={})
    with pytest.raises(ValueError, match="unknown provider 'nope'; configured providers: gmicloud, apimart"):
        s.provider("nope")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "relay.internal"])
def test_the_embedded_loopback_exemption_holds_only_while_relay_listens_on_loopback(host: str) -> None:
    """Served beyond the machine with no config file (the Docker image: RELAY_SERVER_HOST=0.0.0.0), the embedded
    profile must not let API clients make relay call its own loopback (a pod's sidecar admin port, relay itself):
    the SSRF guard then refuses the loopback as it does for any config that does not exempt it."""
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert load_settings(environ={"RELAY_SERVER_HOST": loopback}).network.allow == \
            ("127.0.0.0/8", "::1/128", "localhost")
    assert load_settings(environ={"RELAY_SERVER_HOST": host}).network.allow == ()
    # Stated explicitly, by a variable or a file, it holds wherever relay listens.
    assert load_settings(environ={"RELAY_SERVER_HOST": host, "RELAY_NETWORK_ALLOW": "127.0.0.0/8"}).network.allow \
        == ("127.0.0.0/8",)
    example = load_settings(Path(__file__).parent.parent / "config.example.toml",
                            {"RELAY_SERVER_HOST": host, "RELAY_AUTH_API_KEYS": "rk_my_own_key_0123456789"})
    assert example.network.allow == ("127.0.0.0/8", "::1/128", "localhost")


def test_the_example_api_key_is_refused_off_the_loopback(tmp_path: Path) -> None:
    """config.example.toml's key is published (README too): fine on 127.0.0.1, refused where others can reach."""
    assert load_settings(EXAMPLE, environ={}).auth.api_keys == ("rk_example_0123456789abcdef",)
    found = problems(EXAMPLE, {"RELAY_SERVER_HOST": "0.0.0.0"})
    assert len(found) == 1 and found[0].startswith("auth.api_keys[0]: is the example key") and "0.0.0.0" in found[0]
    assert load_settings(EXAMPLE, environ={"RELAY_SERVER_HOST": "0.0.0.0",
                                           "RELAY_AUTH_API_KEYS": "rk_my_own_key_0123456789"}).auth.api_keys


def test_tls_files_that_cannot_be_read_stop_serve_not_the_client_commands(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file only relay's service user may read (dev-cert writes it 0600) is serve's concern: the settings
    load for a client command; check_startup (serve, check-config) names the file. A `~` path is expanded."""
    from relay.runtime import StartupError, check_startup
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    settings = load_settings(None, {"RELAY_SERVER_SSL_CERTFILE": str(cert),
                                    "RELAY_SERVER_SSL_KEYFILE": str(tmp_path / "no")})
    with pytest.raises(StartupError, match=r"server.ssl_keyfile .*/no' cannot be read"):
        check_startup(settings)
    monkeypatch.setenv("HOME", str(tmp_path))
    homed = load_settings(None, {"RELAY_SERVER_SSL_CERTFILE": "~/cert.pem", "RELAY_SERVER_SSL_KEYFILE": "~/cert.pem"})
    assert homed.server.ssl_certfile == homed.server.ssl_keyfile == str(cert)
    check_startup(homed)


def test_a_data_dir_under_home_is_one_folder_for_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`~/relay-data`: the database, the generated secrets and the images all under the home directory (the
    database's path was expanded where the rest was not: two folders, neither whole)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    s = load_settings(environ={"RELAY_STORAGE_DATA_DIR": "~/relay-data"})
    assert s.storage.data_dir == str(tmp_path / "relay-data")
    assert s.storage.images_dir == str(tmp_path / "relay-data" / "images")
    assert database_path(s.storage.database) == tmp_path / "relay-data" / "relay.db"


def test_a_password_in_the_database_urls_query_is_hidden_too() -> None:
    s = load_settings(environ={"RELAY_STORAGE_DATABASE": "postgresql://relay@db/relay?sslmode=require&password=hunter2",
                               "RELAY_AUTH_SIGNING_SECRET": "s" * 32})
    shown = s.redacted()["storage"]["database"]
    assert "hunter2" not in shown and "password=***" in shown and "sslmode=require" in shown
