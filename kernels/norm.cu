// (being written)
#include "common.cuh"
