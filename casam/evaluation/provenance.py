"""What every result file of casam carries: the machine it was measured on, and JSON-safe numbers.

Used by ``casam benchmark``, ``casam federated`` and the scripts of ``benchmarks/``.
"""

from __future__ import annotations

import math
import os
import platform
from typing import Any, Dict

import numpy as np
import torch

from casam.runtime import allocator_tuned

__all__ = ["SIMD_FLAGS", "json_safe", "machine_info"]

# vector extensions that decide CPU speed here (the 2-core box has come both with AVX2 only and with AVX-512 BF16)
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def machine_info(device: str) -> Dict[str, Any]:
    """The machine a result was measured on.

    Args:
        device: the torch device the result was measured on (``cpu``, ``cuda``, ``cuda:1`` ...).

    Returns:
        CPU model, family/model numbers and vector extensions, cores, torch threads and version, Python, platform,
        device (and GPU), memory in GB, and whether glibc keeps freed memory (:mod:`casam.runtime`).
    """
    cpu, fields = platform.processor() or "", {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, val = line.partition(":")
                fields[key.strip()] = val.strip()
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
            "malloc_tuned": allocator_tuned()}
    if "cpu family" in fields:
        info["cpu_id"] = (f"{fields.get('vendor_id', '')} family {fields['cpu family']} "
                          f"model {fields.get('model', '?')}").strip()
    if "flags" in fields:
        info["simd"] = [f for f in SIMD_FLAGS if f in fields["flags"].split()]
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def json_safe(x: Any) -> Any:
    """A JSON-safe copy of a result.

    Args:
        x: nested dicts, lists and tuples of numbers, strings, numpy scalars.

    Returns:
        The same structure with NaN/inf as None, numpy scalars as Python ones, floats rounded to 6 digits and
        tuples as lists (dict keys as strings).
    """
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if not math.isfinite(x) else round(x, 6)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
