"""The C++ CPU backend's one-direction row loss (CpuRowCrossEntropyFunction:
hard negatives, one-direction InfoNCE, local_loss) against the reference."""

import pytest
import torch

from clipfast import info_nce_loss
from clipfast._inputs import check_inputs
from clipfast.backends import ROWS, get
from clipfast.backends.cpu import CpuRowCrossEntropyFunction, available
from clipfast.backends.reference import reference_row_loss
from clipfast.distributed import local_clip_loss

from ..parity import assert_row_ce_parity, floor_for

# The kernels' tiles are 32 rows x 128 columns: sizes that cross them at odd
# places, and ones smaller than a tile; the small ones are chunked's cases.
ODD_BLOCKS = [(1, 1, 3, 0), (5, 15, 7, 10), (97, 123, 33, 26), (33, 161, 65, 128), (40, 40, 9, 0)]


@pytest.fixture(autouse=True)
def built():
    # CI builds the extension with the package: its absence is a failure.
    assert available(), "clipfast._cpu is missing: pip install -e . (or build_ext --inplace)"


def _row(q, k, s, b, normalize, offset, extra=None):
    return CpuRowCrossEntropyFunction.apply(q, k, s, b, normalize, offset, extra)


def _block(m, k, d, offset, dtype, seed, extra_cols=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(k, d, generator=gen, dtype=torch.float64)
    keys[offset:offset + m] += 1.5 * q  # the labels stand out, as trained pairs do
    extra = None
    if extra_cols:
        extra = torch.randn(m, extra_cols, generator=gen, dtype=torch.float64) * 3
    return q.to(dtype), keys.to(dtype), None if extra is None else extra.to(dtype)


def _loss_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def test_cpu_backend_declares_the_row_loss():
    assert get("cpu").has(ROWS)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("m,k,d,offset", [(1, 1, 3, 0), (5, 5, 4, 0), (3, 13, 4, 7), (4, 9, 3, 5)])
def test_cpu_rows_gradcheck_fp64(m, k, d, offset, normalize, with_extra):
    q, keys, extra = _block(m, k, d, offset, torch.float64, seed=m + k, extra_cols=3 * with_extra)
    s = torch.tensor(2.5, dtype=torch.float64)
    b = torch.tensor(0.3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, keys, s, b)]
    if with_extra:
        leaves.append(extra.clone().requires_grad_())
        fn = lambda q, k, s, b, e: _row(q, k, s, b, normalize, offset, e)  # noqa: E731
    else:
        fn = lambda q, k, s, b: _row(q, k, s, b, normalize, offset)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("extra_cols", [0, 5])
