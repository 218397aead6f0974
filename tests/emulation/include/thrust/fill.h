#pragma once
// Emulation shim (tests/emulation): grun includes <thrust/fill.h> with device_vector; nothing of it
// is used on the emulated paths.
#include <thrust/device_vector.h>
