// Rank agreement on everything that steers a collective pattern. Torch-free.
//
// Why: if one rank takes a different collective path (other threshold, other
// chunking, other tuning table), every rank hangs. So at a group's first use
// (and at an explicit flashcomm.init) the ranks exchange these settings and a
// difference becomes the same clear error on every rank instead.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <flashcomm/version.h>

namespace flashcomm::core {

using ::flashcomm::kVersion;  // flashcomm/version.h, generated from pyproject.toml

struct Setting {
  std::string name;
  int64_t value = 0;
};

// 63-bit FNV-1a hash (non-negative, so it survives an int64 round trip).
int64_t stable_hash(const std::string& text);

// The process-wide settings: library version, pipeline chunking, and the
// tuning table's contents (as a hash).
std::vector<Setting> global_settings();

// values_by_rank: world rows of settings.size() values each (row r = rank r).
// Returns "" when every rank holds the same values, else a message naming each
// differing setting with every rank's value (identical text on every rank).
std::string describe_disagreement(const std::vector<Setting>& settings,
                                  const std::vector<int64_t>& values_by_rank, int64_t world);

}  // namespace flashcomm::core
