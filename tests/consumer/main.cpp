// Built against an *installed* grun via find_package(grun CONFIG REQUIRED).
#include <grun/grun.hpp>

#include <cstdio>

int main() {
  grun::host_matrix<float> h(2, 8);
  for (grun::index_t i = 0; i < 2 * 8; ++i) h.storage[i] = 0.25f * static_cast<float>(i % 5);
  std::printf("consumer: grun %s, %lld elements\n", GRUN_VERSION_STRING, static_cast<long long>(h.storage.size()));
  return 0;
}
