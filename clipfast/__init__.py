"""clipfast: fused, linear-memory CLIP contrastive loss."""

# The exports are imported on first use (PEP 562), not with the package, so
# that ``python -m clipfast.<tool> --help`` and argument errors answer without
# importing torch (the tools import it after parsing their arguments).
# ``from clipfast import ClipLoss`` and ``clipfast.clip_loss`` work as before.
import importlib as _importlib

_EXPORTS = {
    "BACKENDS": "api",
    "clip_loss": "api",
    "resolve_backend": "api",
    "siglip_loss": "api",
    "triton_available": "api",
    "info_nce_loss": "infonce",
    "ClipLoss": "modules",
    "CoCaLoss": "modules",
    "DistillClipLoss": "modules",
    "SigLipLoss": "modules",
    "reference_clip_loss": "backends.reference",
    "reference_siglip_loss": "backends.reference",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__"):
        # Submodules as attributes (``clipfast.autoselect.explain`` after
        # ``import clipfast``), as the eager imports used to provide them.
        try:
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
