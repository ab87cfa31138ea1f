"""Which accelerator this machine can offer a run, decided without importing torch here.

The `leap` process stays light: NVIDIA GPUs are found through their device files, and only when
some exist is a short `python -c "import torch; ..."` asked whether the installed torch can use
them (a CPU-only wheel on a GPU box cannot). TPU hosts are recognised by their device files.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache

CPU, GPU, TPU = "cpu", "nvidia-gpu", "google-tpu"


class AcceleratorUnavailable(Exception):
    pass


@dataclass(frozen=True)
class DeviceChoice:
    requested: str          # spec.accelerator.type
    used: str               # what the local workers get as LEAP_ACCELERATOR
    gpus: int               # local GPUs usable by torch (0 unless used == nvidia-gpu)
    note: str | None        # one line for the user when used != requested (or worth knowing)


def _nvidia_device_files() -> int:
    return len(glob.glob("/dev/nvidia[0-9]*"))


@lru_cache(maxsize=1)
def torch_cuda_devices() -> int:
    """GPUs the installed torch can use; 0 without NVIDIA device files (no torch import then)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not _nvidia_device_files():
        return 0
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def tpu_host() -> bool:
    # TPU VMs expose chips as /dev/accel* (v2-v4) or VFIO groups (v5e and later).
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def choose(requested: str, framework: str, gpus_per_worker: int, workers: int, allow_cpu: bool) -> DeviceChoice:
    if requested == TPU:
        if tpu_host():
            return DeviceChoice(TPU, TPU, 0, None)
        if not allow_cpu:
            raise AcceleratorUnavailable(
                "this run asks for a TPU (spec.accelerator.type: google-tpu) and this machine is not a TPU host. "
                "Run it on a Cloud TPU VM, apply it to a cluster with TPU node pools (kubectl apply -f), "
                "or add --allow-cpu to run it here on CPU (slowly, same code path).")
        return DeviceChoice(TPU, CPU, 0, "no TPU on this machine: running on CPU (--allow-cpu)")
    if requested == GPU:
        gpus = torch_cuda_devices() if framework == "pytorch" else _nvidia_device_files()
        if not gpus:
            return DeviceChoice(GPU, CPU, 0, "no NVIDIA GPU usable here: running on CPU (gloo instead of NCCL)")
        wanted = gpus_per_worker * workers
        note = None if gpus >= wanted else f"{wanted} GPU(s) asked for, {gpus} here: workers share them"
        return DeviceChoice(GPU, GPU, gpus, note)
    # A CPU run stays on CPU, as its pods would on a CPU node.
    note = None
    if _nvidia_device_files():
        note = "a GPU is present; --set spec.accelerator.type=nvidia-gpu uses it"
    return DeviceChoice(CPU, CPU, 0, note)
