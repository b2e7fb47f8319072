// C++ CPU backend of the fused SigLIP loss (see siglip_cpu.cpp).
#pragma once

#include "cpu/clip_loss_cpu.h"

namespace clipfast {
namespace cpu {

// Fills p.inv_x, p.inv_y; returns -sum_ij logsigmoid(z_ij L_ij) / n, z = +1 on
// (i, i) when `positives`, -1 elsewhere.
template <typename T>
double siglip_forward(Problem<T>& p, bool positives);

// dL/dscale = grad_loss / n * sum_ij w_ij cos_ij and dL/dbias = grad_loss / n
// * sum_ij w_ij, with w = n * dloss/dL_ij.
struct SiglipSums {
  double scale;
  double bias;
};

// Writes dL/dx, dL/dy (times grad_loss) where asked, from the inverse norms
// the forward left in p; returns the scalar gradients when need_sums (else
// zeros).
template <typename T>
SiglipSums siglip_backward(const Problem<T>& p, bool positives, T grad_loss, T* grad_x,
                           T* grad_y, bool need_x, bool need_y, bool need_sums);

}  // namespace cpu
}  // namespace clipfast
