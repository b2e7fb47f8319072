"""Lets torchvision import where its compiled ops cannot load (imported by
tests/conftest.py before any test module).

The torchvision wheel the package indexes serve next to this CPU torch has
an ops library that does not load against it; torchvision 0.28 then fails at
import, and with it ``import open_clip`` and ``import transformers`` (which
imports torchvision whenever it is installed). None of the integrations'
models call torchvision's C++ ops.
"""

import glob
import importlib.util
import os
import sys

import torch


def make_torchvision_importable():
    """The torchvision wheel the package index serves next to the CPU torch is
    a CUDA build whose ops library cannot load; torchvision 0.28 then fails
    at import (``operator torchvision::nms does not exist``: it registers a
    fake kernel for nms without checking that its ops loaded), and with it
    ``import open_clip``. Declaring the two op schemas it expects lets it
    import without its C++ ops, which open_clip's CLIP models never call. A
    torchvision whose ops load is left alone."""
    if "torchvision" in sys.modules and sys.modules["torchvision"] is None:
        del sys.modules["torchvision"]
    if "torchvision" in sys.modules:
        return None
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        if libraries:
            torch.ops.load_library(libraries[0])
            return None
    except OSError:
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return None
    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return library  # kept alive: a Library's definitions go when it is collected
