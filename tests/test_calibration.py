"""``sp_threshold=auto`` (flashcomm.vllm.calibration) without an engine: the pick rule,
the ladder, the setting's grammar, the cache key, and the measurement on 2 real ranks
(the ranks end with identical timings and threshold). The engine test that logs a
measured threshold is tests/test_vllm.py::test_mistral_fp_identical_tokens."""

from __future__ import annotations

import json

import pytest
import torch

import flashcomm
from flashcomm import settings
from flashcomm.vllm import calibration as cal


def test_pick_never_sharded():
    # Sharded slower everywhere: a threshold no batch exceeds.
    assert cal.pick_threshold([16, 32, 64], [1.0, 2.0, 3.0], [1.5, 2.5, 3.5], 512) == 512


def test_pick_sharded_from_the_first_point():
    assert cal.pick_threshold([16, 32, 64], [2.0, 4.0, 8.0], [1.0, 2.0, 4.0], 512) == 15


def test_pick_interpolates_the_crossover():
    # diff = s / r - 0.95: 64: 1.0 - 0.95 = +0.05; 128: 0.75 - 0.95 = -0.2 -> 64 + 64 * 0.05/0.25
    got = cal.pick_threshold([32, 64, 128, 256], [0.5, 1.0, 2.0, 4.0], [0.8, 1.0, 1.5, 2.0],
                             4096, margin=0.05)
    assert got == 64 + int(64 * 0.05 / 0.25)


def test_pick_wants_sharded_to_stay_faster():
    # Faster at 64 only, slower again at 128 and 256: the top decides, never sharded.
    assert cal.pick_threshold([32, 64, 128, 256], [1, 2, 4, 8], [2, 1, 5, 9], 300) == 300
    # Faster at the top two only: the crossover is between 64 and 128.
    assert 64 <= cal.pick_threshold([32, 64, 128, 256], [1, 2, 4, 8], [2, 3, 3, 4], 300) < 128


def test_pick_margin():
    # 2 % faster is within the margin: not faster.
    assert cal.pick_threshold([16, 32], [1.0, 1.0], [0.98, 0.98], 64) == 64
    assert cal.pick_threshold([16, 32], [1.0, 1.0], [0.98, 0.98], 64, margin=0.0) == 15


