// GoogleTest of the torch-free core: shard arithmetic, chunk plans, policy, counters and
// the settings grammar.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "core/agreement.h"
#include "core/policy.h"
#include "core/settings.h"
#include "core/shard.h"
#include "core/stats.h"

using namespace flashcomm::core;

class ShardTest : public ::testing::TestWithParam<std::tuple<int64_t, int64_t>> {};

// The owned ranges of all ranks tile [0, n) in rank order and every block has c rows.
TEST_P(ShardTest, OwnedRowsTileTheTokens) {
  const auto [n, tp] = GetParam();
  const int64_t c = shard_rows(n, tp);
  EXPECT_EQ(c * tp, n + pad_rows(n, tp));
  EXPECT_GE(pad_rows(n, tp), 0);
  EXPECT_LT(pad_rows(n, tp), tp);
  int64_t next = 0;
  for (int64_t r = 0; r < tp; ++r) {
    const RowRange owned = owned_rows(n, tp, r);
    EXPECT_EQ(owned.begin, next);
    EXPECT_LE(owned.size(), c);
    EXPECT_EQ(valid_rows_in_block(n, tp, r, 0, c), owned.size());
    next = owned.end;
  }
  EXPECT_EQ(next, n);
}

// Chunks of any block partition it, and valid rows per chunk add up to the owned rows.
TEST_P(ShardTest, ChunksPartitionEveryBlock) {
  const auto [n, tp] = GetParam();
  const int64_t c = shard_rows(n, tp);
  for (int64_t max_chunks : {1, 2, 3, 4, 8}) {
    for (int64_t min_rows : {1, 16, 1000}) {
      const auto chunks = plan_chunks(c, max_chunks, min_rows);
      if (c == 0) {
        EXPECT_TRUE(chunks.empty());
        continue;
      }
      ASSERT_FALSE(chunks.empty());
      EXPECT_LE(static_cast<int64_t>(chunks.size()), max_chunks);
      int64_t next = 0;
      for (const RowRange& ch : chunks) {
        EXPECT_EQ(ch.begin, next);
        EXPECT_GE(ch.size(), 1);
        if (chunks.size() > 1) EXPECT_GE(ch.size(), min_rows);
        EXPECT_LE(ch.size() - chunks.back().size(), 1);  // balanced
        next = ch.end;
      }
      EXPECT_EQ(next, c);
      for (int64_t r = 0; r < tp; ++r) {
        int64_t sum = 0;
        for (const RowRange& ch : chunks) sum += valid_rows_in_block(n, tp, r, ch.begin, ch.end);
        EXPECT_EQ(sum, owned_rows(n, tp, r).size());
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(TokensByRanks, ShardTest,
                         ::testing::Combine(::testing::Values(0, 1, 2, 3, 5, 7, 999, 1000, 1001,
                                                              2053),
                                            ::testing::Values(1, 2, 3, 4, 8)));

TEST(Shard, KnownValues) {
  EXPECT_EQ(shard_rows(5, 4), 2);
  EXPECT_EQ(pad_rows(5, 4), 3);
  EXPECT_EQ(owned_rows(5, 4, 2), (RowRange{4, 5}));
  EXPECT_EQ(owned_rows(5, 4, 3), (RowRange{5, 5}));  // a rank owning zero rows
  EXPECT_EQ(owned_rows(0, 2, 1), (RowRange{0, 0}));
  EXPECT_EQ(valid_rows_in_block(5, 4, 2, 0, 2), 1);
}

TEST(Shard, RejectsInvalidArguments) {
  EXPECT_THROW(owned_rows(-1, 2, 0), std::invalid_argument);
  EXPECT_THROW(owned_rows(4, 2, 2), std::invalid_argument);
  EXPECT_THROW(plan_chunks(4, 0, 1), std::invalid_argument);
  EXPECT_THROW(plan_chunks(4, 1, 0), std::invalid_argument);
}

TEST(Policy, PipelinedOnlyAboveThresholdWithSeveralRanks) {
  EXPECT_EQ(choose_strategy(1001, 2, 1000, true), Strategy::kPipelined);
  EXPECT_EQ(choose_strategy(1000, 2, 1000, true), Strategy::kSequential);  // strict >
  EXPECT_EQ(choose_strategy(5000, 1, 1000, true), Strategy::kSequential);  // tp == 1
  EXPECT_EQ(choose_strategy(5000, 2, 1000, false), Strategy::kSequential);
  EXPECT_EQ(choose_strategy(1, 2, 0, true), Strategy::kPipelined);
  EXPECT_STREQ(strategy_name(Strategy::kPipelined), "pipelined");
}

TEST(Policy, ShardedOnlyAboveSpThresholdWithSeveralRanks) {
  EXPECT_EQ(choose_mode(1001, 2, 1000, true), Mode::kSharded);
  EXPECT_EQ(choose_mode(1000, 2, 1000, true), Mode::kReplicated);  // strict >
  EXPECT_EQ(choose_mode(5000, 1, 1000, true), Mode::kReplicated);
  EXPECT_EQ(choose_mode(5000, 4, 1000, false), Mode::kReplicated);
  EXPECT_STREQ(mode_name(Mode::kSharded), "sharded");
}

TEST(Stats, LayoutInvariantOpsCountModes) {
  Stats& s = Stats::instance();
  s.reset();
  s.record(OpId::kSpAddRmsNorm, Mode::kSharded);
  bool found = false;
  for (const auto& [name, count] : s.snapshot()) {
    if (name == "sp_add_rms_norm.sharded") found = (count == 1);
    EXPECT_NE(name, "sp_add_rms_norm.pipelined");
  }
  EXPECT_TRUE(found);
  s.reset();
}

TEST(Policy, AutoThresholdUsesTableThenDefault) {
  ThresholdTable::instance().clear();
  const ShapeKey key{"gemm_rs", 512, 256, 2, "float32"};
  EXPECT_EQ(resolve_threshold(-1, key), kDefaultThreshold);
  EXPECT_EQ(resolve_threshold(7, key), 7);
  ThresholdTable::instance().set(key, 321);
  EXPECT_EQ(resolve_threshold(-1, key), 321);
  EXPECT_EQ(resolve_threshold(-1, ShapeKey{"gemm_rs", 512, 256, 4, "float32"}), kDefaultThreshold);
  EXPECT_EQ(resolve_threshold(5, key), 5);  // an explicit threshold wins
  EXPECT_THROW(ThresholdTable::instance().set(key, -3), std::invalid_argument);
  ThresholdTable::instance().clear();
  EXPECT_EQ(ThresholdTable::instance().size(), 0u);
}

TEST(Policy, PipelineConfigValidates) {
  const PipelineConfig saved = pipeline_config();
  set_pipeline_config({8, 32});
  EXPECT_EQ(pipeline_config().max_chunks, 8);
  EXPECT_EQ(pipeline_config().min_chunk_rows, 32);
  EXPECT_THROW(set_pipeline_config({0, 32}), std::invalid_argument);
  set_pipeline_config(saved);
}

TEST(Stats, CountsPerOpAndStrategyAcrossThreads) {
  Stats& s = Stats::instance();
  s.reset();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) s.record(OpId::kAgGemm, Strategy::kPipelined);
    });
  }
  for (auto& t : threads) t.join();
  s.record(OpId::kGemmRsW8A8, Strategy::kSequential);
  s.record(TransportPath::kAllReduceTwoShot);
  EXPECT_EQ(s.count(OpId::kAgGemm, Strategy::kPipelined), 4000);
  EXPECT_EQ(s.count(OpId::kAgGemm, Strategy::kSequential), 0);
  EXPECT_EQ(s.count(TransportPath::kAllReduceTwoShot), 1);
  EXPECT_EQ(s.count(TransportPath::kAllReduceOneShot), 0);
  const auto snap = s.snapshot();
  EXPECT_EQ(snap.size(), 2u * static_cast<size_t>(OpId::kCount) +
                             static_cast<size_t>(TransportPath::kCount));
  int found = 0;
  for (const auto& [name, count] : snap) {
    if (name == "gemm_rs_w8a8.sequential" || name == "shm_all_reduce.two_shot") {
      ++found;
      EXPECT_EQ(count, 1) << name;
    }
  }
  EXPECT_EQ(found, 2);
  s.reset();
  EXPECT_EQ(s.count(OpId::kAgGemm, Strategy::kPipelined), 0);
  EXPECT_EQ(s.count(TransportPath::kAllReduceTwoShot), 0);
}

