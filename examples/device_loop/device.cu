// The training loop of train.hpp on exec::cuda — forward, every loss, backward, AdamW and the QR
// retraction all on the device — then the same loop on exec::host, side by side.
// Exit 77 (ctest: Skipped) without a CUDA device.
#include <grun/cuda/intervention.cuh>
#include <grun/cuda/losses.cuh>
#include <grun/cuda/optim.cuh>

#include "train.hpp"

namespace {
namespace gc = grun::cuda;

struct cuda_backend {
  using space = grun::cuda_space;
  grun::exec::cuda_t ex = grun::exec::cuda;

  gc::device_buffer<float> upload(const grun::buffer<float>& x, grun::index_t, grun::index_t) {
    return gc::device_buffer<float>(x.span());
  }
  gc::device_buffer<float> zeros(grun::index_t r, grun::index_t c) { return gc::device_buffer<float>(r * c); }
  std::vector<float> download(const gc::device_buffer<float>& x, grun::index_t n) {
    auto v = x.to_host();
    v.resize(std::size_t(n));
    return v;
  }
  template <class P>
  gc::device_params<P> upload_params(const grun::owned_params<device_loop::unlearner::params<float>>& init, grun::index_t d) {
    gc::device_params<P> p(device_loop::unlearner::shape<float, grun::cuda_space>(d));
    GRUN_CUDA_CHECK(cudaMemcpy(p.data(), init.data(), sizeof(float) * std::size_t(init.size()), cudaMemcpyHostToDevice));
    return p;
  }
  template <class P>
  gc::device_params<P> zero_params(grun::index_t d) {
    return gc::device_params<P>(device_loop::unlearner::shape<float, grun::cuda_space>(d));
  }
  template <class P>
  gc::adamw<P> optimizer(const P& shape, grun::optim::adamw_options o) { return gc::adamw<P>(shape, o); }
  template <class O, class P>
  void step(O& opt, const P& p, const P& g) { opt.step(ex, p, g); }
};

}  // namespace

int main() {
  if (!gc::device_available()) {
    std::printf("device_loop_cuda: SKIPPED — no CUDA device\n");
    return 77;
  }
  try {
    const device_loop::problem pb;
    cuda_backend dev;
    device_loop::host_backend host;
    const auto dlog = device_loop::train(dev, pb);
    const auto hlog = device_loop::train(host, pb);
    const bool ok = device_loop::report("cuda", dlog) & device_loop::report("host", hlog);
    double worst = 0;
    for (std::size_t i = 0; i < dlog.size(); ++i)
      worst = std::fmax(worst, std::fabs(dlog[i].total - hlog[i].total) / std::fmax(std::fabs(hlog[i].total), 1e-30));
    std::printf("cuda vs host: largest relative difference of the loss over %zu steps: %.2e\n", dlog.size(), worst);
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "device_loop_cuda: %s\n", e.what());
    return 1;
  }
}
