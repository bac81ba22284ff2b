"""The S3-compatible image store against a real S3-protocol server (moto's, a child process; never a mock).

Store level: put / stat / open / exists / location, content addressing (a versioned bucket proves the
same bytes are uploaded once), and every way the bucket can fail (missing, wrong key, wrong secret,
server down) is a retryable ArchiveError(code="image_store_unavailable") that says what to fix.
End to end through the in-process harness with RELAY_STORAGE_IMAGES_URL=s3://…: tasks on every provider
dialect are archived into the bucket under their sha256, and GET/HEAD /v1/images/{id} (API key and signed
link, on a second relay that shares only the database and the bucket) serve them with the sha256 ETag.
A bucket that refuses relay's credentials, or a server that is down, keeps tasks archiving (never an
internal error) with /readyz naming the image store, and they are archived once it is back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.config import PROVIDER_KINDS, ConfigError, S3Settings, load_settings
from relay.errors import ArchiveError
from relay.images.s3 import S3ImageStore
from relay.images.store import LocalImageStore, image_key, open_image_store
from tests.harness import harness, wait_for
from tests.s3server import REGION, MotoS3

BUCKET = "relay-images"
VERSIONED = "relay-versioned"
SIGNING_SECRET = "test-signing-secret-shared-by-both-replicas"


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """One moto server for the module's tests, requiring the IAM key it made (wrong keys get a real 403)."""
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    try:
        server.provision(BUCKET, VERSIONED, auth=True)
        server.client().put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
        yield server
    finally:
        server.stop()


def new_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def store_for(moto: MotoS3, tmp_path: Path, *, bucket: str = BUCKET, prefix: str = "", key: str | None = None,
              secret: str | None = None) -> S3ImageStore:
    return S3ImageStore(bucket, prefix or new_prefix(), tmp_root=tmp_path / "tmp", endpoint_url=moto.endpoint,
                        region=REGION, access_key_id=moto.access_key_id if key is None else key,
                        secret_access_key=moto.secret_access_key if secret is None else secret)


def temp_file(store: S3ImageStore, data: bytes) -> tuple[Path, str]:
    path = store.tmp_dir() / f"dl-{uuid.uuid4().hex}.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def s3_env(moto: MotoS3, prefix: str, **extra: str) -> dict[str, str]:
    """What an operator writes: images_url and [storage.s3] as RELAY_* variables, the secret through env:NAME."""
    return {"RELAY_STORAGE_IMAGES_URL": f"s3://{BUCKET}/{prefix}", "RELAY_STORAGE_S3_ENDPOINT_URL": moto.endpoint,
            "RELAY_STORAGE_S3_REGION": REGION, "RELAY_STORAGE_S3_ACCESS_KEY_ID": moto.access_key_id,
            "RELAY_STORAGE_S3_SECRET_ACCESS_KEY": "env:TEST_S3_SECRET", "TEST_S3_SECRET": moto.secret_access_key,
            "RELAY_AUTH_SIGNING_SECRET": SIGNING_SECRET, **extra}


# ---- the store ----------------------------------------------------------------------------------------------
async def test_put_stat_open_exists_location(moto: MotoS3, tmp_path: Path) -> None:
    """put_file uploads the temp file as PREFIX/ab/cd/<sha256>.<ext> (typed, immutable) and consumes it."""
    store = store_for(moto, tmp_path, prefix="deep/er")
    data = os.urandom(300_000)          # more than one read chunk
    path, sha = temp_file(store, data)
    key = await store.put_file(path, sha, "PNG")
    assert key == image_key(sha, "png") == f"{sha[:2]}/{sha[2:4]}/{sha}.png"
    assert not path.exists()
    head = moto.client().head_object(Bucket=BUCKET, Key=f"deep/er/{key}")
    assert (head["ContentLength"], head["ContentType"]) == (len(data), "image/png")
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    got = moto.client().get_object(Bucket=BUCKET, Key=f"deep/er/{key}")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == sha

    assert await store.stat(key) == len(data) and await store.exists(key)
    body = await store.open(key)
    assert body is not None and body.size == len(data) and body.path is None
    assert b"".join([chunk async for chunk in body.chunks]) == data
    assert store.location(key) == f"s3://{BUCKET}/deep/er/{key}"

    absent = image_key("0" * 64, "png")
    assert await store.stat(absent) is None and not await store.exists(absent) and await store.open(absent) is None
    with pytest.raises(ValueError):
        await store.stat("../../etc/passwd")
    await store.check()