TEST(Agreement, NamesEveryDifferingSettingWithEachRanksValue) {
  const std::vector<Setting> settings{{"threshold", 0}, {"enabled", 0}, {"sp_threshold", 0}};
  // 3 ranks x 3 settings, row r = rank r
  const std::vector<int64_t> same{1000, 1, 64, 1000, 1, 64, 1000, 1, 64};
  EXPECT_EQ(describe_disagreement(settings, same, 3), "");
  const std::vector<int64_t> differ{1000, 1, 64, 10, 1, 64, 1000, 1, 32};
  EXPECT_EQ(describe_disagreement(settings, differ, 3),
            "'threshold': rank 0 = 1000, rank 1 = 10, rank 2 = 1000; "
            "'sp_threshold': rank 0 = 64, rank 1 = 64, rank 2 = 32");
}

TEST(Agreement, GlobalSettingsTrackBitwiseModes) {
  const bool saved = bitwise_modes();
  auto value = [] {
    for (const auto& s : global_settings())
      if (s.name == "bitwise modes FLASHCOMM_BITWISE_MODES") return s.value;
    return int64_t{-1};
  };
  set_bitwise_modes(true);
  EXPECT_EQ(value(), 1);
  set_bitwise_modes(false);
  EXPECT_EQ(value(), 0);
  set_bitwise_modes(saved);
}

