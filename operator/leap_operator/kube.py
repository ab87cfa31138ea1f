"""A small async Kubernetes API client for the operator's own writes (aiohttp, plain dicts).

Why not the `kubernetes` package: its calls block, so under kopf they would run on a thread
pool, and it converts every object into generated models, while render_children() already
produces plain dicts. This client runs on kopf's event loop, sends JSON, retries 429/5xx,
connection errors and write conflicts with exponential backoff, counts every failed request in
leap_operator_api_errors_total, and uses the same credentials kopf logged in with (the
ConnectionInfo from the operator's login handler: in-cluster service account or kubeconfig).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import aiohttp

from leap_operator import names, opmetrics

log = logging.getLogger(__name__)

# (apiVersion, kind) -> plural
PLURALS = {
    ("batch/v1", "Job"): "jobs",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    (names.API_VERSION, names.KIND): names.PLURAL,
    ("kueue.x-k8s.io/v1beta1", "Workload"): "workloads",
}
RETRIABLE = {409, 429, 500, 502, 503, 504}


class KubeError(Exception):
    def __init__(self, status: int, message: str, reason: str = ""):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def path_for(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
    return base


class Kube:
    """Async client. `server` is the API URL; `info` a kopf.ConnectionInfo (wins if given)."""

    def __init__(self, server: str | None = None, *, info: Any = None, retries: int = 6,
                 backoff: float = 0.1, max_backoff: float = 5.0, timeout: float = 30.0):
        self.info = info
        self.server = (info.server if info is not None else server or "").rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers, ssl_ctx = {"User-Agent": names.MANAGER}, None
            info = self.info
            if info is not None:
                if info.token:
                    headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
                if self.server.startswith("https"):
                    ssl_ctx = ssl.create_default_context(
                        cafile=info.ca_path, cadata=_text(info.ca_data)) if (info.ca_path or info.ca_data) \
                        else ssl.create_default_context()
                    if info.insecure:
                        ssl_ctx.check_hostname = False
                        ssl_ctx.verify_mode = ssl.CERT_NONE
                    if info.certificate_path and info.private_key_path:
                        ssl_ctx.load_cert_chain(info.certificate_path, info.private_key_path)
            auth = aiohttp.BasicAuth(info.username, info.password or "") if info is not None and info.username else None
            self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout, auth=auth,
                                                  connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=64))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json", resource: str = "", retry_conflicts: bool = True) -> Any:
        """JSON in, JSON out. Retries what may succeed later; raises KubeError otherwise."""
        delay = self.backoff
        verb = method.lower()
        for attempt in range(self.retries + 1):
            try:
                session = self._session_for_loop()
                async with session.request(method, self.server + path, json=body, params=params,
                                           headers={"Content-Type": content_type}) as response:
                    status = response.status
                    try:
                        payload = await response.json(content_type=None)
                    except (ValueError, aiohttp.ContentTypeError):
                        payload = {}
                    if status < 400:
                        return payload
                    if status != 404:  # "not found" is an answer (get/delete of what is gone)
                        opmetrics.API_ERRORS.labels(verb, resource).inc()
                    payload = payload if isinstance(payload, dict) else {}
                    error = KubeError(status, str(payload.get("message", "")), str(payload.get("reason", "")))
                    if status not in RETRIABLE or (status == 409 and not retry_conflicts) or attempt == self.retries:
                        raise error
                    log.info("%s %s: %s; retrying in %.2fs", method, path, error, delay)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                opmetrics.API_ERRORS.labels(verb, resource).inc()
                if attempt == self.retries:
                    raise KubeError(0, str(exc) or type(exc).__name__, "ConnectionError") from exc
                log.info("%s %s: %s; retrying in %.2fs", method, path, str(exc) or type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(self.max_backoff, delay * 2)
        raise AssertionError("unreachable")

    # --- verbs on objects ------------------------------------------------------------------

    async def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict | None:
        try:
            return await self.request("GET", path_for(api_version, plural, namespace, name), resource=plural)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: dict) -> dict:
        """Create obj; if it already exists, return the existing object (adopt, never duplicate)."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        plural = PLURALS[(api_version, kind)]
        meta = obj["metadata"]
        path = path_for(api_version, plural, meta.get("namespace"))
        for _ in range(self.retries + 1):
            try:
                return await self.request("POST", path, body=obj, resource=plural, retry_conflicts=False)
            except KubeError as exc:
                if exc.status != 409:
                    raise
            existing = await self.get(api_version, plural, meta.get("namespace"), meta["name"])
            if existing is not None:
                return existing
            await asyncio.sleep(self.backoff)  # a conflict on an absent object: try again
        raise KubeError(409, f"{kind} {meta['name']} conflicts but cannot be read", "Conflict")

    async def patch(self, api_version: str, plural: str, namespace: str, name: str, patch: dict,
                    subresource: str | None = None) -> dict | None:
        """Merge-patch; None if the object is gone."""
        try:
            return await self.request("PATCH", path_for(api_version, plural, namespace, name, subresource),
                                      body=patch, content_type="application/merge-patch+json", resource=plural)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, api_version: str, plural: str, namespace: str, name: str,
                     propagation: str = "Background", uid: str | None = None) -> bool:
        """Delete; False if it was already gone (or, with `uid`, replaced by another object)."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", path_for(api_version, plural, namespace, name), body=options,
                               resource=plural, retry_conflicts=not uid)
            return True
        except KubeError as exc:
            if exc.status == 404 or (uid and exc.status == 409):
                return False
            raise

    async def list(self, api_version: str, plural: str, namespace: str, *, field_selector: str = "",
                   label_selector: str = "") -> list[dict]:
        params = {k: v for k, v in (("fieldSelector", field_selector), ("labelSelector", label_selector)) if v}
        payload = await self.request("GET", path_for(api_version, plural, namespace), params=params, resource=plural)
        return list((payload or {}).get("items") or [])


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
