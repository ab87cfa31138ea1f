"""Training progress from a worker's Prometheus text: what `kubectl get ltr` shows.

progress_from_metrics_text(text) reads one rank's /metrics page (the leap_train_* metrics of
leap_trainer.contract) and returns that rank's numbers. run_progress() turns rank 0's numbers
into the run's: throughput and FLOP/s are multiplied by the world size. Data-parallel ranks
step in lockstep on equal per-process batches, so rank 0's rate times WORLD_SIZE is the run's
rate without scraping every pod (and without giving training pods any RBAC).
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from leap_operator import api
from leap_trainer import contract

# status.progress key -> (sample name, type)
FIELDS: dict[str, tuple[str, type]] = {
    "step": (contract.M_STEPS, int),
    "totalSteps": (contract.M_TOTAL_STEPS, int),
    "samplesPerSecond": (contract.M_SAMPLES_PER_SECOND, float),
    "etaSeconds": (contract.M_ETA, float),
    "loss": (contract.M_LOSS, float),
    "flopsPerSecond": (contract.M_FLOPS_PER_SECOND, float),
    "epoch": (contract.M_EPOCH, int),
    "accuracy": (contract.M_ACCURACY, float),
}
SCALED = ("samplesPerSecond", "flopsPerSecond")


def _rank(labels: dict) -> float:
    try:
        return float(labels.get("rank", 0))
    except ValueError:
        return math.inf


def parse_samples(text: str) -> list:
    """Every sample of a /metrics page (parsed once per scrape: progress and stall detection
    both read it). Malformed text raises ValueError."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def progress_from_metrics_text(text: str) -> dict:
    """One rank's progress: step, totalSteps, percent, samplesPerSecond, etaSeconds, loss,
    flopsPerSecond, epoch, accuracy; a key is present only when its metric is (percent when
    the progress ratio or steps are). If the page holds several ranks, the lowest rank wins.
    Malformed text raises ValueError."""
    return progress_from_samples(parse_samples(text))


def progress_from_samples(samples: list) -> dict:
    """progress_from_metrics_text() of parse_samples()'s result."""
    wanted = {sample: key for key, (sample, _) in FIELDS.items()}
    found: dict[str, tuple[float, float]] = {}  # key -> (rank, value)
    ratio: tuple[float, float] | None = None
    for sample in samples:
        value = float(sample.value)
        if math.isnan(value) or math.isinf(value):
            continue
        rank = _rank(sample.labels)
        if sample.name == contract.M_PROGRESS:
            if ratio is None or rank < ratio[0]:
                ratio = (rank, value)
        key = wanted.get(sample.name)
        if key and (key not in found or rank < found[key][0]):
            found[key] = (rank, value)
    out: dict = {key: FIELDS[key][1](value) for key, (_, value) in found.items()}
    if ratio is not None:
        out["percent"] = round(min(max(ratio[1], 0.0), 1.0) * 100, 1)
        if out.get("totalSteps"):
            # The steps counter counts this process's steps (0 after a resume); the run's step is
            # the progress ratio of its planned steps.
            out["step"] = int(round(min(max(ratio[1], 0.0), 1.0) * out["totalSteps"]))
    elif out.get("totalSteps"):
        out["percent"] = round(min(out.get("step", 0) / out["totalSteps"], 1.0) * 100, 1)
    for key in ("samplesPerSecond", "flopsPerSecond", "etaSeconds"):
        if key in out:
            out[key] = round(max(out[key], 0.0), 3)
    return out


def run_progress(rank0: dict, world_size: int) -> dict:
    """The run's progress from rank 0's: rates times world size, a human ETA (for the printer
    column). Keys with no value are left out (the CRD's schema has no nullable fields)."""
    out = {k: v for k, v in rank0.items() if v is not None}
    for key in SCALED:
        if key in out:
            out[key] = round(out[key] * max(1, int(world_size)), 3)
    if "etaSeconds" in out:
        out["eta"] = api.format_duration(out["etaSeconds"])
    return out
