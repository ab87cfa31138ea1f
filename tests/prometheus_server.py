"""A real Prometheus server for tests: Debian's `prometheus` binary on a free 127.0.0.1 port.

    with PrometheusServer(targets=["127.0.0.1:9400"], scrape_interval="1s") as prom:
        prom.wait_for("rate(leap_train_samples_total[30s]) > 0", timeout=60)
        prom.query("leap_train_loss")   # -> [{"metric": {...}, "value": [ts, "0.42"]}, ...]

Scrapes start about 6 s after start-up (Prometheus's target discovery throttle). The data
directory is temporary and the process is always stopped on exit.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class PromQLError(RuntimeError):
    """Prometheus rejected a query (bad PromQL) or answered with an error."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    def __init__(self, targets: list[str] | None = None, scrape_interval: str = "1s", *,
                 job: str = "leap", jobs: dict[str, list[str]] | None = None,
                 rule_files: list[str | Path] | None = None, scrape_configs: list[dict] | None = None,
                 start_timeout: float = 60.0):
        """targets: host:port to scrape under job `job`; jobs: more {job name: [host:port]};
        scrape_configs: more raw Prometheus scrape configs (e.g. with relabel_configs)."""
        self.jobs = {job: list(targets or [])}
        self.jobs.update(jobs or {})
        self.scrape_interval = scrape_interval
        self.rule_files = [str(p) for p in rule_files or []]
        self.extra_scrape_configs = list(scrape_configs or [])
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.url = ""
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": name, "static_configs": [{"targets": targets}]}
                               for name, targets in self.jobs.items() if targets] + self.extra_scrape_configs,
        }

    def __enter__(self) -> "PrometheusServer":
        self._dir = tempfile.TemporaryDirectory(prefix="leap-prometheus-")
        root = Path(self._dir.name)
        (root / "prometheus.yml").write_text(yaml.safe_dump(self.config()))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(root / "prometheus.log", "wb")
        self._proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as rsp:
                    if rsp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {self.start_timeout}s:\n{self.log()}")

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def log(self) -> str:
        try:
            return (Path(self._dir.name) / "prometheus.log").read_text(errors="replace")[-4000:]
        except (OSError, AttributeError):
            return ""

    # --- HTTP API ---------------------------------------------------------------------------
    def _get(self, path: str, params: dict) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as rsp:
                body = json.load(rsp)
        except urllib.error.HTTPError as err:  # 400/422: the query itself is wrong
            body = json.load(err)
        if body.get("status") != "success":
            raise PromQLError(f"{params.get('query', path)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query: the result list ([{"metric": {...}, "value": [ts, "v"]}]; scalars as one item)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """Range query: [{"metric": {...}, "values": [[ts, "v"], ...]}]."""
        data = self._get("/api/v1/query_range",
                         {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"})
        return data["result"]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def wait_for(self, expr: str, timeout: float = 60.0, interval: float = 0.5) -> list[dict]:
        """Poll `expr` until it returns a non-empty result; return it. TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} returned nothing for {timeout}s; targets: "
                                   f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in self.targets()]}")
            time.sleep(interval)
