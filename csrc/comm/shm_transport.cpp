#include "comm/shm_transport.h"

#include <cstdlib>
#include <string>

namespace flashcomm::comm {

int64_t shm_bytes_from_env() {
  const char* v = std::getenv("FLASHCOMM_SHM_BYTES");
  if (v == nullptr || v[0] == '\0') return kDefaultShmBytes;
  char* end = nullptr;
  const long long bytes = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && bytes >= (64 << 10), "FLASHCOMM_SHM_BYTES must be an "
              "integer number of bytes >= 65536, got '", v, "'");
  return bytes;
}

std::unique_ptr<Transport> try_make_shm_transport(const Group& group, const at::Device& device,
                                                  bool required, int64_t shm_bytes) {
  TORCH_CHECK(!required, "flashcomm: shm transport not built yet");
  return nullptr;
}

}  // namespace flashcomm::comm