async def test_a_large_image_goes_up_in_parts_and_comes_back_whole(moto: MotoS3, tmp_path: Path) -> None:
    """Over 5 MiB the upload is multipart (streamed from the file); the object is still the exact bytes."""
    store = store_for(moto, tmp_path)
    data = os.urandom(6 * 1024 * 1024 + 123)
    path, sha = temp_file(store, data)
    key = await store.put_file(path, sha, "png")
    head = moto.client().head_object(Bucket=BUCKET, Key=f"{store.prefix}/{key}")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-2")   # S3's multipart ETag
    body = await store.open(key)
    assert body is not None
    assert hashlib.sha256(b"".join([chunk async for chunk in body.chunks])).hexdigest() == sha


async def test_the_same_bytes_are_uploaded_once(moto: MotoS3, tmp_path: Path) -> None:
    """Content addressing: a second put of the same bytes (a retried job, another task) uploads nothing."""
    store = store_for(moto, tmp_path, bucket=VERSIONED)
    data = os.urandom(5000)
    first, sha = temp_file(store, data)
    second, _ = temp_file(store, data)
    key = await store.put_file(first, sha, "webp")
    assert await store.put_file(second, sha, "webp") == key
    assert not first.exists() and not second.exists()
    versions = moto.client().list_object_versions(Bucket=VERSIONED, Prefix=f"{store.prefix}/")["Versions"]
    assert len(versions) == 1, versions     # every PUT to a versioned bucket makes a version: there was one


async def test_put_bytes_uploads_from_memory_once(moto: MotoS3, tmp_path: Path) -> None:
    """A body held in memory goes up as it is (typed, immutable), under the same key put_file would give it,
    with no temp file; the same bytes again, from memory or from a file, upload nothing."""
    store = store_for(moto, tmp_path, bucket=VERSIONED)
    data = os.urandom(70_000)
    sha = hashlib.sha256(data).hexdigest()
    key = await store.put_bytes(data, sha, "jpg")
    assert key == image_key(sha, "jpg") and list(store.tmp_dir().iterdir()) == []
    head = moto.client().head_object(Bucket=VERSIONED, Key=f"{store.prefix}/{key}")
    assert (head["ContentLength"], head["ContentType"]) == (len(data), "image/jpeg")
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    body = await store.open(key)
    assert body is not None and b"".join([chunk async for chunk in body.chunks]) == data
    assert await store.put_bytes(data, sha, "jpg") == key
    path, _ = temp_file(store, data)
    assert await store.put_file(path, sha, "jpg") == key and not path.exists()
    versions = moto.client().list_object_versions(Bucket=VERSIONED, Prefix=f"{store.prefix}/")["Versions"]
    assert len(versions) == 1, versions


async def test_a_missing_bucket_is_image_store_unavailable(moto: MotoS3, tmp_path: Path) -> None:
    """No such bucket: retryable image_store_unavailable naming the bucket and the fix; the temp file stays."""
    store = store_for(moto, tmp_path, bucket="no-such-bucket")
    path, sha = temp_file(store, b"bytes")
    for attempt in (lambda: store.put_file(path, sha, "png"), lambda: store.put_bytes(b"x", sha, "png"), store.check):
        with pytest.raises(ArchiveError) as raised:
            await attempt()
        assert raised.value.code == "image_store_unavailable"
        assert "bucket 'no-such-bucket' does not exist" in raised.value.message
        assert "storage.images_url" in raised.value.message
    assert path.exists()     # the archive job removes it (and downloads again on its retry)
    with pytest.raises(ArchiveError, match="does not exist"):
        await store.open(image_key(sha, "png"))


