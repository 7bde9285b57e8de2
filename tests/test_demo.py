"""`flashcomm demo` end to end with a tiny config (the real CLI in a subprocess,
real spawned ranks), and the op-level variant."""

from __future__ import annotations

import subprocess
import sys

from _cases import run_cli


def test_model_demo_runs_end_to_end(tmp_path):
    plot = tmp_path / "demo.png"
    out = run_cli("demo", "--tp", "2", "--hidden", "64", "--layers", "1", "--tokens",
                  "1,5,9,40,9", "--sp-threshold", "8", "--repeats", "1", "--plot", str(plot),
                  cwd=tmp_path)
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in lines] == [1, 5, 9, 40, 9]
    modes = {int(r[0]): r[1] for r in lines}
    assert modes == {1: "replicated", 5: "replicated", 9: "sharded", 40: "sharded"}
    for row in lines:
        assert float(row[-2]) < 1e-3, row  # max |logit diff| vs the dense model
        assert int(row[-1]) == 2, row  # one graph per model (flashcomm, plain TP), never more
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_ops_demo_runs_end_to_end(tmp_path):
    out = run_cli("demo", "--ops", "--tokens", "3,1001", "--hidden", "64", "--repeats", "1",
               cwd=tmp_path)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in ("gemm_rs", "ag_gemm", "gemm_rs_w8a8", "ag_gemm_w8a8")]
    assert len(rows) == 8
    for op, n, strategy, err, _ms in rows:
        assert strategy == ("pipelined" if int(n) > 1000 else "sequential")
        assert float(err) < 1e-4


def test_cli_help_explains_itself():
    out = subprocess.run([sys.executable, "-m", "flashcomm", "demo", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    for flag in ("--tp", "--sp-threshold", "--w8a8", "--dtype", "--repeats", "--ops"):
        assert flag in out
