// gated_intervention on exec::cuda without the CUDA kernels must fail with a clean static_assert.
#include <grun/gate/linear.hpp>
#include <grun/intervention.hpp>
#include <grun/reft/loreft.hpp>

using unlearner = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;

#ifdef GRUN_FAILTEST_CONTROL
using exec_t = grun::exec::host_t;
using space = grun::host_space;
#else
using exec_t = grun::exec::cuda_t;
using space = grun::cuda_space;
#endif

void apply(const unlearner::params<float, space>& p, grun::matrix_view<const float, space> h,
           grun::matrix_view<float, space> out, grun::vector_view<float, space> gates) {
  unlearner::forward(exec_t{}, p, h, grun::positions::all(h.extent(0)), out, gates);
}
