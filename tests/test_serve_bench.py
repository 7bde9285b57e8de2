"""``benchmarks/serve_bench.py`` (issue 22) without a server: its argument errors, its
relative rates, its per-layer arithmetic, and the checkpoint's trained tokenizer with the
benchmark's prompt sets.

Its smoke run against real servers is part of tests/test_vllm_serve.py, on the servers
that test starts anyway (flashcomm on and off): vLLM's benchmark client, the per-step
trace and the on/off summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_bench as sb  # noqa: E402  (benchmarks/serve_bench.py)

CHECKPOINT = ROOT / "scripts" / "make_tiny_checkpoint.py"


def test_bad_arguments_name_the_option():
    for parse, bad, name in ((sb.parse_mix, "0.5:10-5:1-2", "--mix"),
                             (sb.parse_mix, "half:1-2:1-2", "--mix"),
                             (sb.parse_rates, "1,0", "--rates"),
                             (sb.parse_rates, "0.5x,2", "--rates"),  # Fx needs inf
                             (sb.parse_order, "on,of", "--order")):
        with pytest.raises(argparse.ArgumentTypeError, match=name):
            parse(bad)
    with pytest.raises(SystemExit, match="--max-model-len"):
        sb.config_from_args(sb.build_parser().parse_args(["--max-model-len", "512"]))
    with pytest.raises(SystemExit, match="--preset"):
        sb.config_from_args(sb.build_parser().parse_args(["--preset", "qwen3"]))
    proc = subprocess.run([sys.executable, str(CHECKPOINT), "/nonexistent", "--tokenizer",
                           "--vocab-size", "300", "--tokenizer-vocab", "400"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--tokenizer-vocab" in proc.stderr, proc.stderr


def test_relative_rates_run_after_inf():
    assert sb.parse_rates("0.4x,0.8x,inf") == ["inf", "0.4x", "0.8x"]
    assert sb.parse_rates("1,inf,2") == ["1", "inf", "2"]  # absolute: the order given
    assert sb.rate_value("0.4x", 2.5) == pytest.approx(1.0)
    assert sb.rate_value("3", None) == 3.0


def test_per_layer_line():
    # Latencies linear in depth L: on = 10 + 2 L, off = 10 + L (throughput 1000 / that).
    def model(layers):
        row = {}
        for key, _, lower in sb.FIGURES:
            on, off = 10 + 2 * layers, 10 + layers
            row[key] = ({"on": on, "off": off} if lower else
                        {"on": 1e3 / on, "off": 1e3 / off})
        return {"preset": "qwen3-0.6b", "layers": layers, "summary": {"inf": row}}

    rows = sb.per_layer([model(4), model(8)], ["inf"])
    assert len(rows) == len(sb.FIGURES)
    for r in rows:
        assert r["slope_ratio"] == pytest.approx(2.0), r
        assert r["delta_per_layer_ms"] == pytest.approx([1.0, 1.0]), r  # (on - off) / L
        assert r["ratio_at_depth"] == pytest.approx([18 / 14, 26 / 18]), r
        assert r["full_depth"] == 28
        assert r["ratio_at_full_depth"] == pytest.approx(66 / 38), r


def test_step_times_pool_the_client_windows_per_mode(tmp_path):
    # Two servers per mode; rank 0's steps inside the client windows only (the warm-up
    # step at t=0 is outside), binned by tokens, medians per mode, on / off.
    def server(tag, mode, ms):
        prefix = tmp_path / f"trace_{tag}"
        steps = [{"t": 0.0, "ms": 999.0, "n": 3, "reqs": 1, "dec": 1}]
        steps += [{"t": 10.0 + i, "ms": ms * (1 + (n > 16)), "n": n, "reqs": 2, "dec": 1}
                  for i, n in enumerate([2, 3, 4, 300, 3000])]
        (tmp_path / f"trace_{tag}.rank0.jsonl").write_text(
            "".join(json.dumps(st) + "\n" for st in steps))
        (tmp_path / f"trace_{tag}.rank1.jsonl").write_text("")  # rank 1 is not read
        return {"mode": mode, "trace": {"prefix": str(prefix), "windows": {"inf": [5, 100]}}}

    got = sb.step_times([server("a", "on", 11.0), server("b", "off", 10.0),
                         server("c", "off", 10.0), server("d", "on", 11.0)])
    assert list(got) == ["<=16", "<=512", "<=4096"]
    assert got["<=16"]["on"] == {"steps": 6, "tokens_p50": 3, "ms_p50": 11.0}
    assert got["<=16"]["off"]["steps"] == 6 and got["<=16"]["ratio"] == pytest.approx(1.1)
    assert got["<=4096"]["off"]["ms_p50"] == 20.0 and got["<=4096"]["ratio"] == 1.1
    # A server without a trace (a run made before traces) contributes nothing.
    assert sb.step_times([{"mode": "on"}]) == {}


def test_tokenizer_and_prompt_sets(tmp_path):
    pytest.importorskip("tokenizers", reason="installed with vLLM (make install-vllm)")
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, str(CHECKPOINT), str(ckpt), "--tokenizer",
                    "--vocab-size", "640", "--tokenizer-vocab", "512"], check=True,
                   capture_output=True, text=True)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (640, 1, 2)
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    weights = load_file(str(ckpt / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        # The ids the tokenizer lacks: zero rows (never picked greedily).
        assert weights[name][512:].abs().max() == 0, name
        assert weights[name][:512].abs().min(dim=1).values.max() > 0, name

    mix = sb.parse_mix("1:30-40:5-6,1:200-220:7-8")
    sets = sb.write_prompt_sets(ckpt, mix, ["inf", "0.5x"], 12, 2, 0, tmp_path / "a")
    again = sb.write_prompt_sets(ckpt, mix, ["inf", "0.5x"], 12, 2, 0, tmp_path / "b")
    assert sorted(sets) == ["0.5x", "inf", "warmup"]
    for name, path in sets.items():
        assert path.read_text() == again[name].read_text(), name  # seeded
        rows = sb.load_prompts(path)
        assert len(rows) == (4 if name == "warmup" else 12), (name, len(rows))
        for r in rows:
            n = len(tok.encode(r["prompt"]).ids)
            assert abs(n - r["target_prompt_tokens"]) <= 3, (n, r)
            assert any(c.prompt[0] <= r["target_prompt_tokens"] <= c.prompt[1] and
                       c.output[0] <= r["output_tokens"] <= c.output[1] for c in mix), r
    assert sets["inf"].read_text() != sets["0.5x"].read_text()  # a set per rate


def test_server_command_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHCOMM_SP_THRESHOLD", raising=False)
    for enable, cpp in ((True, True), (False, False)):
        srv = sb.ServeProcess(tmp_path, tmp_path / "model", enable, "t", "bfloat16", 4096,
                              None, "inductor", "", ["--max-num-batched-tokens=2048"],
                              cpp_wrapper=cpp)
        cmd, env = srv.cmd, srv.env
        assert cmd[1:5] == ["-m", "flashcomm", "serve", str(tmp_path / "model")], cmd
        assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2", cmd
        assert "--no-enable-prefix-caching" in cmd and "--max-num-batched-tokens=2048" in cmd
        assert env["FLASHCOMM_ENABLE"] == ("1" if enable else "0"), env["FLASHCOMM_ENABLE"]
        # The plugin's own threshold (not the tests' 16 that vllm_env sets).
        assert "FLASHCOMM_SP_THRESHOLD" not in env
        assert env[sb.TRACE_ENV] == str(tmp_path / "trace_t")
        assert env["PYTHONPATH"].split(":")[:2] == [str(tmp_path / "trace_ep"),
                                                     str(ROOT / "benchmarks")], env["PYTHONPATH"]
        assert ("--compilation-config=" + json.dumps(sb.CPP_WRAPPER_CONFIG) in cmd) == cpp
        assert (env.get("VLLM_USE_LAYERNAME") == "0") == cpp
