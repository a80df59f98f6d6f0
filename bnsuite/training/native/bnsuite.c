/* bnsuite's native library, one translation unit (bnsuite/training/fused.py compiles this file): the shared loops and
 * torch's BLAS (common.h), the MLP family's fused step (mlp.c) and the ConvNet's (cnn.c). */
#include "common.h"
#include "mlp.c"
#include "cnn.c"
