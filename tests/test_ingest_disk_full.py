"""Issue 14 item 4: `ingest census` into a full disk (a real 3 MB tmpfs as --out: room
for the vocabulary and about one 2 MB shard of the demo atlas).

A worker's ENOSPC used to surface as a 37-line Ray traceback. Now: one line naming the path, exit
1, no temporary file left, and the manifest lists only finished shards (a re-run resumes).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fixtures.ingest import run_ingest_cli


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_message_naming_the_path(demo_census, tiny_disk: Path):
    out = tiny_disk / "shards"
    proc = run_ingest_cli("census", "--census-uri", str(demo_census), "--tissue", "blood", "--cells-per-shard", "1000",
                          "--num-cpus", "2", "--out", str(out), check=False)
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("ingest census: error: no space left on the device of")]
    assert len(lines) == 1 and f"--out {out}" in lines[0] and "re-running the same command resumes" in lines[0], \
        err[-3000:]
    assert "Traceback" not in err and "RayTaskError" not in err, err[-3000:]
    left = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert not left, f"temporary files left behind: {left}"
    from shardset import Manifest

    m = Manifest.load(out)  # the last manifest written: only finished shards, each whole
    assert not m.complete and len(m.shards) < m.n_shards_planned
    assert all((out / s.path).stat().st_size == s.n_bytes for s in m.shards)