TEST(Agreement, GlobalSettingsTrackConfigAndTable) {
  ThresholdTable::instance().clear();
  const auto before = global_settings();
  ThresholdTable::instance().set({"gemm_rs", 1, 2, 2, "float32"}, 5);
  const auto after = global_settings();
  ASSERT_EQ(before.size(), after.size());
  EXPECT_NE(before.back().value, after.back().value);  // the table hash changed
  EXPECT_EQ(before.front().value, after.front().value);
  EXPECT_GE(stable_hash("x"), 0);
  EXPECT_EQ(stable_hash("flashcomm"), stable_hash("flashcomm"));
  ThresholdTable::instance().clear();
}

// The settings grammar (core/settings.h; python/flashcomm/settings.py is its twin): exactly
// the boolean words in any case, bounded decimal integers, words; everything else is an
// error naming the variable, the accepted values and the value.
namespace {

std::string error_of(void (*read)()) {
  try {
    read();
  } catch (const settings::SettingError& e) {
    return e.what();
  }
  return "";
}

// Sets a variable for the lifetime of the object.
struct EnvVar {
  const char* name;
  EnvVar(const char* n, const char* value) : name(n) { setenv(n, value, 1); }
  ~EnvVar() { unsetenv(name); }
};

}  // namespace

TEST(Settings, BooleansAreExactlyTheEightWordsInAnyCase) {
  for (const char* on : {"1", "true", "TRUE", "Yes", "on", " On "}) {
    EXPECT_TRUE(settings::parse_bool("FLASHCOMM_X", on)) << on;
  }
  for (const char* off : {"0", "false", "False", "NO", "off", "OFF"}) {
    EXPECT_FALSE(settings::parse_bool("FLASHCOMM_X", off)) << off;
  }
  for (const char* bad : {"y", "2", "10", "enable", "truee", "-1", "o"}) {
    EXPECT_FALSE(settings::bool_word(bad).has_value()) << bad;
    try {
      settings::parse_bool("FLASHCOMM_X", bad);
      ADD_FAILURE() << bad << " parsed";
    } catch (const settings::SettingError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("FLASHCOMM_X must be a boolean: 1/0, true/false, yes/no or on/off"),
                std::string::npos)
          << msg;
      EXPECT_NE(msg.find(std::string("got '") + bad + "'"), std::string::npos) << msg;
    }
  }
}

TEST(Settings, UnsetOrBlankIsTheDefault) {
  unsetenv("FC_GTEST_SETTING");
  EXPECT_TRUE(settings::env_bool("FC_GTEST_SETTING", true));
  EXPECT_EQ(settings::env_int("FC_GTEST_SETTING", 7, 0, 10, "n"), 7);
  EXPECT_FALSE(settings::env_auto_bool("FC_GTEST_SETTING").has_value());
  EnvVar blank("FC_GTEST_SETTING", "  ");
  EXPECT_FALSE(settings::env_bool("FC_GTEST_SETTING", false));
  EXPECT_FALSE(settings::env_word("FC_GTEST_SETTING", {"a"}).has_value());
}

TEST(Settings, IntegersAreDecimalAndBounded) {
  EXPECT_EQ(settings::parse_int("V", "42", 0, 100, "a count"), 42);
  EXPECT_EQ(settings::parse_int("V", " -1 ", -1, 100, "a count"), -1);
  for (const char* bad : {"", "5ms", "0x10", "1e3", "101", "-2", "99999999999999999999", "4 2"}) {
    try {
      settings::parse_int("V", bad, -1, 100, "a count");
      ADD_FAILURE() << bad << " parsed";
    } catch (const settings::SettingError& e) {
      EXPECT_EQ(std::string(e.what()),
                std::string("V must be a count (an integer in [-1, 100]), got '") + bad + "'");
    }
  }
}

TEST(Settings, WordsAndAutoBooleans) {
  EXPECT_EQ(settings::parse_word("V", "SUM", {"gemm", "sum"}), 1u);
  EXPECT_FALSE(settings::parse_auto_bool("V", "Auto").has_value());
  EXPECT_EQ(settings::parse_auto_bool("V", "off"), std::optional<bool>(false));
  EXPECT_EQ(settings::parse_auto_bool("V", "yes"), std::optional<bool>(true));
  EnvVar bad_word("FC_GTEST_SETTING", "gem");
  EXPECT_EQ(error_of([] { settings::env_word("FC_GTEST_SETTING", {"gemm", "sum"}); }),
            "FC_GTEST_SETTING must be one of 'gemm', 'sum', got 'gem'");
  EXPECT_NE(error_of([] { settings::env_auto_bool("FC_GTEST_SETTING"); })
                .find("must be 'auto' or a boolean"),
            std::string::npos);
}
