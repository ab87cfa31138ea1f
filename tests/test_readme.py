"""The README is a user's first contact: its examples must work and its tables must be true."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from leap_operator import names
from leap_operator.validation import validate_run
from leap_trainer import contract

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _table_rows() -> dict[str, list[str]]:
    """First cell (a `metric`) -> the other cells, for every markdown table row."""
    rows = {}
    for line in README.splitlines():
        match = re.match(r"\|\s*`([a-z_]+)`\s*\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def test_every_trainingrun_in_the_readme_is_valid():
    runs = [doc for block in _code_blocks("yaml") for doc in yaml.safe_load_all(block)
            if isinstance(doc, dict) and doc.get("kind") == names.KIND]
    assert runs, "the README shows no TrainingRun"
    for run in runs:
        assert validate_run(run) == [], run["metadata"]["name"]


def test_readme_training_metrics_table_matches_the_contract():
    rows = _table_rows()
    for name, (kind, help_text) in contract.TRAIN_METRICS.items():
        assert name in rows, f"{name} missing from the README's training metrics table"
        assert rows[name][0] == kind, f"{name}: README says {rows[name][0]}, contract says {kind}"
        assert rows[name][1] == help_text, f"{name}: README's meaning differs from contract.TRAIN_METRICS"
    documented = {name for name in rows if name.startswith("leap_train_") or name.startswith("leap_accelerator")}
    assert documented == set(contract.TRAIN_METRICS), "the README documents a metric leap-train does not export"


def test_readme_operator_metrics_table_matches_names():
    operator_metrics = {value for key, value in vars(names).items() if key.startswith("OM_")}
    documented = {name for name in _table_rows() if name.startswith("leap_operator_")}
    assert documented == operator_metrics


def test_quick_start_commands_exist_and_ci_runs_the_test_command():
    quick_start = _code_blocks("sh")[0]
    commands = [line.split("#")[0].strip() for line in quick_start.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:.*\n\t.*leap run manifests/examples/mnist-cpu.yaml", makefile, flags=re.M)
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert "make test" in [line.strip() for line in ci], ".ci/run must call the README's test command"


def test_readme_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(((?:docs|bench|manifests|helm)/[^)#]+)\)", README):
        assert (ROOT / target).exists(), target


def test_links_between_the_docs_point_at_files_that_exist():
    docs = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "bench" / "RESULTS.md"]
    for page in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
