// Per-element arithmetic of the fused SigLIP loss, shared by the C++ CPU
// backend and the CUDA kernels (as tile_math.h is for CLIP's): the logits
// themselves come from tile_math.h's pair_logit, so both losses see the same
// cosines and logits bit for bit.
//
// With z = +1 on a positive pair and -1 elsewhere, a pair contributes
// -logsigmoid(z L) to N * loss and -z sigmoid(-z L) to N * dloss/dL. Both are
// written through exp(-|t|), which never overflows, so |L| in the hundreds
// (scale 100, bias +-10 and beyond) stays finite and exact.
#pragma once

#include <cmath>

#include "clipfast/tile_math.h"

namespace clipfast {

#if !defined(__CUDACC__)
using std::exp;
using std::fabs;
using std::log1p;
#endif

// -logsigmoid(z L) = max(-z L, 0) + log1p(exp(-|z L|)). The max is a compare
// rather than fmax, and a NaN logit reaches log1p, so NaN stays NaN.
template <typename T>
CLIPFAST_HD T siglip_pair_loss(T logit, bool positive) {
  const T t = positive ? logit : -logit;
  return (t < T(0) ? -t : T(0)) + log1p(exp(-fabs(t)));
}

// N * dloss/dL = -z sigmoid(-z L), in [-1, 1]: sigmoid(u) = 1 / (1 + e) for
// u >= 0 and e / (1 + e) below, e = exp(-|u|), each side free of overflow and
// of cancellation. A NaN logit fails u >= 0 and gives NaN.
template <typename T>
CLIPFAST_HD T siglip_grad_weight(T logit, bool positive) {
  const T u = positive ? -logit : logit;
  const T e = exp(-fabs(u));
  const T sigmoid = (u >= T(0) ? T(1) : e) / (T(1) + e);
  return positive ? -sigmoid : sigmoid;
}

}  // namespace clipfast
