// grun::torch_kinds: the runtime kinds of gate family grun::gate::always (3 refts × 6 ranks), instantiated once.
// One gate family per translation unit so the three build in parallel (see grun/adapters/torch_kinds.hpp).
#include <grun/adapters/torch_kinds_impl.hpp>

GRUN_INSTANTIATE_TORCH_KINDS(grun::gate::always)
