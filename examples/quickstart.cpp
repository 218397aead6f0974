#include <grun/core/params.hpp>
int main(){return 0;}
