/* Fused matrix-free hex8 apply on the CPU (solver/native.py builds and loads it). */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REAL float
#define SUF f32
#include "hex8_impl.h"
#undef REAL
#undef SUF

#define REAL double
#define SUF f64
#include "hex8_impl.h"
#undef REAL
#undef SUF