@pytest.mark.parametrize("wrong", ["key", "secret"])
async def test_wrong_credentials_are_image_store_unavailable(moto: MotoS3, tmp_path: Path, wrong: str) -> None:
    """A key the server does not know, or a wrong secret: 403, retryable, saying to check the credentials."""
    bad_secret = "wrong-secret-do-not-print-0123456789"
    store = (store_for(moto, tmp_path, key="AKIAWRONGWRONGWRONG0") if wrong == "key"
             else store_for(moto, tmp_path, secret=bad_secret))
    path, sha = temp_file(store, b"bytes")
    messages = []
    for attempt in (lambda: store.put_file(path, sha, "png"), lambda: store.put_bytes(b"x", sha, "png"),
                    lambda: store.stat(image_key(sha, "png")), store.check):
        with pytest.raises(ArchiveError) as raised:
            await attempt()
        assert raised.value.code == "image_store_unavailable"
        messages.append(raised.value.message)
        assert "refused relay's credentials (403 " in messages[-1] and "storage.s3.access_key_id" in messages[-1]
        assert bad_secret not in messages[-1] and moto.secret_access_key not in messages[-1]
    assert "(403 Forbidden)" in messages[2]     # a HEAD: no body to name the cause; the list request's does
    assert ("403 InvalidAccessKeyId" if wrong == "key" else "403 SignatureDoesNotMatch") in messages[3]


async def test_a_server_that_is_down_is_unavailable_then_works_when_back(tmp_path: Path) -> None:
    """Connection refused: retryable image_store_unavailable; the same store works once the server is back."""
    server = MotoS3(tmp_path / "moto-down").start()
    try:
        server.provision(BUCKET)
        store = S3ImageStore(BUCKET, "p", tmp_root=tmp_path / "tmp", endpoint_url=server.endpoint, region=REGION,
                             access_key_id="any", secret_access_key="any")
        server.kill()
        path, sha = temp_file(store, b"image bytes")
        for attempt in (lambda: store.put_file(path, sha, "png"), lambda: store.put_bytes(b"x", sha, "png"),
                        store.check):
            with pytest.raises(ArchiveError) as raised:
                await attempt()
            assert raised.value.code == "image_store_unavailable"
            assert "is unreachable (Connect, Connection refused)" in raised.value.message
        server.start()
        server.provision(BUCKET)
        key = await store.put_file(path, sha, "png")
        assert await store.stat(key) == len(b"image bytes")
    finally:
        server.stop()


# ---- configuration ------------------------------------------------------------------------------------------
def test_settings_choose_the_store(moto: MotoS3, tmp_path: Path) -> None:
    """images_url = s3://… builds an S3ImageStore from [storage.s3], temp files under the data dir."""
    settings = load_settings(None, {"RELAY_STORAGE_DATA_DIR": str(tmp_path), **s3_env(moto, "a/b")})
    store = open_image_store(settings.storage)
    assert isinstance(store, S3ImageStore)
    assert (store.bucket, store.prefix, store.endpoint_url) == (BUCKET, "a/b", moto.endpoint)
    assert store.tmp_dir() == tmp_path / "tmp"
    assert settings.storage.s3.secret_access_key == moto.secret_access_key
    assert settings.redacted()["storage"]["s3"]["secret_access_key"] == "***"


MINIMAL = '[providers.evolink]\nbase_url = "https://api.evolink.ai"\napi_key = "k"\n'


def config_problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "relay.toml"
    path.write_text(MINIMAL + text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ or {})
    return raised.value.problems


def test_local_directory_stays_the_default(tmp_path: Path) -> None:
    """No images_url: the local directory images_dir ({data_dir}/images, or as set), as before."""
    settings = load_settings(None, {"RELAY_STORAGE_DATA_DIR": str(tmp_path)})
    assert settings.storage.images_url == "" and settings.storage.s3 == S3Settings()
    store = open_image_store(settings.storage)
    assert isinstance(store, LocalImageStore) and store.root == tmp_path / "images"
    settings = load_settings(None, {"RELAY_STORAGE_IMAGES_DIR": str(tmp_path / "elsewhere")})
    assert open_image_store(settings.storage).location(image_key("a" * 64, "png")).startswith(
        str(tmp_path / "elsewhere" / "aa" / "aa"))


