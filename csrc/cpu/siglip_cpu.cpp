// C++ CPU backend of the fused SigLIP loss, O(N d) memory, OpenMP.
//
// One translation unit with the CLIP backend: clip_loss_cpu.cpp is included
// here (setup.py compiles this file in its place) so that SigLIP calls its
// tile helpers, which live in that file's unnamed namespace: the
// overflow-safe inverse norms, the huge-row tile operands, tile_logits,
// dot / axpy and the normalisation backward. A fix to any of them covers
// both losses, and neither file repeats the other.
//
// Forward: row blocks over threads, each summing -logsigmoid(z L) over its
// tiles into one partial per row block, summed in order at the end (no
// statistics: nothing but the inverse norms survives to the backward).
// Backward: as CLIP's, the tiles recomputed twice, by row blocks for dX^ and
// the scale and bias sums, by column blocks for dY^, so no thread shares an
// output row; the weights w = N dloss/dL = -z sigmoid(-z L) come from
// siglip_math.h instead of the softmax statistics.
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

// Weights of one tile row: out[j] = -z sigmoid(-z L), z = +1 at `positive`.
template <typename T>
CLIPFAST_DISPATCH void siglip_weights_row(const T* logits, int64_t width, int64_t positive,
                                          T* out) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) out[j] = siglip_grad_weight<T>(logits[j], false);
  if (positive >= 0 && positive < width) out[positive] = siglip_grad_weight<T>(logits[positive], true);
}

// sum_j -logsigmoid(z L) of one tile row, summed in fp64: the terms are all
// positive, so fp32 sums drift by an ulp per few terms (past the plain
// reference's pairwise sums); terms is scratch of width.
template <typename T>
CLIPFAST_DISPATCH double siglip_loss_row(const T* logits, int64_t width, int64_t positive,
                                         T* terms) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) terms[j] = siglip_pair_loss<T>(logits[j], false);
  if (positive >= 0 && positive < width) terms[positive] = siglip_pair_loss<T>(logits[positive], true);
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < width; ++j) sum += static_cast<double>(terms[j]);
  return sum;
}

// Adds sum_j w_j cos_j and sum_j w_j of one tile row to the fp64 sums (the
// weights of negatives share a sign: as for the loss, fp32 sums would drift).
template <typename T>
CLIPFAST_DISPATCH void add_weight_sums(const T* weights, const T* cosines, int64_t width,
                                       double& weight_cosine, double& weight) {
  double wc = 0.0, w = 0.0;
#pragma omp simd reduction(+ : wc, w)
  for (int64_t j = 0; j < width; ++j) {
    wc += static_cast<double>(weights[j]) * static_cast<double>(cosines[j]);
    w += static_cast<double>(weights[j]);
  }
  weight_cosine += wc;
  weight += w;
}

int64_t row_blocks(int64_t n) { return (n + kBlockRows - 1) / kBlockRows; }

double sum_in_order(const std::vector<double>& parts) {
  double total = 0.0;
  for (double part : parts) total += part;
  return total;
}

}  // namespace

