// Python bindings of the C++ backends. The module does not link libtorch: it
// takes data pointers, sizes and dtype codes; the Python side validates the
// tensors and keeps them alive for the duration of each call. So one build
// serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>
#include <string>

#include "clipfast/tile_math.h"
#include "cpu/clip_loss_cpu.h"
#include "cpu/siglip_cpu.h"

namespace py = pybind11;
using clipfast::cpu::Problem;
using clipfast::cpu::Stats;

namespace {

enum DType : int { kFloat32 = 0, kFloat64 = 1 };

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// An m x k block (k rows of y); the square losses pass k = n.
template <typename T>
Problem<T> problem(std::uintptr_t x, std::uintptr_t y, int64_t m, int64_t k, int64_t d,
                   double scale, double bias, bool normalize, std::uintptr_t inv_x,
                   std::uintptr_t inv_y) {
  return Problem<T>{ptr<const T>(x), ptr<const T>(y), m, k, d, static_cast<T>(scale),
                    static_cast<T>(bias), normalize, ptr<T>(inv_x), ptr<T>(inv_y)};
}

template <typename T>
Problem<T> problem(std::uintptr_t x, std::uintptr_t y, int64_t n, int64_t d, double scale,
                   double bias, bool normalize, std::uintptr_t inv_x, std::uintptr_t inv_y) {
  return problem<T>(x, y, n, n, d, scale, bias, normalize, inv_x, inv_y);
}

template <typename T>
Stats<T> stats(std::uintptr_t row_max, std::uintptr_t row_logsum, std::uintptr_t col_max,
               std::uintptr_t col_logsum, std::uintptr_t diag) {
  return Stats<T>{ptr<T>(row_max), ptr<T>(row_logsum), ptr<T>(col_max), ptr<T>(col_logsum),
                  ptr<T>(diag)};
}

void check_dtype(int dtype) {
  if (dtype != kFloat32 && dtype != kFloat64) {
    throw std::invalid_argument("clipfast._cpu: dtype code must be 0 (float32) or 1 (float64), got " +
                                std::to_string(dtype));
  }
}

// The row loss's block: every row's label column i + label_offset must exist
// (the kernels would otherwise leave its label logit unwritten).
void check_rows(int64_t m, int64_t k, int64_t d, int64_t label_offset, int dtype) {
  if (m < 1 || k < 1 || d < 1) {
    throw std::invalid_argument("clipfast._cpu: need m >= 1, k >= 1 and d >= 1, got m=" +
                                std::to_string(m) + ", k=" + std::to_string(k) +
                                ", d=" + std::to_string(d));
  }
  if (label_offset < 0 || label_offset > k - m) {
    throw std::invalid_argument(
        "clipfast._cpu: row labels i + label_offset must lie in [0, k) for every row i < m, got "
        "m=" + std::to_string(m) + ", k=" + std::to_string(k) +
        ", label_offset=" + std::to_string(label_offset));
  }
  check_dtype(dtype);
}

void check(int64_t n, int64_t d, int dtype) {
  if (n < 1 || d < 1) {
    throw std::invalid_argument("clipfast._cpu: need n >= 1 and d >= 1, got n=" +
                                std::to_string(n) + ", d=" + std::to_string(d));
  }
  check_dtype(dtype);
}

double cpu_forward(int dtype, std::uintptr_t x, std::uintptr_t y, int64_t n, int64_t d,
                   double scale, double bias, bool normalize, std::uintptr_t inv_x,
                   std::uintptr_t inv_y, std::uintptr_t row_max, std::uintptr_t row_logsum,
                   std::uintptr_t col_max, std::uintptr_t col_logsum, std::uintptr_t diag) {
  check(n, d, dtype);
  py::gil_scoped_release release;
  if (dtype == kFloat32) {
    auto p = problem<float>(x, y, n, d, scale, bias, normalize, inv_x, inv_y);
    auto s = stats<float>(row_max, row_logsum, col_max, col_logsum, diag);
    return clipfast::cpu::forward(p, s);
  }
  auto p = problem<double>(x, y, n, d, scale, bias, normalize, inv_x, inv_y);
  auto s = stats<double>(row_max, row_logsum, col_max, col_logsum, diag);
  return clipfast::cpu::forward(p, s);
}

double cpu_backward(int dtype, std::uintptr_t x, std::uintptr_t y, int64_t n, int64_t d,
                    double scale, double bias, bool normalize, std::uintptr_t inv_x,
                    std::uintptr_t inv_y, std::uintptr_t row_max, std::uintptr_t row_logsum,
                    std::uintptr_t col_max, std::uintptr_t col_logsum, double grad_loss,
                    std::uintptr_t grad_x, std::uintptr_t grad_y, bool need_x, bool need_y,
                    bool need_scale) {
  check(n, d, dtype);
  py::gil_scoped_release release;
  if (dtype == kFloat32) {
    auto p = problem<float>(x, y, n, d, scale, bias, normalize, inv_x, inv_y);
    auto s = stats<float>(row_max, row_logsum, col_max, col_logsum, 0);
    return clipfast::cpu::backward(p, s, static_cast<float>(grad_loss), ptr<float>(grad_x),
                                   ptr<float>(grad_y), need_x, need_y, need_scale);
  }
  auto p = problem<double>(x, y, n, d, scale, bias, normalize, inv_x, inv_y);
  auto s = stats<double>(row_max, row_logsum, col_max, col_logsum, 0);
  return clipfast::cpu::backward(p, s, grad_loss, ptr<double>(grad_x), ptr<double>(grad_y),
                                 need_x, need_y, need_scale);
}

double cpu_siglip_forward(int dtype, std::uintptr_t x, std::uintptr_t y, int64_t n, int64_t d,
                          double scale, double bias, bool normalize, bool positives,
                          std::uintptr_t inv_x, std::uintptr_t inv_y) {
  check(n, d, dtype);
  py::gil_scoped_release release;
  if (dtype == kFloat32) {
    auto p = problem<float>(x, y, n, d, scale, bias, normalize, inv_x, inv_y);
    return clipfast::cpu::siglip_forward(p, positives);
  }
  auto p = problem<double>(x, y, n, d, scale, bias, normalize, inv_x, inv_y);
  return clipfast::cpu::siglip_forward(p, positives);
}

std::pair<double, double> cpu_siglip_backward(int dtype, std::uintptr_t x, std::uintptr_t y,
                                              int64_t n, int64_t d, double scale, double bias,
                                              bool normalize, bool positives,
                                              std::uintptr_t inv_x, std::uintptr_t inv_y,
                                              double grad_loss, std::uintptr_t grad_x,
                                              std::uintptr_t grad_y, bool need_x, bool need_y,
                                              bool need_sums) {
  check(n, d, dtype);
  clipfast::cpu::SiglipSums sums;
  {
    py::gil_scoped_release release;
    if (dtype == kFloat32) {
      auto p = problem<float>(x, y, n, d, scale, bias, normalize, inv_x, inv_y);
      sums = clipfast::cpu::siglip_backward(p, positives, static_cast<float>(grad_loss),
                                            ptr<float>(grad_x), ptr<float>(grad_y), need_x,
                                            need_y, need_sums);
    } else {
      auto p = problem<double>(x, y, n, d, scale, bias, normalize, inv_x, inv_y);
      sums = clipfast::cpu::siglip_backward(p, positives, grad_loss, ptr<double>(grad_x),
                                            ptr<double>(grad_y), need_x, need_y, need_sums);
    }
  }
  return {sums.scale, sums.bias};
}

void cpu_inverse_norms(int dtype, std::uintptr_t features, int64_t rows, int64_t d,
                       bool normalize, std::uintptr_t inv) {
  check(rows, d, dtype);
  py::gil_scoped_release release;
  if (dtype == kFloat32) {
    clipfast::cpu::inverse_norms(ptr<const float>(features), rows, d, normalize, ptr<float>(inv));
  } else {
    clipfast::cpu::inverse_norms(ptr<const double>(features), rows, d, normalize,
                                 ptr<double>(inv));
  }
}

void cpu_row_forward(int dtype, std::uintptr_t x, std::uintptr_t y, int64_t m, int64_t k,
                     int64_t d, double scale, double bias, bool normalize, std::uintptr_t inv_x,
                     std::uintptr_t inv_y, int64_t label_offset, std::uintptr_t row_max,
                     std::uintptr_t row_sum, std::uintptr_t diag) {
  check_rows(m, k, d, label_offset, dtype);
  py::gil_scoped_release release;
  if (dtype == kFloat32) {
    const auto p = problem<float>(x, y, m, k, d, scale, bias, normalize, inv_x, inv_y);
    clipfast::cpu::row_forward(p, label_offset, ptr<float>(row_max), ptr<float>(row_sum),
                               ptr<float>(diag));
  } else {
    const auto p = problem<double>(x, y, m, k, d, scale, bias, normalize, inv_x, inv_y);
    clipfast::cpu::row_forward(p, label_offset, ptr<double>(row_max), ptr<double>(row_sum),
                               ptr<double>(diag));
  }
}

double cpu_row_backward(int dtype, std::uintptr_t x, std::uintptr_t y, int64_t m, int64_t k,
                        int64_t d, double scale, double bias, bool normalize,
                        std::uintptr_t inv_x, std::uintptr_t inv_y, int64_t label_offset,
                        std::uintptr_t row_max, std::uintptr_t row_logsum, double coef,
                        std::uintptr_t grad_x, std::uintptr_t grad_y, bool need_x, bool need_y,
                        bool need_scale) {
  check_rows(m, k, d, label_offset, dtype);
  py::gil_scoped_release release;
  if (dtype == kFloat32) {
    const auto p = problem<float>(x, y, m, k, d, scale, bias, normalize, inv_x, inv_y);
    return clipfast::cpu::row_backward(p, label_offset, ptr<const float>(row_max),
                                       ptr<const float>(row_logsum), static_cast<float>(coef),
                                       ptr<float>(grad_x), ptr<float>(grad_y), need_x, need_y,
                                       need_scale);
  }
  const auto p = problem<double>(x, y, m, k, d, scale, bias, normalize, inv_x, inv_y);
  return clipfast::cpu::row_backward(p, label_offset, ptr<const double>(row_max),
                                     ptr<const double>(row_logsum), coef, ptr<double>(grad_x),
                                     ptr<double>(grad_y), need_x, need_y, need_scale);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "clipfast's C++ CPU backend (no libtorch: pointers, sizes and dtype codes)";
  m.def("forward", &cpu_forward, "Fused CLIP loss forward; returns the loss");
  m.def("backward", &cpu_backward, "Fused CLIP loss backward; returns dL/dscale");
  m.def("siglip_forward", &cpu_siglip_forward,
        "Fused SigLIP loss forward; fills the inverse norms, returns the loss");
  m.def("siglip_backward", &cpu_siglip_backward,
        "Fused SigLIP loss backward; returns (dL/dscale, dL/dbias)");
  m.def("inverse_norms", &cpu_inverse_norms,
        "Overflow-safe 1 / max(|row|, eps) of one side (ones without normalize)");
  m.def("row_forward", &cpu_row_forward,
        "Row loss statistics of an m x k block: row max, sum exp, label logit");
  m.def("row_backward", &cpu_row_backward,
        "Row loss backward of coef x the block's summed loss; returns dL/dscale");
  // The shared tile math as the GPU kernels use it, for tests on any machine.
  m.def("logsumexp_by_push", [](const std::vector<float>& values) {
    float running_max = -INFINITY, running_sum = 0.f;
    for (float v : values) clipfast::lse_push(running_max, running_sum, v);
    return running_max + std::log(running_sum);
  }, "log-sum-exp of the values through lse_push (tile_math.h)");
  m.def("logsumexp_by_merge", [](const std::vector<float>& values, int parts) {
    // Each part pushes a strided subset; the partials are merged, as the
    // kernels merge tiles and thread groups.
    float total_max = -INFINITY, total_sum = 0.f;
    for (int part = 0; part < parts; ++part) {
      float m = -INFINITY, s = 0.f;
      for (size_t i = part; i < values.size(); i += parts) clipfast::lse_push(m, s, values[i]);
      clipfast::lse_merge(total_max, total_sum, m, s);
    }
    return total_max + std::log(total_sum);
  }, "log-sum-exp through per-part lse_push and lse_merge (tile_math.h)");
  m.def("logsumexp_by_lines", [](const std::vector<float>& values, int parts) {
    // Each part reduces a strided line with lse_of_line, as the tensor-core
    // kernels reduce the rows and columns of a tile; then lse_merge.
    float total_max = -INFINITY, total_sum = 0.f;
    for (int part = 0; part < parts; ++part) {
      const int count = static_cast<int>((values.size() + parts - 1 - part) / parts);
      float m, s;
      clipfast::lse_of_line(values.data() + part, count, parts, m, s);
      clipfast::lse_merge(total_max, total_sum, m, s);
    }
    return total_max + std::log(total_sum);
  }, "log-sum-exp through per-part lse_of_line and lse_merge (tile_math.h)");
  m.attr("FLOAT32") = static_cast<int>(kFloat32);
  m.attr("FLOAT64") = static_cast<int>(kFloat64);
}
