"""Deliberately broken kernels for tests/test_aot_check.py: each must fail
``python -m clipfast.aot_check --extra tests/aot/broken_kernels.py``."""

import torch
import triton
import triton.language as tl

from clipfast.backends.triton import aot
from clipfast.backends.triton import launchers


@triton.jit
def _early_return_kernel(acc_ptr, out_ptr, SPLIT: tl.constexpr):
    # The bug the interpreter never saw: an early return of another type
    # inside a constexpr branch ("Return type mismatch").
    offs = tl.arange(0, 128)
    tl.store(out_ptr + offs, _load(acc_ptr, offs, SPLIT))


@triton.jit
def _load(acc_ptr, offs, SPLIT: tl.constexpr):
    if SPLIT:
        return tl.load(acc_ptr + offs).to(tl.int32)
    return tl.load(acc_ptr + offs)


@triton.jit
def _spilling_kernel(a_ptr, b_ptr, out_ptr, K, BLOCK: tl.constexpr):
    # A 256 x 256 fp32 accumulator in 4 warps: 512 values a thread.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, 16):
        a = tl.load(a_ptr + offs[:, None] * K + k + tl.arange(0, 16)[None, :])
        b = tl.load(b_ptr + (k + tl.arange(0, 16))[:, None] * BLOCK + offs[None, :])
        acc += tl.dot(a, b)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def _spills_unless_one_kernel(a_ptr, b_ptr, out_ptr, K, BLOCK: tl.constexpr):
    # Triton compiles K == 1 as a constant: that binary drops the loop and
    # fits; any other K spills (the spilling kernel's loop). The check must
    # inspect every binary of a config, not the first one it compiled.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    if K != 1:
        for k in range(0, K, 16):
            a = tl.load(a_ptr + offs[:, None] * K + k + tl.arange(0, 16)[None, :])
            b = tl.load(b_ptr + (k + tl.arange(0, 16))[:, None] * BLOCK + offs[None, :])
            acc += tl.dot(a, b)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def _shared_overflow_kernel(a_ptr, b_ptr, out_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # Six pipeline stages of 256 x 128 bf16 operands: far above 227 KB.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs[:, None] * K + k + tl.arange(0, BLOCK_K)[None, :])
        b = tl.load(b_ptr + (k + tl.arange(0, BLOCK_K))[:, None] * BLOCK + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _contracted_forward():
    # The real forward kernel, compiled with FP contraction back on.
    launchers._LOGIT_FUSION = True
    try:
        x = _meta(256, 128, dtype=torch.bfloat16)
        inv, s = _meta(256), _meta(1)
        launchers.block_stats(x, x, inv, inv, s, None, 0, True, True)
    finally:
        launchers._LOGIT_FUSION = False


def aot_scenarios():
    return [
        aot.Scenario("broken: early return", lambda: _early_return_kernel[(1,)](
            _meta(128, dtype=torch.int16), _meta(128), SPLIT=True)),
        aot.Scenario("broken: spills", lambda: _spilling_kernel[(1,)](
            _meta(256, 64), _meta(64, 256), _meta(256, 256), 64, BLOCK=256, num_warps=4)),
        aot.Scenario("broken: spills in a later binary", lambda: [
            _spills_unless_one_kernel[(1,)](_meta(256, 64), _meta(64, 256), _meta(256, 256), k,
                                            BLOCK=256, num_warps=4) for k in (1, 64)]),
        aot.Scenario("broken: shared memory", lambda: _shared_overflow_kernel[(1,)](
            _meta(256, 1024, dtype=torch.bfloat16), _meta(1024, 256, dtype=torch.bfloat16),
            _meta(256, 256), 1024, BLOCK=256, BLOCK_K=128, num_warps=8, num_stages=6)),
        aot.Scenario("broken: contracted logits", _contracted_forward),
    ]