def test_paired_ratio_is_the_upper_quartile():
    # Sharded wins 5 of 7 paired samples by 10 %, loses 2: the statistic is a loss,
    # so the point reads as a tie (replicated).
    rep = [1.0] * 7
    assert cal.paired_ratio(rep, [0.9] * 5 + [1.1] * 2) == pytest.approx(1.1)
    # Wins 6 of 7: the upper quartile is a win.
    assert cal.paired_ratio(rep, [0.9] * 6 + [1.2]) == pytest.approx(0.9)
    # Pairs, not minima: a load spike that slows one sample of each mode alike is a tie.
    assert cal.paired_ratio([1.0, 3.0, 1.0, 1.0], [1.0, 3.0, 1.0, 1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="paired"):
        cal.paired_ratio([1.0], [])


def test_pick_from_ratios_ties_stay_replicated():
    # Ratios scattered around parity within the noise: never sharded.
    assert cal.pick_from_ratios([16, 32, 64, 128], [0.97, 1.02, 0.96, 0.99], 256) == 256
    # A clear win from 64 on.
    assert 32 <= cal.pick_from_ratios([16, 32, 64, 128], [1.1, 1.0, 0.8, 0.7], 256) < 64


def test_ladder():
    assert cal.ladder(512) == [16, 24, 32, 48, 64, 88, 128, 184, 256, 360, 512]
    assert cal.ladder(100) == [16, 24, 32, 48, 64, 88, 100]
    assert cal.ladder(8) == [8]
    assert cal.ladder(10**6)[-1] == cal.LADDER_CAP
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        cal.ladder(0)


@pytest.mark.parametrize("raw,want", [("auto", "auto"), (" AUTO ", "auto"), ("0", 0),
                                      ("1536", 1536), (64, 64)])
def test_parse_sp_threshold(raw, want):
    assert settings.setting("sp_threshold").parse(raw) == want


@pytest.mark.parametrize("raw", ["-1", "1e3", "never", "", True, -5, 2.5])
def test_parse_sp_threshold_refuses(raw):
    with pytest.raises(settings.SettingError,
                       match="FLASHCOMM_SP_THRESHOLD must be 'auto' or an integer >= 0"):
        settings.setting("sp_threshold").parse(raw)


def test_cache_key_ignores_the_threshold_it_stores(tmp_path):
    # vLLM's compile cache key (VllmConfig.compute_hash) sees flashcomm's record; the
    # calibration's key must not see the threshold it picks (a cached answer would
    # change its own key), and must see the rest of the record.
    pytest.importorskip("vllm")
    from flashcomm.tools.vllm_engine import make_checkpoint
    from vllm.config import ModelConfig, VllmConfig
    model = make_checkpoint(tmp_path, "llama", "--arch", "llama")
    cfg = VllmConfig(model_config=ModelConfig(model=str(model), skip_tokenizer_init=True,
                                              dtype="float32"))
    base = {"gemm": "engine", "transport": "shm", "group": "1"}
    # The user's keys beside the conversion record (settings.RECORD_KEY).
    cfg.additional_config = {"flashcomm": {"enable": True, "sp_threshold": "auto",
                                           settings.RECORD_KEY: {
                                               **base, "sp_threshold": 1000,
                                               "sp_threshold_requested": 1000}}}
    record = cfg.additional_config["flashcomm"][settings.RECORD_KEY]
    before, compile_before = cal.stable_config_hash(cfg), cfg.compute_hash()
    record.update(sp_threshold=184, sp_threshold_requested="auto")
    assert cal.stable_config_hash(cfg) == before
    assert cfg.compute_hash() != compile_before  # the compiled graph does see it
    assert settings.conversion_record(cfg.additional_config)["sp_threshold"] == 184  # restored
    record["gemm"] = "flashcomm"
    assert cal.stable_config_hash(cfg) != before
    facts = {"tp": 2, "ladder": [16, 32]}
    key = cal.cache_key(before, facts)
    assert key == cal.cache_key(before, dict(reversed(list(facts.items()))))
    assert key != cal.cache_key(before, {**facts, "tp": 4})
    # The cache file: read back only under its own key.
    path = str(tmp_path / "c.json")
    cal.write_cache(path, key, 184, facts, cal.Measurement([16], [1.0], [2.0], 0.1))
    assert cal.read_cache(path, key) == 184
    assert cal.read_cache(path, "other") is None
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["tokens"] == [16] and doc["facts"] == facts


def _measure_on_rank(tokens: list[int], budget_s: float):
    flashcomm.reset_stats()
    hidden = 64
    weight = torch.ones(hidden)
    boundary = cal.engine_boundary(hidden, torch.float32, torch.device("cpu"),
                                   flashcomm.group_name(None), weight, 1e-6)
    m = cal.measure(boundary, tokens, hidden, 4, torch.device("cpu"), samples=2,
                    budget_s=budget_s)
    return (m.tokens, m.replicated_s, m.sharded_s, m.ratios,
            cal.pick_from_ratios(m.tokens, m.ratios, 512), flashcomm.stats())


def test_measure_agrees_across_ranks(ranks):
    # Real ranks (gloo group, both transports): each rank times its own calls; the
    # slowest rank's medians reach every rank, so the pick is the same everywhere.
    pool = ranks(2)
    results = pool.run(_measure_on_rank, [16, 64], 60.0)
    assert results[0][:5] == results[1][:5], results
    tokens, rep, sh, ratios, threshold, stats = results[0]
    assert tokens == [16, 64] and all(t > 0 for t in rep + sh + ratios)
    assert threshold in (512, *range(0, 64))
    for *_, st in results:  # both modes ran, at both points
        for op in ("sp_reduce", "sp_add_rms_norm"):
            assert st[op]["replicated"] > 0 and st[op]["sharded"] > 0, st
    # A spent budget stops every rank after the same (first) point.
    stopped = pool.run(_measure_on_rank, [16, 64, 128], 0.0)
    assert [r[0] for r in stopped] == [[16], [16]], stopped


def test_tuning_file_and_explicit_number_override_auto(tmp_path):
    # Precedence: an explicit number > the tuning file's sp_threshold > auto. The table's
    # kernel crossovers are applied either way (every rank loads the same file).
    import logging

    from flashcomm import tuning
    table = tuning.TuningTable(entries=[tuning.TuningEntry("gemm_rs", 64, 128, 2, "float32",
                                                           300)], sp_threshold=777)
    path = str(tmp_path / "table.json")
    tuning.save_table(table, path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    cal.logger.addHandler(handler)
    pipeline = flashcomm.get_pipeline_config()
    try:
        assert cal.initial_threshold("auto", path) == (777, "tuning file")
        assert cal.initial_threshold(64, path) == (64, "set")
        assert cal.initial_threshold("auto", None) == (flashcomm.DEFAULT_SP_THRESHOLD, "auto")
        assert not records
        assert cal.initial_threshold("auto", str(bad)) == (flashcomm.DEFAULT_SP_THRESHOLD,
                                                           "auto")
        assert any("ignoring tuning table" in r.getMessage() for r in records), records
    finally:
        cal.logger.removeHandler(handler)
        torch.ops.flashcomm.clear_auto_thresholds()
        flashcomm.set_pipeline_config(*pipeline)


def test_stand_aside_only_where_nothing_is_sharded_and_vllm_all_reduces_in_shm():
    # Engine form, never sharded, vLLM's own shared-memory all-reduce: vLLM's forward.
    why = cal.stand_aside_reason("engine", 4096, 4096, "cpu-shm")
    assert why is not None and "vLLM's own forward" in why
    assert cal.stand_aside_reason("engine", 8192, 4096, "cpu-shm") is not None  # raised
    # Some batch is sharded: flashcomm stays in the path.
    assert cal.stand_aside_reason("engine", 4095, 4096, "cpu-shm") is None
    # vLLM all-reduces over gloo (its AVX2 build): flashcomm's transport is the gain.
    assert cal.stand_aside_reason("engine", 4096, 4096, "ProcessGroupGloo") is None
    # flashcomm's GEMM form: the GEMMs are flashcomm's, nothing to hand back.
    assert cal.stand_aside_reason("flashcomm", 4096, 4096, "cpu-shm") is None
