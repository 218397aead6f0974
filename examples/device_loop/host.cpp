// The training loop of train.hpp on exec::host: the reference the CUDA run (device.cu) is read against.
#include "train.hpp"

int main() {
  const device_loop::problem pb;
  device_loop::host_backend be;
  return device_loop::report("host", device_loop::train(be, pb)) ? 0 : 1;
}
