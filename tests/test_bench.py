"""`flashcomm bench` and `flashcomm tune` smoke runs with tiny sizes (the real CLI in a
subprocess, real spawned ranks): they finish and write the expected fields. No
timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flashcomm import tuning

from _cases import run_cli

ROOT = Path(__file__).resolve().parents[1]



def test_bench_and_tune_smoke(tmp_path):
    table = tmp_path / "table.json"
    out = run_cli("tune", "--hidden", "64", "--tokens", "8,40", "--model-tokens", "8,40",
               "--repeats", "1", "--warmup", "0", "--layers", "1", "--quiet",
               "-o", str(table), cwd=tmp_path)
    assert "fingerprint" in out
    t = tuning.load_table(str(table))
    assert len(t.entries) == 8  # 4 distinct FP op shapes of the model + 4 W8A8
    assert all(e.tp == 2 for e in t.entries) and t.sp_threshold is not None

    js, png = tmp_path / "b.json", tmp_path / "b.png"
    out = run_cli("bench", "--hidden", "64", "--tokens", "1,40", "--model-tokens", "1,40",
               "--layers", "1", "--repeats", "1", "--warmup", "0", "--pipe-sweep", "2x4",
               "--chunk-counts", "1,2", "--table", str(table), "--json", str(js),
               "--plot", str(png), "--quiet", cwd=tmp_path)
    assert "overlap" in out and "crossover" in out
    r = json.loads(js.read_text())
    assert r["machine"]["world_size"] == 2 and r["machine"]["logical_cpus"] >= 1
    assert r["table"]["fingerprint"] == tuning.table_fingerprint(t)
    assert {row["op"] for row in r["ops"]} == {"gemm_rs", "ag_gemm", "gemm_rs_w8a8",
                                               "ag_gemm_w8a8"}
    for row in r["ops"]:
        for f in ("gemm_ms", "comm_ms", "py_ms", "seq_ms", "pipe_ms", "auto_ms", "pipe@2x4_ms",
                  "overlap_efficiency", "seq_overhead_ms", "auto_vs_best", "best_fixed",
                  "choice_vs_best"):
            assert f in row, (row["op"], f)
        # The policy's choice, timed as a fixed strategy, is never faster than the best.
        best = min(row["seq_ms"], row["pipe_ms"])
        assert row["choice_vs_best"] >= 1.0
        assert (row["choice_vs_best"] == 1.0) == (
            row[f"{row['auto_strategy']}_ms"] == best), row
        if row["op"].startswith("gemm_rs"):
            assert "tp_ar_ms" in row
    assert [g["n"] for g in r["gemm"]] == [1, 40]
    assert {"fp32_ms", "bf16_ms", "int8_ms", "w8a8_ms"} <= set(r["gemm"][0])
    assert "chunks2_efficiency" in r["chunks"][0]
    assert r["w8a8_bytes"][0]["w8a8_vs_bf16"] < 1
    assert [m["n"] for m in r["model"]] == [1, 40]
    assert {"tp_ms", "flashcomm_ms", "sharded_ms", "replicated_ms"} <= set(r["model"][0])
    assert "model_crossover" in r and "gemm_rs" in r["summary"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_help_lists_flags():
    out = subprocess.run([sys.executable, "-m", "flashcomm", "bench", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    for flag in ("--tokens", "--repeats", "--table", "--pipe-sweep", "--json", "--plot",
                 "--threads"):
        assert flag in out
    out = subprocess.run([sys.executable, "-m", "flashcomm", "tune", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    for flag in ("--tokens", "--output", "--margin", "--no-model"):
        assert flag in out


def test_every_results_file_records_its_provenance():
    """Every file in benchmarks/results/ says which commit, torch, vLLM and CPU produced
    it: embedded (new results) or in PROVENANCE.json (legacy, from git history)."""
    proc = subprocess.run([sys.executable, "benchmarks/results_provenance.py", "--check"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_stamp_records_provenance_once(tmp_path):
    from flashcomm.tools import provenance as prov
    js, txt = tmp_path / "r.json", tmp_path / "r.txt"
    js.write_text('{"median_us": [1.0]}')
    txt.write_text("table\n")
    record = prov.provenance()
    assert record["commit"] and record["cpu_model"] and record["torch"]
    assert prov.stamp(js, record) and prov.stamp(txt, record)
    assert not prov.stamp(js, record) and not prov.stamp(txt, record)  # once
    assert json.loads(js.read_text())["provenance"]["commit"] == record["commit"]
    first, rest = txt.read_text().split("\n", 1)
    assert first.startswith(prov.STAMP_PREFIX) and rest == "table\n"
    assert json.loads(first[len(prov.STAMP_PREFIX):])["cpu_flags"] == record["cpu_flags"]
