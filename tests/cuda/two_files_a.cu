// Every CUDA header of grun in two .cu files of one program (this one and two_files_b.cu). It links
// only if nothing in them is defined outside a template or `inline` — a plain __global__ function or
// variable in a header is defined again in each file that includes it — which is what a program of
// several .cu files that include grun needs. (Until 2026-12-07 every test program was one .cu file,
// and the mlp gate's one plain kernel went unnoticed.) Runs nothing on a device.
#include "two_files.hpp"

int main() { return grun_two_files_b() == 2 ? 0 : 1; }
