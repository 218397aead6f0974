// A gate policy without backward() must be rejected with a message naming the missing member.
#include <grun/gate/linear.hpp>
#include <grun/intervention.hpp>
#include <grun/reft/loreft.hpp>

struct half_gate {
  static constexpr const char* name = "test::half_gate";
  template <class T, class Space = grun::host_space>
  struct params { grun::param<T, Space> weight; };
  static constexpr std::array<std::string_view, 1> param_names{"weight"};
  template <class T, class S> static void shape(params<T, S>& p, grun::index_t d) { grun::set_matrix(p.weight, 1, d); }
  static constexpr grun::index_t scratch_size(grun::index_t) { return 0; }
  template <class Acc, class P> static Acc forward(const P&, const Acc*, grun::index_t, Acc*) { return Acc(1); }
#ifdef GRUN_FAILTEST_CONTROL
  template <class Acc, class P, class G>
  static void backward(const P&, const G&, const Acc*, grun::index_t, Acc*, Acc, Acc, Acc*) {}
#endif
};

using unlearner = grun::gated_intervention<half_gate, grun::reft::loreft<4>>;
unlearner::params<float> p = unlearner::shape<float>(8);
