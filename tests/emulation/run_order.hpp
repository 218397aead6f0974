#pragma once
// tests/emulation/run_order.hpp — the order the emulation's scheduler runs threads and CTAs in
// (runtime.cpp). Nothing on a device orders a CTA's threads between two barriers, or a grid's CTAs;
// a kernel whose result depends on that order has a race, and a fixed order hides it whenever the
// writer happens to run first. So the order varies:
//
//   alternate (the default)  in CTA c, round n (the fibers' runs between two barrier openings) goes
//                            in thread order when c + n is even and in reverse when odd; CTAs in order.
//                            Every barrier interval runs both ways in a grid of two or more CTAs.
//   forward | reverse        thread order in every round (reverse: and the CTAs from the last).
//   shuffle[:seed]           a fresh permutation of the ready fibers every round, and of the CTAs
//                            every launch, drawn from seed (0 by default) and the launch's number:
//                            a run repeats.
//
// GRUN_EMU_ORDER=alternate|forward|reverse|shuffle[:seed] chooses at start-up (anything else stops
// the program, naming what it expected); set_order, for the emulation's own tests.
namespace grun_emu {

struct run_order {
  enum mode_t { alternate, forward, reverse, shuffle } mode = alternate;
  unsigned long long seed = 0;
};
run_order order();
void set_order(run_order o);

}  // namespace grun_emu
