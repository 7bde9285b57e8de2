#include "core/shard.h"

#include <algorithm>
#include <stdexcept>

namespace flashcomm::core {

RowRange owned_rows(int64_t n, int64_t tp, int64_t rank) {
  if (n < 0 || tp <= 0 || rank < 0 || rank >= tp) {
    throw std::invalid_argument("owned_rows: need n >= 0, tp > 0, 0 <= rank < tp");
  }
  const int64_t c = shard_rows(n, tp);
  const int64_t begin = std::min(n, rank * c);
  const int64_t end = std::min(n, rank * c + c);
  return {begin, end};
}

int64_t valid_rows_in_block(int64_t n, int64_t tp, int64_t rank, int64_t block_begin,
                            int64_t block_end) {
  const RowRange owned = owned_rows(n, tp, rank);
  const int64_t c = shard_rows(n, tp);
  const int64_t begin = std::max(owned.begin, rank * c + block_begin);
  const int64_t end = std::min(owned.end, rank * c + block_end);
  return std::max<int64_t>(0, end - begin);
}

std::vector<RowRange> plan_chunks(int64_t c, int64_t max_chunks, int64_t min_chunk_rows) {
  if (c < 0 || max_chunks <= 0 || min_chunk_rows <= 0) {
    throw std::invalid_argument("plan_chunks: need c >= 0, max_chunks > 0, min_chunk_rows > 0");
  }
  std::vector<RowRange> chunks;
  if (c == 0) return chunks;
  const int64_t count = std::max<int64_t>(1, std::min(max_chunks, c / min_chunk_rows));
  // Spread the remainder over the first chunks so sizes differ by at most one.
  const int64_t base = c / count;
  const int64_t extra = c % count;
  int64_t begin = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t size = base + (i < extra ? 1 : 0);
    chunks.push_back({begin, begin + size});
    begin += size;
  }
  return chunks;
}

}  // namespace flashcomm::core
