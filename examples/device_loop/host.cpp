// The training loop of train.hpp on exec::host: the reference the CUDA run (device.cu) is read against.
#include "train.hpp"

namespace {
struct host_backend {
  using space = grun::host_space;
  grun::exec::host_t ex = grun::exec::host;

  grun::buffer<float> upload(const grun::buffer<float>& x, grun::index_t, grun::index_t) { return x; }
  grun::buffer<float> zeros(grun::index_t r, grun::index_t c) { return grun::buffer<float>(r * c); }
  std::vector<float> download(const grun::buffer<float>& x, grun::index_t n) {
    return std::vector<float>(x.data(), x.data() + n);
  }
  template <class P>
  grun::owned_params<P> upload_params(const grun::owned_params<P>& init, grun::index_t) { return init; }
  template <class P>
  grun::owned_params<P> zero_params(grun::index_t d) { return grun::owned_params<P>(device_loop::unlearner::shape<float>(d)); }
  template <class P>
  grun::optim::adamw<P> optimizer(const P& shape, grun::optim::adamw_options o) { return grun::optim::adamw<P>(shape, o); }
  template <class O, class P>
  void step(O& opt, const P& p, const P& g) { opt.step(p, g); }
};
}  // namespace

int main() {
  const device_loop::problem pb;
  host_backend be;
  return device_loop::report("host", device_loop::train(be, pb)) ? 0 : 1;
}
