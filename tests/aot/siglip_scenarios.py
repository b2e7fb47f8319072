"""The SigLIP kernels as main-loop kernels for ``python -m clipfast.aot_check
--extra tests/aot/siglip_scenarios.py --only-extra``: the check fails on any
spill in an --extra scenario's kernels, and clipfast.aot_check's own list of
main-loop kernels names only the CLIP ones. ``aot.scenarios()`` compiles the
same launches (all of them) in CI; these are the configurations each tile
kernel can take: with and without normalisation (the huge-row guard, the
folded panel), per dot dtype."""

import os

import torch

from clipfast.backends.triton import aot

_DTYPES = {"bf16": (torch.bfloat16, True), "fp16": (torch.float16, True),
           "tf32": (torch.float32, True), "fp32": (torch.float32, False)}


def aot_scenarios():
    # CLIPFAST_AOT_SIGLIP_DTYPES=bf16,... narrows the set (tests/test_aot_check.py).
    chosen = os.environ.get("CLIPFAST_AOT_SIGLIP_DTYPES", ",".join(_DTYPES)).split(",")
    out = []
    for dtype, tf32 in (_DTYPES[name] for name in chosen):
        for normalize in (False, True):
            label = f"siglip {dtype} tf32={tf32} normalize={normalize}"
            out.append(aot.Scenario(label, lambda dt=dtype, t=tf32, n=normalize: aot._siglip_step(
                aot._features(384, 160, dt), aot._features(384, 160, dt), aot._scale(), aot._scale(),
                n, t)))
    return out
