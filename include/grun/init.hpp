#pragma once
// grun/init.hpp — seeded, platform-independent initialization of intervention parameters.
//
// The generator is our own (splitmix64 seeding xoshiro256**, Box–Muller normals) rather than
// <random>'s distributions, whose algorithms differ between libstdc++, libc++ and MSVC: the same
// seed gives the same integers everywhere, and the same normals wherever std::log / std::sqrt /
// std::cos are correctly rounded (glibc, musl, macOS libm in practice).
//
// Gate and ReFT draw from separate streams of the seed, so swapping the gate policy does not change
// the ReFT initialization (useful for ablations).
#include <cmath>
#include <cstdint>
#include <numbers>

#include "concepts.hpp"

namespace grun {

template <class I, class T, class Space> struct module_params;

/// xoshiro256** (Blackman & Vigna 2018), seeded through splitmix64.
class rng {
 public:
  explicit rng(std::uint64_t seed, std::uint64_t stream = 0) {
    std::uint64_t x = seed ^ (0x9e3779b97f4a7c15ull * (stream + 1));
    for (auto& s : s_) s = splitmix64(x);
  }
  std::uint64_t next() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0]; s_[3] ^= s_[1]; s_[1] ^= s_[2]; s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
  /// Standard normal by Box–Muller (both values of each pair are used).
  double normal() {
    if (has_spare_) { has_spare_ = false; return spare_; }
    const double u1 = 1.0 - uniform();  // (0, 1]: log never sees 0
    const double u2 = uniform();
    const double rad = std::sqrt(-2.0 * std::log(u1));
    const double ang = 2.0 * std::numbers::pi * u2;
    spare_ = rad * std::sin(ang);
    has_spare_ = true;
    return rad * std::cos(ang);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix64(std::uint64_t& x) {
    std::uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  std::uint64_t s_[4];
  double spare_ = 0;
  bool has_spare_ = false;
};

namespace detail {
/// Fallback for user policies without an init(): matrices ~ N(0, 1/cols), vectors 0.
template <class P>
void default_init(const P& p, rng& g) {
  auto copy = p;
  for_each_param(copy, [&](auto& leaf) {
    using T = typename std::remove_cvref_t<decltype(leaf)>::value_type;
    const double sd = leaf.is_vector ? 0.0 : 1.0 / std::sqrt(double(leaf.cols > 0 ? leaf.cols : 1));
    for (index_t i = 0; i < leaf.size(); ++i) leaf[i] = store<T>(sd * g.normal());
  });
}
template <class Policy, class P>
void init_policy(const P& p, rng& g) {
  if constexpr (requires { Policy::init(p, g); }) Policy::init(p, g);
  else default_init(p, g);
}
}  // namespace detail

/// Initializes a module's parameters (host memory) deterministically from `seed`:
///   gate   as its policy documents (gate::linear / mlp: initial g ≈ 0.5)
///   reft   R orthonormal rows (Gaussian then QR), W ~ N(0, 1/d), b = 0 (see each policy)
///   ortho  a parametrization (householder) re-draws its raw tensor (Gaussian v_k)
template <class I, class T, class S>
void init(const module_params<I, T, S>& p, std::uint64_t seed) {
  static_assert(std::is_same_v<S, host_space>, "grun::init: initializes host parameters; copy them to the device after");
  using Gate = typename I::gate_type;
  using Reft = typename I::reft_type;
  using Ortho = typename I::ortho_type;
  rng gate_rng(seed, 0), reft_rng(seed, 1), ortho_rng(seed, 2);
  detail::init_policy<Gate>(p.gate, gate_rng);
  detail::init_policy<Reft>(p.reft, reft_rng);
  if constexpr (Ortho::is_parametrization) {
    if constexpr (requires { Ortho::init(Reft::rotation(p.reft), ortho_rng); })
      Ortho::init(Reft::rotation(p.reft), ortho_rng);
  }
}

}  // namespace grun
