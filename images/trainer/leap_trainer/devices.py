"""Peak dense FLOP/s per device and the compute precision a run uses: the denominator of MFU.

One source of truth for peaks. Figures are the vendors' dense (no sparsity) peaks of one
device for a compute precision:

- "bf16": bf16 (or fp16) tensor-core matmuls, the PyTorch path on GPUs with compute capability
  8.0 or newer, and the Keras path on TPUs (mixed_bfloat16);
- "fp16": fp16 matmuls with a gradient scaler (compute capability 7.x: V100, T4);
- "tf32": fp32 tensors whose matmuls TensorFlow runs in TF32 (its default on compute
  capability 8.0+); PyTorch keeps full fp32 unless told otherwise;
- "fp32": full fp32 matmuls.

A device or precision without a figure here has an unknown peak: MFU is then reported as
unknown (absent / null), never guessed. CPUs have no entry.

GPU names are matched by whole words of the name CUDA reports ("NVIDIA H100 80GB HBM3",
"NVIDIA A100-SXM4-80GB"), so "L40S" is not an "L4" and "GH200" is not an "H200". TPUs are
matched by their generation, from GKE's TPU_ACCELERATOR_TYPE (e.g. "v5litepod-16") or the node
label the operator renders as LEAP_TPU_TYPE (e.g. "tpu-v6e-slice").
"""

from __future__ import annotations

import math
import os
import platform
import re
from dataclasses import dataclass

T = 1e12

# (words that must all be in the name, {precision: peak FLOP/s of one device}); first match wins,
# so a qualified entry (PCIe, NVL) comes before its plain one.
GPU_PEAKS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H100", "PCIE"), {"bf16": 756 * T, "fp16": 756 * T, "tf32": 378 * T, "fp32": 51 * T}),
    (("H100", "NVL"), {"bf16": 835 * T, "fp16": 835 * T, "tf32": 418 * T, "fp32": 60 * T}),
    (("H100",), {"bf16": 989 * T, "fp16": 989 * T, "tf32": 495 * T, "fp32": 67 * T}),      # SXM
    (("H800", "PCIE"), {"bf16": 756 * T, "fp16": 756 * T, "tf32": 378 * T, "fp32": 51 * T}),
    (("H800",), {"bf16": 989 * T, "fp16": 989 * T, "tf32": 495 * T, "fp32": 67 * T}),      # SXM
    (("H200", "NVL"), {"bf16": 835 * T, "fp16": 835 * T, "tf32": 418 * T, "fp32": 60 * T}),
    (("H200",), {"bf16": 989 * T, "fp16": 989 * T, "tf32": 495 * T, "fp32": 67 * T}),      # SXM
    (("GH200",), {"bf16": 989 * T, "fp16": 989 * T, "tf32": 495 * T, "fp32": 67 * T}),
    (("H20",), {"bf16": 148 * T, "fp16": 148 * T, "tf32": 74 * T, "fp32": 44 * T}),
    (("GB200",), {"bf16": 2500 * T, "fp16": 2500 * T}),       # TF32/fp32 per GPU: not published per GPU here
    (("B200",), {"bf16": 2250 * T, "fp16": 2250 * T}),        # TF32/fp32: unknown rather than guessed
    (("A100",), {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T}),   # SXM and PCIe
    (("A10G",), {"bf16": 70 * T, "fp16": 70 * T, "tf32": 35 * T, "fp32": 31.2 * T}),
    (("A10",), {"bf16": 125 * T, "fp16": 125 * T, "tf32": 62.5 * T, "fp32": 31.2 * T}),
    (("L40S",), {"bf16": 362 * T, "fp16": 362 * T, "tf32": 183 * T, "fp32": 91.6 * T}),
    (("L40",), {"bf16": 181 * T, "fp16": 181 * T, "tf32": 90.5 * T, "fp32": 90.5 * T}),
    (("L4",), {"bf16": 121 * T, "fp16": 121 * T, "tf32": 60 * T, "fp32": 30.3 * T}),
    (("V100",), {"fp16": 125 * T, "fp32": 15.7 * T}),
    (("T4",), {"fp16": 65 * T, "fp32": 8.1 * T}),
]

# TPU generation -> (dense bf16 peak FLOP/s of one chip, TensorFlow devices per chip).
# v4 and v5p chips are one device (megacore); a TPU7x (Ironwood) chip shows as two devices.
TPU_PEAKS: dict[str, tuple[float, int]] = {
    "v4": (275 * T, 1),
    "v5e": (197 * T, 1),
    "v5p": (459 * T, 1),
    "v6e": (918 * T, 1),
    "tpu7x": (2307 * T, 2),
}
ENV_TPU_ACCELERATOR_TYPE = "TPU_ACCELERATOR_TYPE"   # set by GKE on TPU pods, e.g. v5litepod-16


