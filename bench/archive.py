"""Archive throughput: relay's archive jobs vs a plain httpx download of the same image URLs.

    python -m bench.archive [--quick]

The simulator (a child process) makes GMI Cloud tasks of ten 1024x1024 PNGs each; every image is
fetched once first so the simulator has drawn and cached it (both sides then read the same cached
bytes). Baseline: a plain httpx client in this process GETs every URL into memory, CONCURRENCY at
once. relay, in this process: the real runtime (store, guarded HTTP client, image store) and the real
worker with CONCURRENCY slots; one task per image is put in `archiving` through the store (as a
provider completion would: image row + archive job, one transaction), then the worker runs until
every archive job is done: claim, download with sha256 (into memory, these bodies being under
relay.images.download.SPOOL_BYTES), verify the image (Pillow), write, fsync and rename into the
content-addressed store, record it and let the task succeed (task.succeeded event), finish the job.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    KEY,
    Figure,
    Section,
    cpu_seconds,
    database_env,
    percentile,
    ratio,
    run_loop,
    run_standalone,
    start_simulator,
    stop,
    timed,
)

CONCURRENCY = 32          # worker.concurrency's default
PER_TASK = 10             # images per simulated GMI Cloud task


async def make_urls(sim: str, images: int) -> list[str]:
    async with httpx.AsyncClient(timeout=60) as http:
        async def submit(i: int) -> list[str]:
            body = await http.post(f"{sim}/gmicloud/api/v1/ie/requestqueue/apikey/requests",
                                   headers={"authorization": "Bearer sim"},
                                   json={"model": "gpt-image-1.5", "payload": {
                                       "prompt": f"archive bench {i} [sim:sync] [sim:duration=0]",
                                       "size": "1024x1024", "n": PER_TASK}})
            body.raise_for_status()
            return [m["url"] for m in body.json()["outcome"]["media_urls"]]

        urls = [u for batch in await asyncio.gather(*(submit(i) for i in range(images // PER_TASK))) for u in batch]
        # Draw every image once (the simulator caches them), so neither side pays for drawing.
        await download_all(http, urls, 8)
    return urls


async def download_all(http: httpx.AsyncClient, urls: list[str], concurrency: int) -> tuple[int, list[float]]:
    queue = list(reversed(urls))
    total, latencies = 0, []

    async def lane() -> None:
        nonlocal total
        while queue:
            url = queue.pop()
            began = time.monotonic()
            response = await http.get(url)
            response.raise_for_status()
            total += len(response.content)
            latencies.append((time.monotonic() - began) * 1000)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return total, latencies


async def baseline(urls: list[str]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await download_all(http, urls[: CONCURRENCY * 2], CONCURRENCY)   # open the connections
        cpu, began = cpu_seconds(), time.monotonic()
        size, latencies = await download_all(http, urls, CONCURRENCY)
        seconds = time.monotonic() - began
        return {"images": len(urls), "bytes": size, "seconds": seconds, "cpu": cpu_seconds() - cpu,
                "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


async def through_relay(urls: list[str], data_dir: Path, sim: str) -> dict[str, Any]:
    from relay import ids
    from relay.config import load_settings
    from relay.models import ProviderImage, Task, TaskStatus
    from relay.runtime import open_runtime
    from relay.states import Transition

    env = {"RELAY_STORAGE_DATA_DIR": str(data_dir), "RELAY_AUTH_API_KEYS": KEY,
           "RELAY_WORKER_CONCURRENCY": str(CONCURRENCY), "RELAY_NETWORK_ALLOW": "127.0.0.0/8,::1/128,localhost",
           "RELAY_PROVIDERS_GMICLOUD_BASE_URL": f"{sim}/gmicloud", **database_env(str(data_dir))}
    async with open_runtime(load_settings(None, env)) as runtime:
        store, clock = runtime.store, runtime.ctx.clock
        for i, url in enumerate(urls):
            now = clock.now()
            task = Task(id=ids.new_id("tsk", now), provider="gmicloud", request={"prompt": f"archive bench {i}"},
                        created_at=now, updated_at=now)
            await store.create_task(task, [])
            transition = Transition(TaskStatus.ARCHIVING, "task.generated", progress=100,
                                    images=(ProviderImage(url=url),))
            await store.apply(task.id, lambda t, tr=transition: tr, now)
        cpu, began = cpu_seconds(), time.monotonic()
        worker = asyncio.create_task(runtime.worker.run_forever())
        try:
            while (await store.job_counts()).get("archive:queued", 0):
                await asyncio.sleep(0.02)
            seconds = time.monotonic() - began
            used = cpu_seconds() - cpu
        finally:
            await runtime.worker.stop(grace=5)
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        counts = await store.job_counts()
        archived = failed = size = 0
        latencies = []
        tasks, cursor = [], None
        while True:
            page, cursor = await store.list_tasks(status=None, provider=None, limit=500, cursor=cursor)
            tasks += page
            if cursor is None:
                break
        for task in tasks:
            for image in task.images:
                if image.status == "archived":
                    archived += 1
                    size += image.bytes or 0
                    latencies.append((image.archived_at or 0) - task.updated_at)
                elif image.status == "failed":
                    failed += 1
    return {"images": archived, "failed": failed, "bytes": size, "seconds": seconds, "cpu": used,
            "dead_jobs": sum(n for k, n in counts.items() if k.endswith(":dead"))}


def fsync_cost(folder: Path, files: int = 40, size: int = 32 * 1024) -> float:
    """p50 ms of what put_file adds per image: fsync a fresh file, rename it, fsync its directory."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    times = []
    for i in range(files):
        tmp, dest = folder / f"f{i}.part", folder / f"f{i}.png"
        tmp.write_bytes(data)
        began = time.perf_counter()
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        times.append((time.perf_counter() - began) * 1000)
    return percentile(times, 50)


