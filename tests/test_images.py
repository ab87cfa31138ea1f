"""Leap's container images, checked without a Docker engine.

Each Dockerfile is linted with hadolint, must run as a numeric non-root user with the right
entrypoint, and does its whole install in one `pip install` command. That command is read
out of the Dockerfile itself (single source of truth) and run in a fresh venv against a
build context assembled from the Dockerfile's own COPY lines:
- operator image: installed for real, then `leap --help` and `leap crd` run from that venv;
- torch-gpu image: installed for real (this machine's pip finds the torch 2.13.0 CPU wheel
  on local disk); on PyPI the same pin is the CUDA build, checked against the CUDA base image;
- tf-tpu image: resolved with `pip install --dry-run --report` (tensorflow-tpu + libtpu are
  about 500 MB of wheels: a real install costs minutes and cannot run without a TPU anyway).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"

# image directory -> the ENTRYPOINT it must have
ENTRYPOINTS = {
    "operator": ["leap", "operator"],
    "torch-gpu": ["leap-train"],
    "tf-tpu": ["leap-train"],
}


@dataclass
class Instruction:
    keyword: str   # upper-case Dockerfile keyword
    args: str      # the rest of the (continuation-joined) line
    line: int      # 1-based line where it starts


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Dockerfile instructions with backslash continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: file ends inside a continued line"
    return instructions


def dockerfile(image: str) -> Path:
    return IMAGES / image / "Dockerfile"


def install_command(image: str) -> list[str]:
    """The arguments after `pip install` in the image's single install RUN."""
    runs = [i for i in parse_dockerfile(dockerfile(image)) if i.keyword == "RUN" and "pip install" in i.args]
    assert len(runs) == 1, (
        f"{dockerfile(image)} must do its install in exactly one `RUN pip install ...` "
        f"(found {len(runs)}), so the test can run the same command"
    )
    words = shlex.split(runs[0].args)
    assert "&&" not in words and ";" not in runs[0].args, (
        f"{dockerfile(image)}:{runs[0].line}: keep the install RUN a single pip command"
    )
    at = next(i for i in range(len(words) - 1) if words[i].endswith("pip") and words[i + 1] == "install")
    return words[at + 2:]


def build_context(image: str, into: Path) -> Path:
    """Copy what the Dockerfile's COPY lines copy (relative to its WORKDIR) into `into`."""
    for instruction in parse_dockerfile(dockerfile(image)):
        if instruction.keyword != "COPY":
            continue
        words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
        *sources, destination = words
        for source in sources:
            origin = REPO / source
            assert origin.exists(), f"{dockerfile(image)}:{instruction.line}: COPY source {source} does not exist"
            target = into / destination / origin.name if destination.endswith("/") else into / destination
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    return into


def fresh_venv(path: Path) -> Path:
    """A new venv without system site-packages; returns its bin directory."""
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(path)
    return path / "bin"


def pip_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 600):
    result = subprocess.run(cmd, cwd=cwd, env=env or pip_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{shlex.join(cmd)} failed with {result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-3000:]}"
    )
    return result


# --- static checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(ENTRYPOINTS))
def test_hadolint_finds_nothing(image: str):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    # Default failure threshold: any finding, warnings and style included. Rules the images
    # deliberately break are ignored inline in the Dockerfile, next to the reason.
    result = subprocess.run([hadolint, str(dockerfile(image))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("image", sorted(ENTRYPOINTS))
def test_runs_as_numeric_non_root_user(image: str):
    users = [i for i in parse_dockerfile(dockerfile(image)) if i.keyword == "USER"]
    assert users, f"{dockerfile(image)} has no USER: the image would run as root"
    uid, _, gid = users[-1].args.partition(":")
    # Pod Security "restricted" sets runAsNonRoot; the kubelet can only verify a numeric UID.
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1].args}: use a numeric non-zero UID"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {users[-1].args}: use a numeric non-zero GID"


