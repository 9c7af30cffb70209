"""`ingest validate` names a remedy for every problem, and the remedy works: a re-run of the same
`ingest census` command repairs what it says it repairs; a manifest whose hash does not match
points at a fresh ingest (a re-run into the same --out stops at the same check)."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from ingest.errors import IngestError
from ingest.validate import validate_shards
from shardset import MANIFEST_FILE, VOCAB_FILE, Manifest
from tests.fixtures.ingest import DEMO_SHARD_ARGS, run_ingest_cli
from tests.fixtures.training import write_tiny_shards


def _problems(path) -> str:
    with pytest.raises(IngestError) as e:
        validate_shards(path)
    return str(e.value)


def test_every_problem_comes_with_its_remedy(tmp_path):
    out = write_tiny_shards(tmp_path / "s")
    shards = sorted((out / "shards").glob("*.parquet"))
    shards[0].unlink()
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    (out / VOCAB_FILE).write_text((out / VOCAB_FILE).read_text().replace("ENSG00000000001", "ENSG99999999999"))
    msg = _problems(out)
    rerun, _, rest = msg.partition("re-run the `ingest census` command that wrote")
    assert "3 problems" in rerun, msg
    assert "same arguments and the same --out" in rest and "manifest.json 'args'" in rest
    for needle in (f"{shards[0].relative_to(out)}: missing", "sha256 differs", "vocab.json: hash"):
        assert needle in rest, msg
    assert "fresh --out" not in msg  # nothing here needs more than the re-run


def test_a_contract_breach_with_a_matching_checksum_points_at_a_fresh_ingest(tmp_path):
    out = write_tiny_shards(tmp_path / "s")
    m = Manifest.load(out)
    m.replace(n_bins=3).write(out)  # bins up to 50 now break the (self-consistent) manifest's contract
    msg = _problems(out)
    assert "fresh --out" in msg and "bins outside 1..2" in msg and "checksums match" in msg, msg
    assert "re-run the `ingest census` command" not in msg


def test_edited_manifest_names_a_fix_that_works(tmp_path):
    out = write_tiny_shards(tmp_path / "s")
    raw = json.loads((out / MANIFEST_FILE).read_text())
    raw["n_bins"] = 21  # an edit by hand: the hash no longer matches
    (out / MANIFEST_FILE).write_text(json.dumps(raw))
    msg = _problems(out)
    assert "manifest_hash does not match" in msg and "fresh --out" in msg and "delete this folder" in msg
    assert "ingest validate" not in msg and "same arguments" not in msg  # both would stop here again


@pytest.mark.slow
def test_the_named_rerun_repairs_the_shard_set(demo_census, demo_shards, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(demo_shards, out)
    (out / "shards" / "part-00002.parquet").unlink()
    (out / VOCAB_FILE).write_text((out / VOCAB_FILE).read_text() + " ")
    assert "re-run the `ingest census` command" in _problems(out)
    run_ingest_cli("census", "--census-uri", str(demo_census), *DEMO_SHARD_ARGS, "--out", str(out))
    assert validate_shards(out)["ok"]
    assert Manifest.load(out).hash() == Manifest.load(demo_shards).hash()
    pq.read_table(out / "shards" / "part-00002.parquet")


def test_train_gives_an_incomplete_or_edited_shard_set_one_instruction(tmp_path):
    from training.errors import TrainUsageError
    from training.launch import check_shards

    out = write_tiny_shards(tmp_path / "s")
    m = Manifest.load(out)
    m.replace(complete=False, shards=m.shards[:2]).write(out)  # an interrupted ingest
    for verify in (False, True):  # the cheap pre-flight and --verify-shards
        with pytest.raises(TrainUsageError) as e:
            check_shards(str(out), verify=verify)
        msg = str(e.value)
        assert re.search(r"re-run the (same )?`ingest census` command", msg), msg
        assert "fresh --out" not in msg and "ingest validate" not in msg, msg
    raw = json.loads((out / MANIFEST_FILE).read_text())
    raw["n_bins"] = 21
    (out / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(TrainUsageError) as e:
        check_shards(str(out))
    assert "fresh --out" in str(e.value) and "ingest validate" not in str(e.value), str(e.value)
