"""A container's env as the kubelet would resolve it for one pod of an Indexed Job.

Covers what TrainingRun pods use: plain values, downward-API fieldRefs (the completion index,
names, IPs), resourceFieldRefs, and $(VAR) references in values, command and args. Secrets and
ConfigMaps do not exist locally: such a variable is taken from this shell's environment when set
there, else the error names the variable and how to provide it.
"""

from __future__ import annotations

import math
import os
import re
import socket
from typing import Callable, Mapping

from leap_operator.validation import parse_quantity
from leap_trainer import contract

LOCALHOST = "127.0.0.1"


class EnvError(ValueError):
    pass


_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known variables are replaced, unknown ones kept, $$ escapes."""
    def repl(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)
    return _REF.sub(repl, text)


def _quoted_key(path: str, prefix: str) -> str | None:
    match = re.fullmatch(re.escape(prefix) + r"\['([^']*)'\]", path)
    return match.group(1) if match else None


def field_ref(path: str, *, index: int, pod_name: str, namespace: str, labels: Mapping[str, str],
              annotations: Mapping[str, str], pod_ip: str = LOCALHOST) -> str:
    annotations = {**annotations, contract.JOB_COMPLETION_INDEX_ANNOTATION: str(index)}
    # Kubernetes >= 1.28 also labels Indexed Job pods with their index.
    labels = {**labels, contract.JOB_COMPLETION_INDEX_ANNOTATION: str(index)}
    simple = {
        "metadata.name": pod_name,
        "metadata.namespace": namespace,
        "metadata.uid": f"local-{pod_name}",
        "spec.nodeName": socket.gethostname(),
        "spec.serviceAccountName": "default",
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": LOCALHOST,
        "status.hostIPs": LOCALHOST,
    }
    if path in simple:
        return simple[path]
    for prefix, source in (("metadata.annotations", annotations), ("metadata.labels", labels)):
        key = _quoted_key(path, prefix)
        if key is not None:
            return source.get(key, "")
    raise EnvError(f"fieldPath {path!r} has no local equivalent")


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def resource_ref(ref: dict, resources: dict) -> str:
    """limits.cpu, requests.memory, ...: the container's value, or the machine's when unset
    (as the kubelet falls back to node allocatable), divided by the divisor and rounded up."""
    section, _, name = ref.get("resource", "").partition(".")
    value = (resources.get(section) or {}).get(name) or (resources.get("limits") or {}).get(name)
    if value is None:
        value = {"cpu": os.cpu_count() or 1, "memory": _total_memory_bytes()}.get(name)
    if value is None:
        raise EnvError(f"resource {ref.get('resource')!r} is not known locally")
    divisor = parse_quantity(ref.get("divisor") or 1)
    return str(math.ceil(parse_quantity(value) / divisor))


def resolve_env(container: dict, *, index: int, pod_name: str, namespace: str, pod_metadata: dict,
                local: Mapping[str, Callable[[str], str]] | None = None,
                shell_env: Mapping[str, str] | None = None, pod_ip: str = LOCALHOST) -> dict[str, str]:
    """name -> value, in the container's order, later entries overriding earlier ones.

    `local` maps a variable name to a function of its pod value giving its local value
    (127.0.0.1 for a pod hostname, ...); applied as each variable is resolved, so $(VAR)
    references in later variables see the local value too."""
    shell_env = os.environ if shell_env is None else shell_env
    local = local or {}
    resolved: dict[str, str] = {}
    for entry in container.get("env") or []:
        _resolve_entry(entry, resolved, container, index, pod_name, namespace, pod_metadata, shell_env, pod_ip)
        name = entry["name"]
        if name in resolved and name in local:
            resolved[name] = local[name](resolved[name])
    return resolved


def _resolve_entry(entry: dict, resolved: dict[str, str], container: dict, index: int, pod_name: str,
                   namespace: str, pod_metadata: dict, shell_env: Mapping[str, str], pod_ip: str) -> None:
    name = entry["name"]
    if "value" in entry or "valueFrom" not in entry:
        resolved[name] = expand(str(entry.get("value") or ""), resolved)
        return
    source = entry["valueFrom"]
    try:
        if "fieldRef" in source:
            resolved[name] = field_ref(source["fieldRef"]["fieldPath"], index=index, pod_name=pod_name,
                                       namespace=namespace, labels=pod_metadata.get("labels") or {},
                                       annotations=pod_metadata.get("annotations") or {}, pod_ip=pod_ip)
        elif "resourceFieldRef" in source:
            resolved[name] = resource_ref(source["resourceFieldRef"], container.get("resources") or {})
        else:
            kind, ref = next(((k, v) for k, v in source.items() if k in ("secretKeyRef", "configMapKeyRef")),
                             (None, {}))
            if name in shell_env:
                resolved[name] = shell_env[name]
            elif ref.get("optional"):
                return
            else:
                what = {"secretKeyRef": "Secret", "configMapKeyRef": "ConfigMap"}.get(kind, "a source")
                raise EnvError(f"comes from {what} {ref.get('name', '?')!r} key {ref.get('key', '?')!r}, "
                               f"which a local run cannot read; export {name}=... in this shell and run again")
    except EnvError as exc:
        raise EnvError(f"env {name}: {exc}") from None


def expand_all(items: list[str], env: Mapping[str, str]) -> list[str]:
    return [expand(item, env) for item in items]
