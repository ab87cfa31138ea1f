"""Peak dense FLOP/s per device, for model-FLOPs utilisation (MFU).

Figures are the vendors' dense (no sparsity) peaks per chip. Matching is by substring of
the device name torch/TF report (e.g. "NVIDIA H100 80GB HBM3"), most specific first.
CPUs have no entry: MFU is then absent rather than invented.
"""

from __future__ import annotations

import platform

# (name fragment, {dtype: peak FLOP/s}); order matters: first match wins.
_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIE", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),      # SXM
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 80e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
    # Cloud TPU chips (bf16 is the native matmul type; fp32 matmuls run as multi-pass bf16).
    ("TPU V6", {"bf16": 918e12}),
    ("TPU V5P", {"bf16": 459e12}),
    ("TPU V5 LITE", {"bf16": 197e12}),
    ("TPU V5E", {"bf16": 197e12}),
    ("TPU V4", {"bf16": 275e12}),
]


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device for a compute dtype, or None when unknown."""
    name = device_name.upper().replace("-", " ")
    for fragment, peaks in _PEAKS:
        if fragment in name:
            return peaks.get(dtype)
    return None


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