def _words(name: str) -> set[str]:
    return set(re.split(r"[\s\-_/]+", name.upper()))


def tpu_generation(tpu_type: str) -> str | None:
    """'v5litepod-16', 'tpu-v5-lite-podslice', 'v6e-8', 'tpu7x-64'... -> a key of TPU_PEAKS, or None."""
    text = tpu_type.lower().strip()
    text = re.sub(r"^tpu[-_ ]?(?=v)", "", text)           # tpu-v6e-slice -> v6e-slice
    patterns = [("tpu7x", r"^(tpu)?7x\b|^v7x?\b|^tpu7x|^ironwood"), ("v5e", r"^v5[-_ ]?lite|^v5e\b"),
                ("v5p", r"^v5p\b"), ("v6e", r"^v6e\b|^v6[-_ ]?lite"), ("v4", r"^v4\b")]
    for generation, pattern in patterns:
        if re.search(pattern, text):
            return generation
    return None


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of ONE device for a precision, or None when unknown."""
    if device_name.upper().startswith("TPU"):
        generation = tpu_generation(device_name[3:].strip())
        if generation is None or precision != "bf16":
            return None   # fp32 matmuls on a TPU run as several bf16 passes: no honest single peak
        chip, per_chip = TPU_PEAKS[generation]
        return chip / per_chip
    words = _words(device_name)
    for required, peaks in GPU_PEAKS:
        if set(required) <= words:
            return peaks.get(precision)
    return None


def worker_peak_flops(device_name: str, precision: str, devices: int) -> float | None:
    """Peak FLOP/s of all the devices one process (or worker) drives: the MFU denominator of its metrics."""
    peak = peak_flops(device_name, precision)
    return peak * devices if peak is not None and devices > 0 else None


def tpu_device_name(env=os.environ) -> str:
    """'TPU <type>' from GKE's TPU_ACCELERATOR_TYPE or the operator's LEAP_TPU_TYPE; the peak table reads it."""
    from . import contract as c

    tpu_type = env.get(ENV_TPU_ACCELERATOR_TYPE) or env.get(c.ENV_TPU_TYPE) or ""
    return f"TPU {tpu_type}".strip() if tpu_type else "TPU (type unknown)"


def cuda_precision(capability: tuple[int, int], framework: str) -> str:
    """The matmul precision a GPU run uses: bf16 only where the GPU does it natively (8.0+).

    PyTorch: bf16 autocast on 8.0+, else fp32 (T4, V100: no native bf16). TensorFlow keeps fp32
    variables and runs their matmuls in TF32 on 8.0+ (its default), full fp32 before.
    """
    native = tuple(capability) >= (8, 0)
    if framework == "pytorch":
        return "bf16" if native else "fp32"
    return "tf32" if native else "fp32"


def mfu(flops_per_second: float, peak: float | None) -> float | None:
    return flops_per_second / peak if peak else None


# --- CPUs ------------------------------------------------------------------------------------------

CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def cgroup_cpu_limit(v2: str = CGROUP_V2_CPU_MAX, v1_quota: str = CGROUP_V1_QUOTA,
                     v1_period: str = CGROUP_V1_PERIOD) -> float | None:
    """The container's CPU limit in cores from the cgroup quota (v2 cpu.max, else v1), or None if unlimited."""
    def read(path: str) -> str | None:
        try:
            with open(path) as handle:
                return handle.read().strip()
        except OSError:
            return None

    text = read(v2)
    if text:
        quota, _, period = text.partition(" ")
        if quota == "max":
            return None
        try:
            return int(quota) / int(period or 100000)
        except ValueError:
            return None
    quota_text, period_text = read(v1_quota), read(v1_period)
    try:
        quota, period = int(quota_text or "-1"), int(period_text or "100000")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_threads(processes: int = 1, **cgroup_paths) -> int:
    """Threads per process on CPU: the pod's CPU limit (cgroup quota, rounded up), else the cores,
    shared by the local processes."""
    cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(**cgroup_paths)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores // max(1, processes))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for reports and summaries."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


@dataclass(frozen=True)
class Accelerator:
    """What a process trains on: the name the peak table reads, the precision, and how many devices."""

    name: str
    precision: str
    devices: int = 1

    @property
    def peak(self) -> float | None:
        """Peak FLOP/s of all `devices` together (None when unknown)."""
        return worker_peak_flops(self.name, self.precision, self.devices)