def test_storage_s3_table_env_secrets_and_redaction(tmp_path: Path) -> None:
    """[storage.s3] from the file, secrets through env:NAME, shown as *** by check-config and never in repr."""
    secret = "s3cr3t-access-key-do-not-print"
    path = tmp_path / "relay.toml"
    path.write_text(MINIMAL + '[storage]\nimages_url = "s3://my-bucket/relay/images/"\n[storage.s3]\n'
                    'endpoint_url = "http://minio.internal:9000/"\nregion = "auto"\n'
                    'access_key_id = "env:S3_ID"\nsecret_access_key = "env:S3_SECRET"\n')
    settings = load_settings(path, {"S3_ID": "AKIAEXAMPLE", "S3_SECRET": secret, "AWS_ACCESS_KEY_ID": "not-used"})
    storage = settings.storage
    assert storage.images_url == "s3://my-bucket/relay/images"
    assert storage.s3 == S3Settings(endpoint_url="http://minio.internal:9000", region="auto",
                                    access_key_id="AKIAEXAMPLE", secret_access_key=secret)
    shown = settings.redacted()["storage"]
    assert shown["s3"] == {"endpoint_url": "http://minio.internal:9000", "region": "auto",
                           "access_key_id": "***", "secret_access_key": "***"}
    assert secret not in str(settings.redacted()) and secret not in repr(settings)
    store = open_image_store(storage)
    assert isinstance(store, S3ImageStore) and (store.bucket, store.prefix) == ("my-bucket", "relay/images")


def test_absent_s3_keys_take_the_standard_aws_variables() -> None:
    """Keys left out come from AWS_ENDPOINT_URL(_S3), AWS_REGION/AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID/SECRET."""
    env = {"RELAY_STORAGE_IMAGES_URL": "s3://bucket", "AWS_ENDPOINT_URL": "https://general.example",
           "AWS_ENDPOINT_URL_S3": "https://s3.example", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "env-secret"}
    s3 = load_settings(None, env).storage.s3
    assert s3 == S3Settings(endpoint_url="https://s3.example", region="eu-west-1", access_key_id="AKIAENV",
                            secret_access_key="env-secret")
    mine = {**env, "RELAY_STORAGE_S3_REGION": "auto", "RELAY_STORAGE_S3_ACCESS_KEY_ID": "AKIAMINE",
            "RELAY_STORAGE_S3_SECRET_ACCESS_KEY": "mine"}
    s3 = load_settings(None, mine).storage.s3
    assert (s3.region, s3.access_key_id, s3.secret_access_key) == ("auto", "AKIAMINE", "mine")
    s3 = load_settings(None, {"RELAY_STORAGE_IMAGES_URL": "s3://bucket"}).storage.s3
    assert s3 == S3Settings(region="us-east-1")     # AWS itself, credentials from the client's own chain


def test_storage_s3_problems_name_the_key(tmp_path: Path) -> None:
    """Every mistake is reported together, naming the key (or the AWS variable) and what to write."""
    found = config_problems(tmp_path, '[storage]\nimages_url = "s3://bucket"\n[storage.s3]\n'
                                      'endpoint_url = "http://minio:9000/bucket"\nregion = "us east"\n'
                                      'access_key_id = "AKIA"\nendpont = "x"\n',
                            {"RELAY_STORAGE_S3_SECRET_KEY": "x"})
    assert found == [
        "storage.s3.endpont: unknown key; did you mean endpoint_url?",
        "storage.s3.secret_key: unknown key (from RELAY_STORAGE_S3_SECRET_KEY); did you mean secret_access_key?",
        "storage.s3.endpoint_url: must be the service's URL without a path (the bucket goes in storage.images_url) "
        "(got 'http://minio:9000/bucket')",
        "storage.s3.region: must be a region name such as us-east-1 (R2: auto) (got 'us east')",
        "storage.s3.secret_access_key: is required with storage.s3.access_key_id (credentials are a pair)",
    ]
    keep = " (leave it empty to keep images in storage.images_dir)"
    for url, what in [("gs://bucket/p", "must be s3://BUCKET or s3://BUCKET/PREFIX"),
                      ("s3://Bad_Bucket", "the bucket name must be 3-63 of a-z 0-9 . - starting and ending with a "
                                          "letter or digit"),
                      ("s3://id:secret@bucket", "must name the bucket only: credentials and the endpoint go in "
                                                "[storage.s3]"),
                      ("s3://bucket/a/../b", "the prefix must be path segments without empty, . or .. parts, ?, # "
                                             "or \\")]:
        assert config_problems(tmp_path, f'[storage]\nimages_url = "{url}"\n') == [
            f"storage.images_url: {what}{keep} (got {url!r})"]
    assert config_problems(tmp_path, '[storage.s3]\nregion = "auto"\n') == [
        'storage.s3: region set, but storage.images_url is not an s3:// URL, so images would stay in '
        'storage.images_dir; set storage.images_url = "s3://BUCKET/PREFIX"']
    assert config_problems(tmp_path, '[storage]\ns3 = "x"\n') == ["storage.s3: must be a table (got 'x')"]
    assert config_problems(tmp_path, '[storage]\nimages_url = "s3://bucket"\n[storage.s3]\n'
                                     'secret_access_key = "env:S3_SECRET"\n') == [
        "storage.s3.secret_access_key: environment variable S3_SECRET is not set (got 'env:S3_SECRET')"]
    assert config_problems(tmp_path, '[storage]\nimages_url = "s3://bucket"\n[storage.s3]\nsecret_access_key = 42\n'
                           ) == ["storage.s3.secret_access_key: must be a string (got ***)"]
    assert config_problems(tmp_path, '[storage]\nimages_url = "s3://bucket"\n', {"AWS_ACCESS_KEY_ID": "AKIA",
                                                                              "AWS_ENDPOINT_URL": "ftp://x"}) == [
        "storage.s3.endpoint_url (from AWS_ENDPOINT_URL): must be an http:// or https:// URL with a host "
        "(got 'ftp://x')",
        "AWS_SECRET_ACCESS_KEY: is required with AWS_ACCESS_KEY_ID (credentials are a pair)"]


