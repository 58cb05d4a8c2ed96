"""Label and field selectors as kube-apiserver parses them (the subset clients send).

labelSelector: comma-separated requirements, each one of
    key=value  key==value  key!=value  key in (a,b)  key notin (a,b)  key  !key
fieldSelector: metadata.name / metadata.namespace with = == != (kube-apiserver supports
more fields per resource; the meshd source sends only metadata.name).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Pred = Callable[[dict[str, Any]], bool]


class SelectorError(ValueError):
    pass


def _split(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for c in text:
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if c == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
    out.append(cur)
    return [t.strip() for t in out if t.strip()]


_SET = re.compile(r"^(\S+)\s+(in|notin)\s+\((.*)\)$")


def _requirement(term: str) -> Callable[[dict[str, str]], bool]:
    m = _SET.match(term)
    if m:
        key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in vals
        return lambda labels: labels.get(key) not in vals
    for op in ("!=", "==", "="):
        if op in term:
            key, _, val = (s.strip() for s in term.partition(op))
            if not key:
                raise SelectorError(f"invalid label selector term {term!r}")
            if op == "!=":
                return lambda labels: labels.get(key) != val
            return lambda labels: labels.get(key) == val
    if term.startswith("!"):
        key = term[1:].strip()
        return lambda labels: key not in labels
    if re.fullmatch(r"[A-Za-z0-9./_-]+", term):
        return lambda labels: term in labels
    raise SelectorError(f"invalid label selector term {term!r}")


def label_selector(text: str | None) -> Pred:
    reqs = [_requirement(t) for t in _split(text or "")]

    def match(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(r(labels) for r in reqs)
    return match


_FIELDS = {"metadata.name": "name", "metadata.namespace": "namespace"}


def field_selector(text: str | None) -> Pred:
    reqs: list[Callable[[dict[str, Any]], bool]] = []
    for term in _split(text or ""):
        for op in ("!=", "==", "="):
            if op in term:
                field, _, val = (s.strip() for s in term.partition(op))
                break
        else:
            raise SelectorError(f"invalid field selector term {term!r}")
        if field not in _FIELDS:
            raise SelectorError(f'"{field}" is not a known field selector: only "metadata.name", '
                                '"metadata.namespace"')
        attr = _FIELDS[field]
        if op == "!=":
            reqs.append(lambda o, a=attr, v=val: (o.get("metadata") or {}).get(a, "") != v)
        else:
            reqs.append(lambda o, a=attr, v=val: (o.get("metadata") or {}).get(a, "") == v)
    return lambda obj: all(r(obj) for r in reqs)
