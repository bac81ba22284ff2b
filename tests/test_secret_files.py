"""Generated secrets (API key, signing secret) are one per data directory, however many processes start at once."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path
from typing import Any

from relay.runtime import read_or_create_secret


def _read(path: str, barrier: Any, results: Any) -> None:
    barrier.wait(timeout=30)          # all start reading at once: the race the temp-file-and-link closes
    results.put(read_or_create_secret(Path(path), "rk_"))


def test_processes_racing_on_a_fresh_data_dir_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "data" / "api-key"
    context = multiprocessing.get_context("fork")
    workers = 8
    for _round in range(5):
        path.unlink(missing_ok=True)
        barrier, results = context.Barrier(workers), context.Queue()
        processes = [context.Process(target=_read, args=(str(path), barrier, results)) for _ in range(workers)]
        for process in processes:
            process.start()
        values = [results.get(timeout=30) for _ in processes]
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
        assert len(set(values)) == 1 and values[0].startswith("rk_") and len(values[0]) > 20, values
        assert path.read_text().strip() == values[0]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["api-key"]      # no temporary files left behind


def test_an_existing_secret_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "signing-secret"
    first = read_or_create_secret(path, "")
    assert read_or_create_secret(path, "") == first
