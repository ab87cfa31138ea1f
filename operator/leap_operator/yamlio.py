"""Read TrainingRun YAML the way kubectl and the API server do: YAML 1.2, no duplicate keys.

YAML 1.1 (PyYAML's) reads `1e-3` as a string and `0o17`/`yes` differently from Kubernetes;
ruamel.yaml in YAML 1.2 mode reads them as numbers and strings, as kubectl does. A key given
twice in one mapping is refused (kubectl's strict decoding refuses it too), naming the key and
both lines. Every place Leap reads a TrainingRun from text goes through here.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterator

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode


class YAMLLoadError(ValueError):
    """One line: where (file:line), what is wrong and what to do."""


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.version = (1, 2)
    return yaml


def _key_text(node: Node) -> str | None:
    return str(node.value) if not isinstance(node, (MappingNode, SequenceNode)) else None


def _duplicates(node: Node, path: str, source: str) -> None:
    if isinstance(node, MappingNode):
        seen: dict[str, Node] = {}
        for key, value in node.value:
            text = _key_text(key)
            if text is None:
                continue
            if text == "<<":
                continue  # merge keys may repeat
            where = f"{path}.{text}" if path else text
            if text in seen:
                first = seen[text].start_mark.line + 1
                raise YAMLLoadError(
                    f"{source}: key {where!r} is given twice (lines {first} and {key.start_mark.line + 1}); "
                    f"kubectl refuses duplicate keys: keep one of them")
            seen[text] = key
            _duplicates(value, where, source)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _duplicates(item, f"{path}[{index}]", source)


def _plain(value: Any) -> Any:
    # JSON has no dates: the API server stores an unquoted 2024-01-01 as the string it is.
    if isinstance(value, dict):
        return {(k.isoformat() if isinstance(k, (dt.date, dt.datetime)) else k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value


def _describe(exc: YAMLError, source: str) -> str:
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = exc.problem or exc.context or "not valid YAML"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        return f"{where}: not valid YAML: {problem}{context}"
    return f"{source}: not valid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def load_all(text: str, source: str) -> list[Any]:
    """Every document of `text` (None for empty ones), as plain Python values."""
    yaml = _yaml()
    try:
        for node in yaml.compose_all(text):
            if node is not None:
                _duplicates(node, "", source)
        return [_plain(doc) for doc in _yaml().load_all(text)]
    except YAMLLoadError:
        raise
    except YAMLError as exc:
        raise YAMLLoadError(_describe(exc, source)) from None


def load_one(text: str, source: str) -> Any:
    docs = load_all(text, source)
    if len(docs) > 1:
        raise YAMLLoadError(f"{source}: holds {len(docs)} YAML documents; give one value")
    return docs[0] if docs else None


def iter_documents(text: str, source: str) -> Iterator[Any]:
    yield from load_all(text, source)


def dump_all(documents: list) -> str:
    """YAML that kubectl reads back as the same values: PyYAML already quotes strings that YAML 1.1
    would take for something else (yes, 012); this also quotes those YAML 1.2 would (1e3, 0o17)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper, value: str):
        style = None
        if value and value[0] in "0123456789+-.":
            try:
                if not isinstance(_yaml().load(value), str):
                    style = '"'
            except YAMLError:
                pass
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    return yaml.dump_all(documents, Dumper=Dumper, sort_keys=False, width=120)
