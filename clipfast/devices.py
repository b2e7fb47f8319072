"""Names of the devices results are measured on and chosen for: shared by the
benchmark (which records them) and ``auto`` (which looks them up)."""

from __future__ import annotations

import os
import platform

import torch


def device_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3" for a GPU, "CPU (x86_64, 16 cores)" for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
