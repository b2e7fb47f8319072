// C++ CPU backend of the fused SigLIP loss, O(N d) memory, OpenMP.
//
// One translation unit with the CLIP backend: clip_loss_cpu.cpp is included
// here (setup.py compiles this file in its place) so that SigLIP runs on its
// tile machinery, which lives in that file's unnamed namespace: the
// overflow-safe inverse norms, the huge-row tile operands and per-thread tile
// buffers, dot / axpy and the backward's two passes with the normalisation
// backward. A fix to any of them covers both losses, and neither file
// repeats the other.
//
// Forward: row blocks over threads, each summing -logsigmoid(z L) over its
// tiles into one partial per row block, summed in order at the end (no
// statistics: nothing but the inverse norms survives to the backward).
// Backward: CLIP's backward_passes with SiglipRule, whose weights
// w = N dloss/dL = -z sigmoid(-z L) come from siglip_math.h instead of the
// softmax statistics, and which also sums w for the bias gradient.
#include "cpu/clip_loss_cpu.cpp"

#include "clipfast/siglip_math.h"
#include "cpu/siglip_cpu.h"

namespace clipfast {
namespace cpu {
namespace {

// The positive pair's column within a tile starting at column j0 (outside
// [0, width) when the row has none there, -1 without positives).
inline int64_t positive_column(bool positives, int64_t i, int64_t j0) {
  return positives ? i - j0 : -1;
}

// out[j] = pair(L_j, z_j) over one tile row, z = +1 only at `positive`: the
// simd loop takes every pair as a negative and the positive is redone after
// it, so the loop tests nothing per pair.
template <typename T, typename Pair>
inline void siglip_row(const T* logits, int64_t width, int64_t positive, T* out, Pair pair) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) out[j] = pair(logits[j], false);
  if (positive >= 0 && positive < width) out[positive] = pair(logits[positive], true);
}

// Weights of one tile row: out[j] = -z sigmoid(-z L).
template <typename T>
CLIPFAST_DISPATCH void siglip_weights_row(const T* logits, int64_t width, int64_t positive,
                                          T* out) {
  siglip_row(logits, width, positive, out,
             [](T logit, bool z) { return siglip_grad_weight(logit, z); });
}

// sum_j -logsigmoid(z L) of one tile row, summed in fp64: the terms are all
// positive, so fp32 sums drift by an ulp per few terms (past the plain
// reference's pairwise sums); terms is scratch of width.
template <typename T>
CLIPFAST_DISPATCH double siglip_loss_row(const T* logits, int64_t width, int64_t positive,
                                         T* terms) {
  siglip_row(logits, width, positive, terms,
             [](T logit, bool z) { return siglip_pair_loss(logit, z); });
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < width; ++j) sum += static_cast<double>(terms[j]);
  return sum;
}

// Adds sum_j w_j cos_j and sum_j w_j of one tile row to the fp64 sums (the
// weights of negatives share a sign: as for the loss, fp32 sums would drift).
template <typename T>
CLIPFAST_DISPATCH void add_weight_sums(const T* weights, const T* cosines, int64_t width,
                                       WeightSums& sums) {
  double wc = 0.0, w = 0.0;
#pragma omp simd reduction(+ : wc, w)
  for (int64_t j = 0; j < width; ++j) {
    wc += static_cast<double>(weights[j]) * static_cast<double>(cosines[j]);
    w += static_cast<double>(weights[j]);
  }
  sums.weight_cosine += wc;
  sums.weight += w;
}

// SigLIP's rule for backward_passes: w = N dloss/dL = -z sigmoid(-z L).
template <typename T>
struct SiglipRule {
  bool positives;

  void row_weights(const T* logits, int64_t width, int64_t i, int64_t j0, T* out) const {
    siglip_weights_row(logits, width, positive_column(positives, i, j0), out);
  }

  void add_sums(const T* weights, const T* cosines, int64_t width, WeightSums& sums) const {
    add_weight_sums(weights, cosines, width, sums);
  }
};

}  // namespace

template <typename T>
double siglip_forward(Problem<T>& p, bool positives) {
  const int64_t n = p.n;
  fill_inverse_norms(p);
  // One partial per row block (fp64 across tiles), summed in order.
  std::vector<double> block_loss(static_cast<size_t>(row_blocks(n)), 0.0);
#pragma omp parallel
  {
    TileWork<T> work;
#pragma omp for schedule(dynamic)
    for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
      const int64_t i1 = std::min(n, i0 + kBlockRows);
      double sum = 0.0;
      for (int64_t j0 = 0; j0 < n; j0 += kBlockCols) {
        const int64_t j1 = std::min(n, j0 + kBlockCols), width = work.compute(p, i0, i1, j0, j1);
        for (int64_t i = i0; i < i1; ++i) {
          sum += siglip_loss_row(work.logits.data() + (i - i0) * width, width,
                                 positive_column(positives, i, j0), work.row.data());
        }
      }
      block_loss[i0 / kBlockRows] = sum;
    }
  }
  return sum_in_order(block_loss) / static_cast<double>(n);
}

template <typename T>
SiglipSums siglip_backward(const Problem<T>& p, bool positives, T grad_loss, T* grad_x,
                           T* grad_y, bool need_x, bool need_y, bool need_sums) {
  const T coef = grad_loss / T(p.n);
  const WeightSums sums = backward_passes(p, SiglipRule<T>{positives}, coef * p.scale, grad_x,
                                          grad_y, need_x, need_y, need_sums);
  const double scaled = static_cast<double>(grad_loss) / static_cast<double>(p.n);
  return SiglipSums{sums.weight_cosine * scaled, sums.weight * scaled};
}

template double siglip_forward<float>(Problem<float>&, bool);
template double siglip_forward<double>(Problem<double>&, bool);
template SiglipSums siglip_backward<float>(const Problem<float>&, bool, float, float*, float*,
                                           bool, bool, bool);
template SiglipSums siglip_backward<double>(const Problem<double>&, bool, double, double*,
                                            double*, bool, bool, bool);

}  // namespace cpu
}  // namespace clipfast