def verify_cost(images_dir: Path, files: int = 20) -> dict[str, float]:
    """p50 ms of relay's inspect_image and of Pillow's verify() alone, on archived images."""
    from PIL import Image

    from relay.images.verify import inspect_image

    paths = sorted(images_dir.glob("*/*/*.png"))[:files]
    full, verify = [], []
    for path in paths:
        began = time.perf_counter()
        inspect_image(path)
        full.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        with Image.open(path) as im:
            im.verify()
        verify.append((time.perf_counter() - began) * 1000)
    return {"inspect_ms": percentile(full, 50), "verify_ms": percentile(verify, 50)}


def measure(quick: bool) -> dict[str, Any]:
    images = 200 if quick else 600
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sim, sim_url = start_simulator(root, 0.0)
        try:
            urls = run_loop(make_urls(sim_url, images))
            plain = run_loop(baseline(urls))
            through = run_loop(through_relay(urls, root / "relay", sim_url))
        finally:
            stop(sim)
        fsync_ms = fsync_cost(root / "fsync")
        decode = verify_cost(root / "relay" / "images")
    return {"baseline": plain, "relay": through, "fsync_ms": fsync_ms, **decode}


@timed
def run(quick: bool) -> Section:
    found = measure(quick)
    plain, through = found["baseline"], found["relay"]
    rows = []
    for label, s in (("plain httpx GET into memory (baseline)", plain), ("relay archive jobs", through)):
        per_s = s["images"] / s["seconds"]
        mb_s = s["bytes"] / s["seconds"] / 1e6
        rows.append((label, s, per_s, mb_s))
    r = ratio(rows[1][2], rows[0][2])
    mean_kb = plain["bytes"] / plain["images"] / 1024
    lines = [
        f"Measured in process (`bench/archive.py`), relay's own code path: the real runtime and worker "
        f"({CONCURRENCY} slots) run the archive jobs of {through['images'] + through['failed']} tasks (one "
        f"1024x1024 PNG each, {mean_kb:.0f} KiB on average, served from the simulator's cache): download "
        "with sha256 into memory (under relay.images.download.SPOOL_BYTES), image verified, written, fsync + "
        "rename into the content-addressed store, "
        "the image recorded and the task moved to `succeeded` (with its event), the job finished. Baseline: "
        f"the same URLs with a plain httpx client, {CONCURRENCY} at once, bodies read into memory.", "",
        "| path | images | failed | seconds | images/s | MB/s | CPU ms per image |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for label, s, per_s, mb_s in rows:
        lines.append(f"| {label} | {s['images']} | {s.get('failed', 0)} | {s['seconds']:.2f} | {per_s:.0f} | "
                     f"{mb_s:.1f} | {s['cpu'] / max(1, s['images']) * 1000:.1f} |")
    lines += ["", f"Ratio relay / baseline (images/s): **{r:.2f}**." if r is not None else "", "",
              "Measured alongside, per PNG (p50): relay's `inspect_image` (sniff, Pillow open and `verify()` of "
              f"every chunk CRC) {found['inspect_ms']:.2f} ms, Pillow's `verify()` alone "
              f"{found['verify_ms']:.2f} ms; fsync of a fresh 32 KiB file + rename + directory fsync on this disk "
              f"{found['fsync_ms']:.1f} ms."]
    notes = [
        "The simulator's PNGs are small (flat gradients compress well); a real provider's 1-3 MB image moves "
        "more bytes per job, so MB/s here says little about network or disk bandwidth, and images/s is about "
        "the fixed cost per image.",
        "Per image relay pays, beyond the GET: a claim and a finish of the job, reading the image row, the "
        "image verification, the two fsyncs, and the transaction that records the image and moves the task to "
        "succeeded (with its event), each an aiosqlite thread hop.",
        "Verification used to be the largest single item: a full Pillow decode of every image (5-9 ms per "
        "1024x1024 PNG, ~29 ms for a 4.7 MB one, about 40 % of relay's CPU under load). It now checks each "
        "format as cheaply as still catches a cut or damaged body: PNG by its chunk CRCs through IEND, WebP by "
        "its RIFF chunk sizes, JPEG by a decode at 1/8 scale (every entropy-coded byte is still read); the same "
        "verdict as the full decode on 648 truncations tested.",
        f"The fsyncs ({found['fsync_ms']:.1f} ms here) do not use the CPU and run in threads; they are not "
        "what limits this rate on this disk.",
    ]
    figures = {"relay_images_per_s": rows[1][2], "relay_mb_per_s": rows[1][3], "baseline_images_per_s": rows[0][2],
               "baseline_mb_per_s": rows[0][3], "ratio": r or 0.0, "fsync_ms": found["fsync_ms"],
               "inspect_ms": found["inspect_ms"],
               "relay_failed": through["failed"]}
    summary = [Figure(f"archive ({CONCURRENCY} at once, in process)",
                      f"{rows[1][2]:.0f} images/s, {rows[1][3]:.1f} MB/s",
                      f"plain httpx download: {rows[0][2]:.0f} images/s, {rows[0][3]:.1f} MB/s", r)]
    return Section("archive", "Archive throughput", "\n".join(lines), notes, figures, summary)


def main() -> None:
    run_standalone(run)


if __name__ == "__main__":
    main()
