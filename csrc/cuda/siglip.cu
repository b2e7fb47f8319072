// The SigLIP forward's driver on the CUDA backend: CLIP's inverse norms
// (clip_loss_cuda.cu), then the SigLIP tile sweep (tiles.cu). No statistics
// merge: the loss is the sum of the per-block partials, which the caller
// adds in a fixed order, and the backward needs only the inverse norms.
#include "cuda/siglip_cuda.h"

#include "cuda/common.cuh"

namespace clipfast {
namespace cuda {

template <typename In>
void siglip_forward(const Params<In>& p, bool positives, const SiglipWorkspace& w,
                    bool tensor_cores, cudaStream_t stream) {
  launch_inverse_norms<In>(p.x, p.n, p.d, p.normalize, p.inv_x, stream,
                           "inverse_norms_kernel (image)");
  launch_inverse_norms<In>(p.y, p.n, p.d, p.normalize, p.inv_y, stream,
                           "inverse_norms_kernel (text)");
  siglip_forward_tiles<In>(p, positives, w, tensor_cores, stream);
}

template void siglip_forward<float>(const Params<float>&, bool, const SiglipWorkspace&, bool,
                                    cudaStream_t);
template void siglip_forward<__half>(const Params<__half>&, bool, const SiglipWorkspace&, bool,
                                     cudaStream_t);
template void siglip_forward<__nv_bfloat16>(const Params<__nv_bfloat16>&, bool,
                                            const SiglipWorkspace&, bool, cudaStream_t);

}  // namespace cuda
}  // namespace clipfast
