import os

import torch

# Without a GPU the Triton kernels run through Triton's interpreter, which must
# be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# backend="auto" reads the per-user cache that `python -m clipfast.check`
# writes (clipfast.autoselect.cache_path): the tests read an empty one of
# their own, so a developer's measurements never change their choices.
if "CLIPFAST_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["CLIPFAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="clipfast-test-cache-")


# torchvision must import for the integrations' clients (see the module).
from tests.torchvision_shim import make_torchvision_importable  # noqa: E402

_TORCHVISION_SCHEMAS = make_torchvision_importable()  # kept alive: see the function