@pytest.mark.parametrize("m,k,d,offset", [(70, 300, 17, 200), (97, 123, 33, 26)])
def test_cpu_rows_fp64_equal_reference_across_tiles(m, k, d, offset, normalize, extra_cols):
    # Several row blocks and column tiles, labels in a later tile than the row.
    q, keys, extra = _block(m, k, d, offset, torch.float64, seed=m, extra_cols=extra_cols)
    s = torch.tensor(17.0, dtype=torch.float64)
    b = torch.tensor(-2.0, dtype=torch.float64)
    tensors = [q, keys, s, b] + ([extra] if extra_cols else [])

    def fused(*t):
        return _row(*t[:4], normalize, offset, *t[4:])

    def formula(*t):
        return reference_row_loss(*t[:4], normalize, offset, *t[4:])

    for got, want in zip(_loss_and_grads(fused, tensors), _loss_and_grads(formula, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("m,k,d,offset", ODD_BLOCKS)
def test_cpu_rows_fp32_accuracy_rule(m, k, d, offset, normalize):
    assert_row_ce_parity(CpuRowCrossEntropyFunction, m, k, d, offset, normalize=normalize)


@pytest.mark.parametrize("scale", [30.0, 100.0])
@pytest.mark.parametrize("m,k,d,offset", [(97, 123, 33, 26), (5, 13, 7, 8)])
def test_cpu_rows_fp32_with_extra_logits_accuracy_rule(m, k, d, offset, scale):
    # Large scales make confident rows (label probability near 1), where the
    # label's weight P - 1 is the small difference the kernel must get right.
    q, keys, extra = _block(m, k, d, offset, torch.float32, seed=k, extra_cols=6)
    s, b = torch.tensor(scale), torch.tensor(-1.5)
    tensors = [q, keys, s, b, extra]

    def fused(q, k, s, b, e):
        return _row(q, k, s, b, True, offset, e)

    def formula(q, k, s, b, e):
        return reference_row_loss(q, k, s, b, True, offset, e)

    got = _loss_and_grads(fused, tensors)
    same = _loss_and_grads(formula, tensors)
    truth = _loss_and_grads(formula, [t.double() for t in tensors])
    names = ["loss", "grad_queries", "grad_keys", "grad_scale", "grad_bias", "grad_extra"]
    for name, g, r, t in zip(names, got, same, truth):
        assert g.dtype == torch.float32
        err = (g.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        magnitude = max(t.abs().max().item(),
                        1.0 if name in ("loss", "grad_scale", "grad_bias") else scale / m)
        floor = floor_for(torch.float32) * magnitude
        if name in ("loss", "grad_scale"):
            # One ulp of the largest logit: no summation order beats it.
            floor += torch.finfo(torch.float32).eps * (scale + 1.5)
        assert err <= 2 * ref_err + floor, (
            f"{name}: error {err:.3e} > 2 x {ref_err:.3e} + {floor:.3e} (M={m}, K={k}, d={d})")


def _info_nce_problem(n, d, negatives, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    neg = None
    if negatives == "shared":
        neg = torch.randn(n // 2 + 3, d, generator=gen, dtype=torch.float64)
    elif negatives == "per_query":
        neg = torch.randn(n, 4, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=gen) if groups else None
    return x, y, neg, labels


@pytest.mark.parametrize("negatives,groups,smoothing,symmetric", [
    ("shared", False, 0.0, False),
    ("shared", True, 0.1, True),
    ("per_query", False, 0.0, False),
    ("per_query", True, 0.2, True),
    (None, False, 0.0, False),
    (None, True, 0.15, False),
])
@pytest.mark.parametrize("n,d", [(13, 5), (97, 33)])
def test_info_nce_on_cpu_equals_reference(n, d, negatives, groups, smoothing, symmetric):
    x, y, neg, labels = _info_nce_problem(n, d, negatives, groups, seed=n + d)
    s = torch.tensor(20.0, dtype=torch.float64)
    b = torch.tensor(-3.0, dtype=torch.float64)
    tensors = [x, y, s, b] + ([neg] if neg is not None else [])

    def run(backend):
        def fn(x, y, s, b, *neg):
            return info_nce_loss(x, y, s, logit_bias=b, negative_features=neg[0] if neg else None,
                                 labels=labels, label_smoothing=smoothing, symmetric=symmetric,
                                 backend=backend)
        return _loss_and_grads(fn, tensors)

    for got, want in zip(run("cpu"), run("reference")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_info_nce_on_cpu_fp32_hard_negatives_close_to_reference():
    x, y, neg, _ = _info_nce_problem(61, 24, "per_query", False, seed=5)
    x, y, neg = x.float(), y.float(), neg.float()

    def run(backend):
        return _loss_and_grads(
            lambda x, y, n: info_nce_loss(x, y, 20.0, negative_features=n, backend=backend),
            [x, y, neg])

    for got, want in zip(run("cpu"), run("reference")):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank,world_size", [(0, 2), (1, 3), (2, 3)])
def test_local_loss_rows_on_cpu(rank, world_size):
    # ClipLoss(local_loss=True)'s computation: this rank's n rows against the
    # gathered world_size * n columns, labels at rank * n.
    n, d = 11, 7
    gen = torch.Generator().manual_seed(rank + 10 * world_size)
    all_image = torch.randn(world_size * n, d, generator=gen, dtype=torch.float64)
    all_text = all_image + 0.5 * torch.randn(world_size * n, d, generator=gen, dtype=torch.float64)
    s = torch.tensor(10.0, dtype=torch.float64)
    b = torch.tensor(1.0, dtype=torch.float64)
    tensors = [all_image, all_text, s, b]

    def run(backend):
        def fn(all_image, all_text, s, b):
            local = slice(rank * n, (rank + 1) * n)
            inputs = check_inputs(all_image[local], all_text[local], s, b)
            return local_clip_loss(inputs, all_image, all_text, rank, True, backend)
        return _loss_and_grads(fn, tensors)

    for got, want in zip(run("cpu"), run("reference")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_mixed_dtypes_and_non_contiguous_inputs():
    # fp32 queries with fp64 keys compute in fp64; gradients come back in
    # each input's dtype; strided views are made contiguous.
    big = torch.randn(80, 90, dtype=torch.float64)
    q = big[::4, 3:40].float()
    keys = big.t().contiguous().t()[1::2, 5:42]
    s = torch.tensor(8.0)
    got = _loss_and_grads(lambda q, k, s: _row(q, k, s, None, True, 7), [q, keys, s])
    want = _loss_and_grads(lambda q, k, s: reference_row_loss(q.double(), k, s.double(), None,
                                                              True, 7), [q, keys, s])
    assert [g.dtype for g in got] == [torch.float64, torch.float32, torch.float64, torch.float32]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_rows_bitwise_reproducible_across_thread_counts(dtype):
    # torch.set_num_threads sets the OpenMP thread count the kernels' parallel
    # regions take (one libgomp in the process). Per-row statistics from the
    # row's own tiles and per-row-block sums added in block order: the same
    # bits for any count, and run to run.
    q, keys, extra = _block(150, 300, 19, 100, dtype, seed=1, extra_cols=4)
    s, b = torch.tensor(12.0, dtype=dtype), torch.tensor(0.5, dtype=dtype)
    tensors = [q, keys, s, b, extra]
    fn = lambda q, k, s, b, e: _row(q, k, s, b, True, 100, e)  # noqa: E731
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            runs.append(_loss_and_grads(fn, tensors))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for got, want in zip(other, runs[0]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("where", ["query", "key", "extra"])
def test_nan_propagates(where):
    q, keys, extra = _block(40, 150, 8, 3, torch.float32, seed=2, extra_cols=2)
    {"query": q, "key": keys, "extra": extra}[where][7, 1] = float("nan")
    leaves = [t.requires_grad_() for t in (q, keys, extra)]
    loss = _row(leaves[0], leaves[1], torch.tensor(10.0), None, True, 3, leaves[2])
    assert torch.isnan(loss)
    grads = torch.autograd.grad(loss, leaves)
    assert all(torch.isnan(g).any() for g in grads)


@pytest.mark.parametrize("exponent", [66, 100])
def test_cpu_rows_huge_rows(exponent):
    # fp32 rows times 2^66 (squares past fp32's range) or 2^100 (~1e30: dot
    # products of two such rows past it too) take the overflow-safe norms and
    # scaled tile operands, which give exactly the unscaled rows' cosines:
    # the loss and the scale gradient bit for bit, the scaled rows'
    # gradients 2^-exponent times theirs.
    q, keys, _ = _block(45, 140, 16, 60, torch.float32, seed=3)
    huge_q, huge_keys = q.clone(), keys.clone()
    huge_q[::3] *= 2.0 ** exponent
    huge_keys[1::4] *= 2.0 ** exponent
    s, b = torch.tensor(10.0), torch.tensor(-2.0)

    def run(q, k):
        return _loss_and_grads(lambda q, k, s, b: _row(q, k, s, b, True, 60), [q, k, s, b])

    got, want = run(huge_q, huge_keys), run(q, keys)
    assert torch.isfinite(got[0])
    for i in (0, 3, 4):  # loss, scale and bias gradients
        assert torch.equal(got[i], want[i])
    for grad, truth, rows in ((got[1], want[1], slice(None, None, 3)),
                              (got[2], want[2], slice(1, None, 4))):
        assert torch.isfinite(grad).all()
        scaled = grad.clone()
        scaled[rows] *= 2.0 ** exponent
        assert torch.equal(scaled, truth)


@pytest.mark.parametrize("m,k,offset", [(5, 9, 5), (5, 9, -1), (5, 4, 0)])
def test_labels_outside_the_block_are_refused(m, k, offset):
    q, keys = torch.randn(m, 3), torch.randn(k, 3)
    with pytest.raises(ValueError, match="label_offset"):
        _row(q, keys, torch.tensor(1.0), None, True, offset)
