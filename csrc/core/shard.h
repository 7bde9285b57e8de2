// Token-shard arithmetic shared by every op. Torch-free; unit-tested in
// tests/cpp/test_core.cpp.
//
// Compact layout: n global token rows are split over tp ranks in blocks of
// c = ceil(n / tp) rows. Rank r holds global rows [r*c, r*c + c); the rows at
// or past n are zero padding. Every quantity here depends only on (n, tp, ...)
// which are identical on every rank, so all ranks derive the same plan and
// issue the same collectives in the same order.
#pragma once

#include <cstdint>
#include <vector>

namespace flashcomm::core {

// ceil(a / b) for a >= 0, b > 0.
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per rank block: c = ceil(n / tp).
constexpr int64_t shard_rows(int64_t n, int64_t tp) { return ceil_div(n, tp); }

// Zero rows appended to make n divisible into tp blocks of shard_rows(n, tp).
constexpr int64_t pad_rows(int64_t n, int64_t tp) { return shard_rows(n, tp) * tp - n; }

// Half-open range of global rows.
struct RowRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const RowRange& o) const { return begin == o.begin && end == o.end; }
};

// Global rows of rank r that hold real tokens: [r*c, min(n, r*c + c)).
// Empty (begin == end) for ranks whose whole block is padding (e.g. n=5, tp=4,
// rank 3 owns rows [6, 5) -> clamped to [5, 5)).
RowRange owned_rows(int64_t n, int64_t tp, int64_t rank);

// Number of real (non-padding) rows in the slice [block_begin, block_end) of
// rank r's block, i.e. |[r*c + block_begin, r*c + block_end) ∩ [0, n)|.
int64_t valid_rows_in_block(int64_t n, int64_t tp, int64_t rank, int64_t block_begin,
                            int64_t block_end);

// Pipelined kernels split each rank's block of c rows into chunks; chunk i
// covers block rows [chunks[i].begin, chunks[i].end) of *every* rank's block,
// so one collective per chunk moves the matching slice of all blocks.
// Invariants: chunks are contiguous, cover [0, c) exactly, every chunk has at
// least one row, there are at most max_chunks of them, and (unless c is
// smaller) each has at least min_chunk_rows rows.
std::vector<RowRange> plan_chunks(int64_t c, int64_t max_chunks, int64_t min_chunk_rows);

}  // namespace flashcomm::core
