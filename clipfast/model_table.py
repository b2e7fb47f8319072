"""``backend="auto"``'s static H100 model, as data: the modelled forward +
backward time of the triton, cuda and hybrid backends on a grid of (N, d),
per loss, dtype and (hybrid) memory budget, with ``model_ms`` to read it.

The numbers are ``python -m clipfast.perfmodel``'s (a model from compiled
SASS and assumed rates, not a measurement); ``python -m clipfast.perfmodel
--write-table`` recomputes them and rewrites the block below. They live in
the library, not in the tool, so that ``clipfast.autoselect`` reads them
without importing the tool (which compiles kernels ahead of time).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional

TABLE_NS = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
TABLE_DS = (256, 512, 768, 1024, 1280, 2048)


def _variant_key(backend, loss, dtype, budget) -> str:
    return f"{backend}/{loss}/{dtype}/{budget}"


# BEGIN MODEL TABLE (python -m clipfast.perfmodel --write-table: ms, TABLE_NS x TABLE_DS row-major)
MODEL_TABLE: Dict[str, List[Optional[float]]] = {
    "triton/clip/bf16/none": [
        0.646, 0.646, 0.646, 0.646, 0.89, 0.809, 1.214, 1.299, 1.471, 1.67, 2.114, 2.95, 3.309,
        4.313, 5.529, 6.379, 7.984, 11.274, 11.39, 15.962, 21.121, 24.957, 30.438, 42.472,
        45.327, 61.743, 76.74, 93.472, 109.028, 161.602, 180.891, 225.508, 286.233, 359.516,
        431.769, 641.216, 589.138, 848.268, 1113.76, 1394.67, 1663.6, 2513.29],
    "triton/clip/fp32/none": [
        0.628, 0.628, 0.648, 0.757, 0.907, 1.524, 1.269, 1.595, 2.196, 2.797, 3.398, 5.4, 4.273,
        6.168, 8.505, 10.842, 13.179, 21.011, 15.899, 24.291, 33.506, 42.72, 51.934, 78.424,
        61.636, 96.454, 133.045, 163.152, 198.359, 301.202, 243.042, 364.956, 498.438, 633.213,
        778.232, 1200.66, 888.477, 1411.31, 1958.65, 2528.16, 3063.36, 4747.2],
    "triton/siglip/bf16/none": [
        0.61, 0.61, 0.61, 0.61, 0.854, 0.693, 1.178, 1.191, 1.26, 1.329, 1.832, 2.486, 2.833,
        3.64, 4.428, 4.977, 6.771, 9.393, 8.813, 13.015, 16.697, 19.307, 25.549, 34.955, 33.275,
        49.699, 55.779, 73.452, 84.645, 133.362, 129.882, 151.636, 207.821, 274.654, 340.469,
        529.332, 372.574, 560.614, 786.71, 1046.96, 1285.24, 2036.88],
    "triton/siglip/fp32/none": [
        0.592, 0.592, 0.592, 0.634, 0.778, 1.433, 1.161, 1.289, 1.794, 2.338, 2.883, 5.043,
        3.599, 4.769, 6.873, 8.977, 11.082, 19.88, 12.952, 18.654, 26.917, 35.18, 43.443,
        67.154, 49.592, 73.864, 106.629, 133.121, 168.675, 259.6, 194.63, 283.931, 400.65,
        521.409, 643.761, 1036.39, 590.715, 1071.07, 1540.48, 2080.02, 2524.28, 4028.26],
    "cuda/clip/bf16/none": [
        0.161, 0.21, 0.335, 0.383, 0.585, 0.731, 0.492, 0.908, 1.094, 1.465, 1.926, 2.799,
        1.694, 3.184, 4.282, 5.738, 7.552, 10.961, 6.27, 12.603, 16.933, 22.719, 29.896, 43.386,
        25.111, 47.51, 66.428, 90.419, 117.406, 172.642, 96.542, 183.552, 261.674, 329.074,
        448.402, 646.967, 382.037, 673.638, 989.921, 1291.99, 1632.52, 2543.17],
    "cuda/clip/fp32/none": [
        0.482, 0.628, 1.058, 1.203, 1.633, 2.354, 1.9, 2.466, 4.169, 4.735, 6.437, 9.272, 7.009,
        9.786, 15.716, 18.794, 25.571, 36.809, 27.156, 38.999, 62, 74.896, 101.937, 146.691,
        103.962, 155.717, 236.347, 301.836, 373.318, 571.457, 409.233, 682.335, 909.487,
        1154.33, 1432.87, 2241.84, 1424.25, 2357.56, 3414.88, 4525.02, 5700.81, 8944.88],
    "hybrid/clip/bf16/none": [
        1.114, 1.114, 1.114, 1.114, 1.114, 1.239, 1.114, 1.231, 1.428, 1.654, 1.902, 2.647,
        2.679, 3.206, 4.088, 4.97, 5.851, 8.496, 9.472, 11.979, 14.545, 18.324, 21.153, 31.064,
        37.549, 43.542, 60.797, 68.542, 81.312, 119.623, 158.349, 186.763, 228.28, 294.666,
        326.853, 474.713, 712.443, 881.435, 1069.59, 1287.12, 1528.2, 2251.45],
    "hybrid/clip/bf16/inf": [
        1.078, 1.078, 1.078, 1.078, 1.078, 1.132, 1.078, 1.125, 1.274, 1.457, 1.657, 2.258,
        2.307, 2.813, 3.502, 4.191, 4.88, 6.947, 7.965, 10.222, 12.202, 15.092, 17.269, 24.87,
        31.356, 36.981, 50.169, 56.089, 65.778, 94.845, 132.173, 157.716, 190.793, 239.154,
        264.716, 375.601, 596.388, 742.543, 907.865, 1087.87, 1279.65, 1855.01],
    "hybrid/clip/fp32/none": [
        0.754, 0.754, 0.788, 0.87, 0.952, 1.198, 0.986, 1.321, 1.731, 2.142, 2.552, 3.782,
        3.003, 4.593, 6.184, 7.775, 9.365, 14.138, 11.447, 17.637, 23.899, 30.162, 36.425,
        55.213, 46.621, 69.678, 94.528, 119.379, 144.229, 218.78, 199.942, 277.708, 376.713,
        475.717, 574.722, 871.737, 914.558, 1187.97, 1576.11, 1964.26, 2352.4, 3516.84],
    "hybrid/clip/fp32/inf": [
        0.736, 0.736, 0.736, 0.764, 0.822, 0.996, 0.879, 1.125, 1.439, 1.752, 2.066, 3.008,
        2.61, 3.815, 5.021, 6.226, 7.432, 11.048, 9.875, 14.523, 19.245, 23.968, 28.69, 42.856,
        40.06, 57.225, 75.913, 94.601, 113.289, 169.352, 170.895, 227.896, 302.251, 376.605,
        450.96, 674.025, 775.665, 988.721, 1278.27, 1567.81, 1857.35, 2725.99],
    "hybrid/siglip/bf16/none": [
        0.906, 0.906, 0.906, 0.906, 0.906, 1.041, 0.952, 1.073, 1.329, 1.586, 1.842, 2.612,
        2.513, 3.057, 3.955, 4.853, 5.751, 8.446, 8.996, 11.537, 14.137, 17.949, 20.811, 30.823,
        35.737, 41.797, 59.118, 66.93, 79.767, 118.278, 150.876, 179.424, 221.073, 287.594,
        319.914, 468.174, 680.335, 849.595, 1038.02, 1255.81, 1497.16, 2221.22],
    "hybrid/siglip/bf16/inf": [
        0.87, 0.87, 0.87, 0.87, 0.87, 0.935, 0.922, 0.972, 1.181, 1.389, 1.598, 2.223, 2.14,
        2.663, 3.369, 4.075, 4.781, 6.898, 7.49, 9.78, 11.794, 14.717, 16.927, 24.628, 29.544,
        35.236, 48.49, 54.477, 64.233, 93.5, 124.7, 150.376, 183.586, 232.082, 257.777, 369.062,
        564.28, 710.702, 876.291, 1056.56, 1248.61, 1824.77],
    "hybrid/siglip/fp32/none": [
        0.492, 0.492, 0.532, 0.614, 0.715, 1.042, 0.783, 1.192, 1.602, 2.012, 2.422, 3.653,
        2.791, 4.382, 5.973, 7.563, 9.154, 13.926, 10.91, 17.1, 23.362, 29.625, 35.888, 54.676,
        44.713, 67.771, 92.621, 117.471, 142.322, 216.873, 192.306, 270.072, 369.076, 468.081,
        567.086, 864.1, 882.152, 1155.56, 1543.71, 1931.85, 2320, 3484.43],
    "hybrid/siglip/fp32/inf": [
        0.474, 0.474, 0.474, 0.508, 0.591, 0.845, 0.682, 0.995, 1.309, 1.623, 1.937, 2.878,
        2.398, 3.604, 4.809, 6.015, 7.22, 10.837, 9.338, 13.986, 18.709, 23.431, 28.153, 42.319,
        38.153, 55.318, 74.006, 92.693, 111.381, 167.445, 163.258, 220.26, 294.614, 368.969,
        443.324, 666.388, 743.26, 956.316, 1245.86, 1535.4, 1824.95, 2693.58],
}
# END MODEL TABLE

_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16", "fp16": "bf16",
                  "float16": "bf16", "half": "bf16", "torch.float16": "bf16", "fp32": "fp32",
                  "float32": "fp32", "float": "fp32", "torch.float32": "fp32"}


def _interpolate(values: List[Optional[float]], n: int, d: int) -> Optional[float]:
    """Bilinear in (log N, log d) on log ms; None outside the grid or where a
    corner is missing."""
    def bracket(grid, v):
        if v < grid[0] or v > grid[-1]:
            return None
        for i in range(len(grid) - 1):
            if grid[i] <= v <= grid[i + 1]:
                lo, hi = grid[i], grid[i + 1]
                return i, (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return len(grid) - 1, 0.0

    bn, bd = bracket(TABLE_NS, n), bracket(TABLE_DS, d)
    if bn is None or bd is None:
        return None
    (i, fi), (j, fj) = bn, bd
    total = 0.0
    for di, wi in ((0, 1 - fi), (1, fi)):
        for dj, wj in ((0, 1 - fj), (1, fj)):
            if wi * wj == 0:
                continue
            ii, jj = min(i + di, len(TABLE_NS) - 1), min(j + dj, len(TABLE_DS) - 1)
            value = values[ii * len(TABLE_DS) + jj]
            if value is None or value <= 0:
                return None
            total += wi * wj * math.log(value)
    return math.exp(total)


@functools.lru_cache(maxsize=4096)
def model_ms(backend: str, n: int, d: int, dtype: str, loss: str = "clip",
             memory_budget=None) -> Optional[float]:
    """The modelled H100 forward + backward time (ms) of ``backend`` on an
    N x N ``loss`` with d-dimensional ``dtype`` features, or None where it is
    not modelled (other backends, CUDA's SigLIP, shapes outside TABLE_NS x
    TABLE_DS, float64).

    Reads ``MODEL_TABLE`` (the models' totals on a grid, interpolated in
    log N, log d): no kernel is compiled here, so it is safe and fast inside a
    process that runs them. ``memory_budget`` (bytes, inf, None) matters to
    hybrid alone: its time moves from the none to the inf entry in proportion
    to the rows the budget keeps (``panels.kept_rows``: each kept panel skips
    one recompute GEMM)."""
    name = _DTYPE_ALIASES.get(str(dtype))
    if (name is None or backend not in ("triton", "cuda", "hybrid")
            or loss not in ("clip", "siglip")):
        return None
    base = MODEL_TABLE.get(_variant_key(backend, loss, name, "none"))
    if base is None:
        return None
    t0 = _interpolate(base, int(n), int(d))
    if t0 is None or backend != "hybrid" or not memory_budget:
        return t0
    try:
        from .backends.hybrid.panels import kept_rows
    except ImportError:  # no triton: the hybrid backend cannot run here anyway
        return None
    inf = MODEL_TABLE.get(_variant_key(backend, loss, name, "inf"))
    t_inf = None if inf is None else _interpolate(inf, int(n), int(d))
    if t_inf is None:
        return None
    fraction = kept_rows(int(n), int(n), 0, float(memory_budget)) / int(n)
    return t0 + fraction * (t_inf - t0)


