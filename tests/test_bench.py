"""`workbench bench cache` runs end to end and reports what it promises (speed is not asserted)."""

from __future__ import annotations

import json

from app.cli import main


def test_bench_cache_reports_ratios_and_reader_throughput(capsys, tiny_model_dir):
    code = main(["bench", "cache", "--model", str(tiny_model_dir), "--tokens", "4096", "--reps", "2", "--json"])
    assert code == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"forward_only", "forward_to_hook", "cache_write", "read_sequential", "read_shuffled"}
    assert rows["forward_only"]["vs_forward"] == 1.0
    for name in ("forward_to_hook", "cache_write"):
        assert rows[name]["vs_forward"] > 0 and rows[name]["tokens_per_s"] > 0
    for name in ("read_sequential", "read_shuffled"):
        assert rows[name]["gb_per_s"] > 0 and rows[name]["vs_forward"] is None
