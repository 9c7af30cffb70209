"""``--census-version``: resolved through the Census release directory and mirror list (served
here from a loopback HTTP server, the public ones being unreachable offline), pinned once in the
plan so that Ray workers open that exact release by URI."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from ingest.query import IngestConfig
from ingest.run import run_ingest
from ingest.validate import validate_shards
from shardset import Manifest


@pytest.fixture
def release_directory(demo_census, monkeypatch):
    import cellxgene_census._release_directory as rd

    root = demo_census.resolve()
    docs = {
        "/release.json": {"stable": "2099-01-01", "latest": "2099-01-01",
                          "2099-01-01": {"release_build": "2099-01-01", "release_date": "2099-01-01",
                                         "soma": {"relative_uri": f"{root.name}/"},
                                         "h5ads": {"relative_uri": "h5ads/"}}},
        "/mirrors.json": {"default": "local",
                          "local": {"provider": "file", "base_uri": f"{root.parent.as_uri()}/", "region": None}},
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps(docs[self.path]).encode() if self.path in docs else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(rd, "CELL_CENSUS_RELEASE_DIRECTORY_URL", f"{base}/release.json")
    monkeypatch.setattr(rd, "CELL_CENSUS_MIRRORS_DIRECTORY_URL", f"{base}/mirrors.json")
    yield root
    server.shutdown()


def test_census_version_is_resolved_and_pinned(release_directory, tmp_path):
    out = tmp_path / "shards"
    manifest = run_ingest(IngestConfig(out=str(out), census_version="stable", tissues=("blood",), max_cells=300,
                                       cells_per_shard=150, num_cpus=1))
    src = manifest.source
    assert src["kind"] == "census" and src["census_version"] == "stable" and src["release_build"] == "2099-01-01"
    assert src["uri"].rstrip("/").endswith(release_directory.name) and src["s3_region"] is None
    assert manifest.totals.cells == 300 and len(manifest.shards) == 2
    assert Manifest.load(out).source == src
    assert validate_shards(out)["ok"]
