"""Checking params as they load: one error that names the key, its line in the file and the closest valid names."""
from __future__ import annotations

import difflib
from dataclasses import MISSING, fields, is_dataclass, replace
from pathlib import Path

import yaml


class ParamsError(ValueError):
    """A params file (or mapping) that the pipeline cannot run: unknown key, unknown kind, undefined name."""


def closest(name: str, known) -> str:
    """' (did you mean ...?)' for the names in `known` that look like `name`, else ''."""
    matches = difflib.get_close_matches(str(name), [str(k) for k in known], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


class Source:
    """Where params came from: a file with a line for every key, or a mapping built in code."""

    def __init__(self, path: Path | None = None, lines: dict | None = None):
        self.path = path
        self.lines = lines or {}

    @classmethod
    def of_file(cls, path: Path) -> "Source":
        """Index every key path of a YAML file by its line (1-based)."""
        with path.open() as handle:
            root = yaml.compose(handle)
        lines = {}
        stack = [((), root)]
        while stack:
            prefix, node = stack.pop()
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    here = prefix + (str(key.value),)
                    lines[here] = key.start_mark.line + 1
                    stack.append((here, value))
        return cls(path, lines)

    def where(self, path: tuple) -> str:
        """'params.yaml:57: methods.dynaprompt' (the nearest key of `path` the file has a line for)."""
        dotted = ".".join(str(p) for p in path) or "(top level)"
        if self.path is None:
            return f"params: {dotted}"
        for end in range(len(path), 0, -1):
            if tuple(str(p) for p in path[:end]) in self.lines:
                return f"{self.path}:{self.lines[tuple(str(p) for p in path[:end])]}: {dotted}"
        return f"{self.path}: {dotted}"


CODE = Source()  # params built in code: no file, no lines


def fail(source: Source, path: tuple, message: str):
    raise ParamsError(f"{source.where(path)}: {message}")


def check_keys(given: dict, known, source: Source, path: tuple, what: str = "key") -> None:
    """Every key of `given` is one of `known`, else one error naming the first unknown one."""
    known = list(known)
    for key in given:
        if key not in known:
            fail(source, path + (key,),
                 f"unknown {what} {key!r}{closest(key, known)}; known: {sorted(map(str, known))}")


def as_mapping(value, source: Source, path: tuple) -> dict:
    """`value` when it is a mapping (None counts as empty), else an error at `path`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(source, path, f"expected a mapping, got {type(value).__name__} {value!r}")
    return value


def dataclass_from(cls, options, source: Source = CODE, path: tuple = ()):
    """An instance of the config dataclass `cls` from a mapping; unknown keys and bad values are named."""
    return with_overrides(cls(), as_mapping(options, source, path), source, path)


def with_overrides(config, changes: dict, source: Source = CODE, path: tuple = ()):
    """A copy of a config dataclass with some fields changed; unknown keys and bad values are named."""
    check_keys(changes, [f.name for f in fields(config)], source, path)
    typed = {}
    for f in fields(config):
        if f.name in changes:
            typed[f.name] = coerce(changes[f.name], getattr(config, f.name), source, path + (f.name,))
    try:
        return replace(config, **typed)
    except (TypeError, ValueError) as error:
        fail(source, path, str(error))


def coerce(value, default, source: Source, path: tuple):
    """`value` shaped like the field's default: lists to tuples, ints to floats, nested config dataclasses."""
    if is_dataclass(default) and isinstance(value, dict):
        return with_overrides(default, value, source, path)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, bool) and not isinstance(value, bool):
        fail(source, path, f"expected true or false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
        fail(source, path, f"expected a number, got {value!r}")
    return value


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def required_fields(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]


def with_on_keys(params: dict) -> dict:
    """`orderings.<name>.on` back as a string key where PyYAML (YAML 1.1) read a bare `on` as the boolean true.

    Settings take either (`config.parse_orderings`), but a params dict written back with yaml.safe_dump would say
    `true:`, which DVC's YAML 1.2 reader keeps a boolean key and cannot sort into dvc.lock among string keys. Written
    after this, it says `'on':`, the same key to both readers. For whoever writes params (bin/rehearse, benchmarks).
    """
    for entry in (params.get("orderings") or {}).values():
        if isinstance(entry, dict) and True in entry:
            entry["on"] = entry.pop(True)
    return params