# ---- end to end ---------------------------------------------------------------------------------------------
def image_objects(moto: MotoS3, prefix: str) -> dict[str, bytes]:
    listed = moto.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
    return {o["Key"]: moto.client().get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def local_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def without_key(api: httpx.AsyncClient, method: str, url: str) -> httpx.Response:
    """The request a subscriber makes with only the signed link: no Authorization header."""
    request = api.build_request(method, url)
    del request.headers["authorization"]
    return await api.send(request)


async def assert_served(api: httpx.AsyncClient, image: dict[str, Any]) -> None:
    """GET and HEAD by API key and by signed link: the bytes, the sha256 ETag, type, length, immutable."""
    etag = f'"{image["sha256"]}"'
    by_key = await api.get(f"/v1/images/{image['id']}")
    by_link = await without_key(api, "GET", image["url"])
    for response in (by_key, by_link):
        assert response.status_code == 200, response.text
        assert hashlib.sha256(response.content).hexdigest() == image["sha256"]
        assert response.headers["etag"] == etag
        assert response.headers["content-type"] == image["content_type"]
        assert response.headers["content-length"] == str(image["bytes"])
        assert "immutable" in response.headers["cache-control"]
    for head in (await api.head(f"/v1/images/{image['id']}"), await without_key(api, "HEAD", image["url"])):
        assert head.status_code == 200 and head.content == b""
        assert (head.headers["etag"], head.headers["content-length"]) == (etag, str(image["bytes"]))
        assert head.headers["content-type"] == image["content_type"]
    assert (await without_key(api, "GET", f"/v1/images/{image['id']}")).status_code == 401   # no key, no link
    cached = await api.get(f"/v1/images/{image['id']}", headers={"if-none-match": etag})
    assert cached.status_code == 304 and cached.headers["etag"] == etag


async def test_tasks_on_every_provider_are_archived_in_the_bucket_and_served_by_every_replica(
        moto: MotoS3, tmp_path: Path) -> None:
    """Each image is an object PREFIX/ab/cd/<sha256>.<ext> with those bytes; both relays serve it."""
    prefix = new_prefix()
    env = s3_env(moto, prefix)
    async with harness(tmp_path / "a", **env) as h:
        created = [await h.create(provider=kind, prompt=f"a lighthouse for {kind}") for kind in PROVIDER_KINDS]
        created.append(await h.create(provider="apimart", prompt="two foxes", n=2, size="2:3"))
        finals = [await h.wait_status(task["id"], timeout=30) for task in created]
        assert [t["status"] for t in finals] == ["succeeded"] * len(finals), [t.get("error") for t in finals]
        images = [image for task in finals for image in task["images"]]
        assert len(images) == len(PROVIDER_KINDS) + 2

        objects = image_objects(moto, prefix)
        for image in images:
            sha, ext = image["sha256"], {"image/jpeg": "jpg"}.get(image["content_type"],
                                                                  image["content_type"].split("/")[1])
            data = objects[f"{prefix}/{sha[:2]}/{sha[2:4]}/{sha}.{ext}"]
            assert hashlib.sha256(data).hexdigest() == sha and len(data) == image["bytes"]
        assert len(objects) == len({image["sha256"] for image in images})

        for image in images:
            await assert_served(h.api, image)
        assert (await h.api.get("/readyz")).json() == {"ok": True}
        data_dir = Path(h.runtime.settings.storage.data_dir)
        assert local_files(data_dir / "images") == [] and local_files(data_dir / "tmp") == []

        # A second relay with its own (empty) data directory, sharing only the database and the bucket.
        database = h.runtime.settings.storage.database
        async with harness(tmp_path / "b", run_worker=False, RELAY_STORAGE_DATABASE=database, **env) as other:
            for image in images:
                await assert_served(other.api, image)
            assert local_files(tmp_path / "b" / "images") == []


async def test_refused_credentials_keep_tasks_archiving_until_fixed(moto: MotoS3, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """403 from the bucket: no internal error, /readyz names the store; fixed credentials archive the task."""
    caplog.set_level(logging.INFO, logger="relay")
    prefix = new_prefix()
    async with harness(tmp_path, **s3_env(moto, prefix, TEST_S3_SECRET="wrong-secret-0123456789")) as h:
        task = await h.create(provider="evolink", prompt="a lighthouse")

        async def refused() -> bool:
            return any("refused relay's credentials" in r.getMessage() for r in caplog.records
                       if r.name == "relay.archive")
        await wait_for(refused, 15, "an archive attempt refused by the bucket")
        assert (await h.task(task["id"]))["status"] == "archiving"
        ready = await h.api.get("/readyz")
        assert ready.status_code == 503
        problem = ready.json()["problems"]["image_store"]
        assert "refused relay's credentials (403 SignatureDoesNotMatch" in problem and "wrong-secret" not in problem

        h.runtime.ctx.image_store = store_for(moto, tmp_path, prefix=prefix)     # the operator fixes the secret
        final = await h.wait_status(task["id"], timeout=15)
        assert final["status"] == "succeeded", final
        assert len(image_objects(moto, prefix)) == 1
    assert not [r for r in caplog.records if r.name == "relay.worker" and r.levelno >= logging.ERROR]


async def test_a_server_down_keeps_tasks_archiving_and_they_are_archived_when_it_is_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The S3 server killed: tasks wait in archiving (retryable), /readyz says so; restarted, they succeed."""
    caplog.set_level(logging.INFO, logger="relay")
    server = MotoS3(tmp_path / "moto").start()
    try:
        server.provision(BUCKET)
        env = s3_env(server, "down")
        async with harness(tmp_path / "relay", **env) as h:
            assert (await h.api.get("/readyz")).status_code == 200
            server.kill()
            tasks = [await h.create(provider=kind, prompt="a paper boat") for kind in ("gmicloud", "openai")]

            async def unreachable() -> bool:
                lines = [r.getMessage() for r in caplog.records if r.name == "relay.archive"]
                return any("is unreachable (Connect, Connection refused)" in line for line in lines)
            await wait_for(unreachable, 15, "an archive attempt to find the server down")
            assert {(await h.task(t["id"]))["status"] for t in tasks} == {"archiving"}
            ready = await h.api.get("/readyz")
            assert ready.status_code == 503 and "is unreachable" in ready.json()["problems"]["image_store"]

            server.start()          # same port, empty: the operator restores the bucket
            server.provision(BUCKET)
            finals = [await h.wait_status(t["id"], timeout=20) for t in tasks]
            assert [f["status"] for f in finals] == ["succeeded", "succeeded"], finals
            objects = image_objects(server, "down")
            for image in (f["images"][0] for f in finals):
                assert any(hashlib.sha256(data).hexdigest() == image["sha256"] for data in objects.values())
                assert (await h.api.get(f"/v1/images/{image['id']}")).status_code == 200
            assert (await h.api.get("/readyz")).status_code == 200
        assert not [r for r in caplog.records if r.name == "relay.worker" and r.levelno >= logging.ERROR]
    finally:
        server.stop()