@pytest.mark.parametrize("image", sorted(ENTRYPOINTS))
def test_entrypoint(image: str):
    entrypoints = [i for i in parse_dockerfile(dockerfile(image)) if i.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1, f"{dockerfile(image)} needs exactly one ENTRYPOINT"
    # Exec form, so the trainer is PID 1 and receives SIGTERM on pod deletion.
    assert json.loads(entrypoints[0].args) == ENTRYPOINTS[image]


@pytest.mark.parametrize("image", sorted(ENTRYPOINTS))
def test_build_context_ignore_file_keeps_every_copied_path(image: str):
    """BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile; it must not hide a COPY source
    (and keeps .venv and the rest of the checkout out of the build context)."""
    ignore = dockerfile(image).with_name("Dockerfile.dockerignore")
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the ignore file should start by excluding everything"
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for instruction in parse_dockerfile(dockerfile(image)):
        if instruction.keyword == "COPY":
            *sources, _ = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
            for source in sources:
                assert source.rstrip("/") in kept, f"{ignore} excludes COPY source {source}"


def test_install_command_is_read_from_the_dockerfile(tmp_path: Path):
    """The parser the install tests rely on: continuation lines, quoting, one pip command."""
    (tmp_path / "Dockerfile").write_text(
        "FROM python:3.11-slim\n# comment\nRUN pip install --no-cache-dir \\\n    \".[torch]\" extra==1\n"
    )
    parsed = parse_dockerfile(tmp_path / "Dockerfile")
    assert [i.keyword for i in parsed] == ["FROM", "RUN"]
    words = shlex.split(parsed[1].args)
    assert words == ["pip", "install", "--no-cache-dir", ".[torch]", "extra==1"]


# --- the installs ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_operator_image_install_works_in_fresh_venv(tmp_path: Path):
    context = build_context("operator", tmp_path / "context")
    bin_dir = fresh_venv(tmp_path / "venv")
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", *install_command("operator")], cwd=context)

    help_text = run([str(bin_dir / "leap"), "--help"]).stdout
    assert "operator" in help_text
    crd = run([str(bin_dir / "leap"), "crd"]).stdout
    assert "kind: CustomResourceDefinition" in crd and "TrainingRun" in crd
    # The operator image carries no ML framework.
    frameworks = run([str(bin_dir / "python"), "-c",
                      "import importlib.util as u; print([m for m in ('torch', 'tensorflow') if u.find_spec(m)])"])
    assert frameworks.stdout.strip() == "[]"


@pytest.mark.slow
def test_torch_image_install_works_in_fresh_venv(tmp_path: Path):
    context = build_context("torch-gpu", tmp_path / "context")
    bin_dir = fresh_venv(tmp_path / "venv")
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", *install_command("torch-gpu")], cwd=context)

    version = run([str(bin_dir / "python"), "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    assert version.split("+")[0] == torch_pin(), version
    help_text = run([str(bin_dir / "leap-train"), "--help"]).stdout
    assert "--framework" in help_text


def torch_pin() -> str:
    """The torch version the `torch` extra pins, from pyproject.toml."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pin = next(req for req in extras["torch"] if req.startswith("torch=="))
    return pin.split("==", 1)[1]


@pytest.mark.slow
def test_torch_pin_on_pypi_is_the_cuda_build_of_the_base_image(tmp_path: Path):
    """On PyPI (what `docker build` sees) torch==<pin> for Linux depends on a CUDA toolkit release;
    the nvidia/cuda base image must carry the same CUDA major.minor."""
    base = next(i.args for i in parse_dockerfile(dockerfile("torch-gpu")) if i.keyword == "FROM")
    match = re.match(r"nvidia/cuda:(\d+\.\d+)(\.\d+)?-", base)
    assert match, f"torch-gpu must build FROM an nvidia/cuda image, not {base}"
    bin_dir = fresh_venv(tmp_path / "venv")
    report = tmp_path / "report.json"
    # PIP_CONFIG_FILE=/dev/null and no find-links: ask PyPI alone, not this machine's CPU wheel.
    env = pip_env(PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="", PIP_RETRIES="1", PIP_TIMEOUT="30")
    result = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--dry-run", "--no-deps", "-q", "--report", str(report),
         "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--target", str(tmp_path / "t"),
         f"torch=={torch_pin()}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0 and "NewConnectionError" in result.stderr:
        pytest.skip(f"PyPI not reachable from here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr
    requires = json.loads(report.read_text())["install"][0]["metadata"].get("requires_dist", [])
    # torch 2.13 names the whole toolkit (cuda-toolkit[...]==13.0.3); older releases name the runtime.
    cuda = [r for r in requires if r.startswith(("cuda-toolkit", "nvidia-cuda-runtime"))]
    assert cuda, f"torch=={torch_pin()} on PyPI has no CUDA dependency (not the CUDA build?): {requires}"
    version = re.search(r"==\s*(\d+\.\d+)", cuda[0])
    assert version and version.group(1) == match.group(1), f"torch needs {cuda[0]} but the base image is {base}"


@pytest.mark.slow
def test_tf_tpu_image_install_resolves_in_fresh_venv(tmp_path: Path):
    context = build_context("tf-tpu", tmp_path / "context")
    bin_dir = fresh_venv(tmp_path / "venv")
    report = tmp_path / "report.json"
    # The image's -f index (storage.googleapis.com) is unreachable here: one quick try, no retries.
    env = pip_env(PIP_RETRIES="0", PIP_TIMEOUT="10")
    run([str(bin_dir / "python"), "-m", "pip", "install", "--dry-run", "-q", "--report", str(report),
         *install_command("tf-tpu")], cwd=context, env=env)
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert "tensorflow-tpu" in resolved, sorted(resolved)
    assert "libtpu" in resolved, "the TPU runtime (libtpu) must come with the image"
    # libtpu 0.0.32 and later dropped TensorFlow's TPU C API: with them `import tensorflow` from
    # tensorflow-tpu 2.20 aborts ("ConfigureDistributedTpuOp_DoWork not available in this library").
    libtpu = tuple(int(part) for part in resolved["libtpu"].split("."))
    assert libtpu < (0, 0, 32), f"libtpu {resolved['libtpu']} cannot run tensorflow-tpu; pin an older one"
    # Stock tensorflow would install over the same `tensorflow` package and cannot drive a TPU.
    assert "tensorflow" not in resolved and "tensorflow-cpu" not in resolved, sorted(resolved)
    assert "leap" in resolved and "keras" in resolved
