// Python bindings of the CUDA backend: pointers, sizes, dtype codes and the
// caller's stream handle; no libtorch. Launch failures raise RuntimeError.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/clip_loss_cuda.h"
#include "cuda/siglip_cuda.h"

namespace py = pybind11;
namespace cu = clipfast::cuda;

namespace {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(int64_t n, int64_t d, int dtype) {
  if (n < 1 || d < 1) {
    throw std::invalid_argument("clipfast._cuda: need n >= 1 and d >= 1, got n=" +
                                std::to_string(n) + ", d=" + std::to_string(d));
  }
  if (dtype < kFloat32 || dtype > kBFloat16) {
    throw std::invalid_argument(
        "clipfast._cuda: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
        std::to_string(dtype));
  }
}

// Arguments 1-9 of every entry point: x, y, n, d, scale, bias, normalize,
// inv_x, inv_y.
template <typename In>
cu::Params<In> params(const py::tuple& a) {
  return cu::Params<In>{ptr<const In>(a[1].cast<std::uintptr_t>()),
                        ptr<const In>(a[2].cast<std::uintptr_t>()),
                        a[3].cast<int64_t>(),
                        a[4].cast<int64_t>(),
                        static_cast<float>(a[5].cast<double>()),
                        static_cast<float>(a[6].cast<double>()),
                        a[7].cast<bool>(),
                        ptr<float>(a[8].cast<std::uintptr_t>()),
                        ptr<float>(a[9].cast<std::uintptr_t>())};
}

// Arguments 10-13 (row max, row log-sum, column max, column log-sum), and the
// diagonal at 14 when the entry point has one.
cu::Stats stats(const py::tuple& a, bool with_diag) {
  return cu::Stats{ptr<float>(a[10].cast<std::uintptr_t>()), ptr<float>(a[11].cast<std::uintptr_t>()),
                   ptr<float>(a[12].cast<std::uintptr_t>()), ptr<float>(a[13].cast<std::uintptr_t>()),
                   with_diag ? ptr<float>(a[14].cast<std::uintptr_t>()) : nullptr};
}

template <typename In>
void forward_typed(const py::tuple& a, cudaStream_t stream) {
  auto p = params<In>(a);
  auto s = stats(a, true);
  cu::Workspace w{a[15].cast<int64_t>(), a[16].cast<int64_t>(), ptr<float>(a[17].cast<std::uintptr_t>()),
                  ptr<float>(a[18].cast<std::uintptr_t>()), ptr<float>(a[19].cast<std::uintptr_t>()),
                  ptr<float>(a[20].cast<std::uintptr_t>())};
  const bool tensor_cores = a[21].cast<bool>();
  py::gil_scoped_release release;
  cu::forward<In>(p, s, w, tensor_cores, stream);
}

template <typename In>
void backward_typed(const py::tuple& a, cudaStream_t stream) {
  auto p = params<In>(a);
  auto s = stats(a, false);
  const float factor = static_cast<float>(a[14].cast<double>());
  const float* coef = ptr<const float>(a[15].cast<std::uintptr_t>());
  cu::PanelWorkspace<In> w{a[16].cast<int64_t>(), a[17].cast<int64_t>(),
                           ptr<In>(a[18].cast<std::uintptr_t>()),
                           ptr<float>(a[19].cast<std::uintptr_t>()),
                           ptr<uint8_t>(a[20].cast<std::uintptr_t>()),
                           ptr<float>(a[21].cast<std::uintptr_t>()),
                           ptr<float>(a[22].cast<std::uintptr_t>())};
  const bool tensor_cores = a[23].cast<bool>();
  const bool need_scale = a[24].cast<bool>();
  In* grad_x = ptr<In>(a[25].cast<std::uintptr_t>());
  In* grad_y = ptr<In>(a[26].cast<std::uintptr_t>());
  py::gil_scoped_release release;
  cu::backward<In>(p, s, factor, coef, w, tensor_cores, need_scale, grad_x, grad_y, stream);
}

// SigLIP: arguments 1-9 as above, positives at 10.
template <typename In>
void siglip_forward_typed(const py::tuple& a, cudaStream_t stream) {
  auto p = params<In>(a);
  const bool positives = a[10].cast<bool>();
  cu::SiglipWorkspace w{a[11].cast<int64_t>(), a[12].cast<int64_t>(),
                        ptr<float>(a[13].cast<std::uintptr_t>())};
  const bool tensor_cores = a[14].cast<bool>();
  py::gil_scoped_release release;
  cu::siglip_forward<In>(p, positives, w, tensor_cores, stream);
}

template <typename In>
void siglip_backward_typed(const py::tuple& a, cudaStream_t stream) {
  auto p = params<In>(a);
  const bool positives = a[10].cast<bool>();
  const float factor = static_cast<float>(a[11].cast<double>());
  const float* coef = ptr<const float>(a[12].cast<std::uintptr_t>());
  cu::PanelWorkspace<In> w{a[13].cast<int64_t>(), a[14].cast<int64_t>(),
                           ptr<In>(a[15].cast<std::uintptr_t>()),
                           ptr<float>(a[16].cast<std::uintptr_t>()),
                           ptr<uint8_t>(a[17].cast<std::uintptr_t>()),
                           ptr<float>(a[18].cast<std::uintptr_t>()),
                           ptr<float>(a[19].cast<std::uintptr_t>()),
                           ptr<float>(a[20].cast<std::uintptr_t>())};
  const bool tensor_cores = a[21].cast<bool>();
  const bool need_sums = a[22].cast<bool>();
  In* grad_x = ptr<In>(a[23].cast<std::uintptr_t>());
  In* grad_y = ptr<In>(a[24].cast<std::uintptr_t>());
  py::gil_scoped_release release;
  cu::siglip_backward<In>(p, positives, factor, coef, w, tensor_cores, need_sums, grad_x, grad_y,
                          stream);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Checks an entry point's argument count, sizes and dtype code (args[0]) and
// runs run(TypeTag<In>{}, stream) for that dtype; the stream handle is the
// last argument.
template <typename Run>
void dispatch(const char* name, const py::args& args, size_t count, Run&& run) {
  if (args.size() != count) {
    throw std::invalid_argument(std::string("clipfast._cuda.") + name + " takes " +
                                std::to_string(count) + " arguments");
  }
  const int dtype = args[0].cast<int>();
  check(args[3].cast<int64_t>(), args[4].cast<int64_t>(), dtype);
  auto stream = reinterpret_cast<cudaStream_t>(args[count - 1].cast<std::uintptr_t>());
  if (dtype == kFloat32) run(TypeTag<float>{}, stream);
  else if (dtype == kFloat16) run(TypeTag<__half>{}, stream);
  else run(TypeTag<__nv_bfloat16>{}, stream);
}

// forward(dtype, x, y, n, d, scale, bias, normalize, inv_x, inv_y, row_max,
//         row_logsum, col_max, col_logsum, diag, row_splits, col_splits,
//         row_max_part, row_sum_part, col_max_part, col_sum_part, tensor_cores,
//         stream)
// tensor_cores: float32 features on TF32 tensor cores (else IEEE fp32 FMAs);
// float16/bfloat16 always run on tensor cores.
void forward(py::args args) {
  dispatch("forward", args, 23, [&](auto tag, cudaStream_t stream) {
    forward_typed<typename decltype(tag)::type>(args, stream);
  });
}

// backward(dtype, x, y, n, d, scale, bias, normalize, inv_x, inv_y, row_max,
//          row_logsum, col_max, col_logsum, factor, coef, panel, ld, g_panel,
//          x_acc, y_lo, scale_part, scale_acc, tensor_cores, need_scale,
//          grad_x, grad_y, stream)
// Gradients are scaled by factor * (*coef), coef a device float (0: none).
// The buffers are clip_loss_cuda.h's PanelWorkspace.
void backward(py::args args) {
  dispatch("backward", args, 28, [&](auto tag, cudaStream_t stream) {
    backward_typed<typename decltype(tag)::type>(args, stream);
  });
}

// siglip_forward(dtype, x, y, n, d, scale, bias, normalize, inv_x, inv_y,
//                positives, row_splits, col_splits, loss_part, tensor_cores, stream)
// loss_part: row_splits * col_splits floats, the per-block sums of
// -logsigmoid(z L); the loss is their sum / n.
void siglip_forward(py::args args) {
  dispatch("siglip_forward", args, 16, [&](auto tag, cudaStream_t stream) {
    siglip_forward_typed<typename decltype(tag)::type>(args, stream);
  });
}

// siglip_backward(dtype, x, y, n, d, scale, bias, normalize, inv_x, inv_y,
//                 positives, factor, coef, panel, ld, g_panel, x_acc, y_lo,
//                 sum_part, scale_acc, bias_acc, tensor_cores, need_sums,
//                 grad_x, grad_y, stream)
// As backward, with sum_part of 2 (panel / 128)^2 floats and the per-panel
// sums of G cos (scale_acc) and G (bias_acc) when need_sums.
void siglip_backward(py::args args) {
  dispatch("siglip_backward", args, 26, [&](auto tag, cudaStream_t stream) {
    siglip_backward_typed<typename decltype(tag)::type>(args, stream);
  });
}

}  // namespace

// The CPU emulation build (setup.py, csrc/emulate) names its module
// _cuda_emulated.
#ifndef CLIPFAST_CUDA_MODULE
#define CLIPFAST_CUDA_MODULE _cuda
#endif

PYBIND11_MODULE(CLIPFAST_CUDA_MODULE, m) {
  m.doc() = "clipfast's CUDA backend (no libtorch: pointers, sizes, dtype codes, stream handle)";
  m.def("forward", &forward, "Fused CLIP loss forward statistics");
  m.def("backward", &backward, "Fused CLIP loss gradients, by square panels of G");
  m.def("siglip_forward", &siglip_forward, "Fused SigLIP loss forward: per-block loss sums");
  m.def("siglip_backward", &siglip_backward, "Fused SigLIP loss gradients, by square panels of G");
  m.attr("FLOAT32") = static_cast<int>(kFloat32);
  m.attr("FLOAT16") = static_cast<int>(kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(kBFloat16);
  m.attr("PANEL_ALIGN") = static_cast<int>(cu::kPanelAlign);
  m.attr("TILE_ROWS") = static_cast<int>(cu::kTileRows);
  m.attr("TILE_COLS") = static_cast<int>(cu::kTileCols);
}