template <typename T>
double siglip_forward(Problem<T>& p, bool positives) {
  const int64_t n = p.n;
  inverse_norms(p.x, n, p.d, p.normalize, p.inv_x);
  inverse_norms(p.y, n, p.d, p.normalize, p.inv_y);
  // One partial per row block (fp64 across tiles), summed in order:
  // reproducible whatever the thread schedule.
  std::vector<double> block_loss(static_cast<size_t>(row_blocks(n)), 0.0);
#pragma omp parallel
  {
    std::vector<T> tile(kBlockRows * kBlockCols), cosines(kBlockRows * kBlockCols);
    std::vector<T> terms(kBlockCols);
    TileOperands<T> ops;
#pragma omp for schedule(dynamic)
    for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
      const int64_t i1 = std::min(n, i0 + kBlockRows);
      double sum = 0.0;
      for (int64_t j0 = 0; j0 < n; j0 += kBlockCols) {
        const int64_t j1 = std::min(n, j0 + kBlockCols), width = j1 - j0;
        ops.prepare(p, i0, i1, j0, j1);
        tile_logits(p, ops, i0, i1, j0, j1, tile.data(), cosines.data());
        for (int64_t i = i0; i < i1; ++i) {
          sum += siglip_loss_row(tile.data() + (i - i0) * width, width,
                                 positive_column(positives, i, j0), terms.data());
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
  const int64_t n = p.n, d = p.d;
  const T coef = grad_loss / T(n);
  const T factor = coef * p.scale;
  std::vector<double> block_weight_cosine(static_cast<size_t>(row_blocks(n)), 0.0);
  std::vector<double> block_weight(static_cast<size_t>(row_blocks(n)), 0.0);

  // Pass 1, by row blocks: dX^ rows (complete within one thread) and the sums.
  if (need_x || need_sums) {
#pragma omp parallel
    {
      std::vector<T> tile(kBlockRows * kBlockCols), cosines(kBlockRows * kBlockCols);
      std::vector<T> weights(kBlockCols);
      TileOperands<T> ops;
#pragma omp for schedule(dynamic)
      for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
        const int64_t i1 = std::min(n, i0 + kBlockRows);
        if (need_x) std::fill(grad_x + i0 * d, grad_x + i1 * d, T(0));
        double weight_cosine = 0.0, weight = 0.0;
        for (int64_t j0 = 0; j0 < n; j0 += kBlockCols) {
          const int64_t j1 = std::min(n, j0 + kBlockCols), width = j1 - j0;
          ops.prepare(p, i0, i1, j0, j1);
          tile_logits(p, ops, i0, i1, j0, j1, tile.data(), cosines.data());
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t at = (i - i0) * width;
            siglip_weights_row(tile.data() + at, width, positive_column(positives, i, j0),
                               weights.data());
            if (need_sums)
              add_weight_sums(weights.data(), cosines.data() + at, width, weight_cosine, weight);
            if (need_x) {
              T* gx = grad_x + i * d;
              for (int64_t j = j0; j < j1; ++j)
                axpy(weights[j - j0] * ops.inv_y[j - j0], ops.y + (j - j0) * d, gx, d);
            }
          }
        }
        block_weight_cosine[i0 / kBlockRows] = weight_cosine;
        block_weight[i0 / kBlockRows] = weight;
        if (need_x) {
          for (int64_t i = i0; i < i1; ++i)
            finish_row(grad_x + i * d, p.x + i * d, p.inv_x[i], factor, p.normalize, d);
        }
      }
    }
  }

  // Pass 2, by column blocks: dY^ rows, recomputing the same tiles.
  if (need_y) {
#pragma omp parallel
    {
      std::vector<T> tile(kBlockRows * kBlockCols), cosines(kBlockRows * kBlockCols);
      std::vector<T> weights(kBlockCols);
      TileOperands<T> ops;
#pragma omp for schedule(dynamic)
      for (int64_t j0 = 0; j0 < n; j0 += kBlockCols) {
        const int64_t j1 = std::min(n, j0 + kBlockCols), width = j1 - j0;
        std::fill(grad_y + j0 * d, grad_y + j1 * d, T(0));
        for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
          const int64_t i1 = std::min(n, i0 + kBlockRows);
          ops.prepare(p, i0, i1, j0, j1);
          tile_logits(p, ops, i0, i1, j0, j1, tile.data(), cosines.data());
          for (int64_t i = i0; i < i1; ++i) {
            siglip_weights_row(tile.data() + (i - i0) * width, width,
                               positive_column(positives, i, j0), weights.data());
            const T* xi = ops.x + (i - i0) * d;
            for (int64_t j = j0; j < j1; ++j)
              axpy(weights[j - j0] * ops.inv_x[i - i0], xi, grad_y + j * d, d);
          }
        }
        for (int64_t j = j0; j < j1; ++j)
          finish_row(grad_y + j * d, p.y + j * d, p.inv_y[j], factor, p.normalize, d);
      }
    }
  }
  const double scaled = static_cast<double>(grad_loss) / static_cast<double>(n);
  return SiglipSums{sum_in_order(block_weight_cosine) * scaled, sum_in_order(block_weight) * scaled};
}

template double siglip_forward<float>(Problem<float>&, bool);
template double siglip_forward<double>(Problem<double>&, bool);
template SiglipSums siglip_backward<float>(const Problem<float>&, bool, float, float*, float*,
                                           bool, bool, bool);
template SiglipSums siglip_backward<double>(const Problem<double>&, bool, double, double*,
                                            double*, bool, bool, bool);

}  // namespace cpu
}  // namespace clipfast
