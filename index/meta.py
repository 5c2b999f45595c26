"""An inverted index over item metadata, so that a filter costs array operations on the
ids that match, not a pass over every item's metadata in Python.

Per key: each exact value → the sorted ids holding it, and the numeric values sorted
with their ids for ranges. A filter is {key: condition}, all keys must hold:

- `value` or `[values]`: the item's value is one of them (items without the key fail);
- `{"not": value or [values]}`: it is none of them (items without the key pass);
- `{"lt" | "lte" | "gt" | "gte": number, ...}`: a numeric range (bounds combine).

Values keep their kind: `true` never matches 1, nor "1" matches 1; 1 and 1.0 are the same
number. The key `id` matches the items' external ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embcompat.arrays import IdArray
from embcompat.errors import InvalidInput

MetaValue = str | int | float | bool
RANGES = {"lt", "lte", "gt", "gte"}
OPERATORS = RANGES | {"not"}
MAX_VALUES = 1000
_EMPTY = np.zeros(0, np.int64)


def typed(value: Any) -> tuple[str, Any]:
    """A value with its kind (see the module docstring)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    return ("str", value)


@dataclass
class _Key:
    exact: dict[tuple[str, Any], IdArray] = field(default_factory=dict)
    numbers: np.ndarray = field(default_factory=lambda: np.zeros(0))  # sorted values
    number_ids: IdArray = field(default_factory=lambda: _EMPTY)  # their ids


class MetaIndex:
    """Built once from (id, external id, metadata) rows; answers `matching(filters)`."""

    def __init__(self, rows: Iterable[tuple[int, str, Mapping[str, Any] | None]]) -> None:
        postings: dict[str, dict[tuple[str, Any], list[int]]] = {}
        ids: list[int] = []
        self.by_external: dict[str, int] = {}
        for item_id, external, meta in rows:
            ids.append(item_id)
            self.by_external[external] = item_id
            for key, value in (meta or {}).items():
                postings.setdefault(key, {}).setdefault(typed(value), []).append(item_id)
        self.ids = np.unique(np.asarray(ids, np.int64))
        self.keys: dict[str, _Key] = {}
        for key, values in postings.items():
            entry = _Key({v: np.unique(np.asarray(i, np.int64)) for v, i in values.items()})
            nums = [(v[1], i) for v, i in entry.exact.items() if v[0] == "number"]
            if nums:
                vals = np.concatenate([np.full(len(i), v) for v, i in nums])
                owners = np.concatenate([i for _, i in nums])
                order = np.argsort(vals, kind="stable")
                entry.numbers, entry.number_ids = vals[order], owners[order]
            self.keys[key] = entry

    def __len__(self) -> int:
        return len(self.ids)

    def matching(self, filters: Mapping[str, Any]) -> IdArray:
        """The sorted ids of the items every condition holds for."""
        out: IdArray | None = None
        for key, condition in filters.items():
            part = self._one(key, condition)
            out = part if out is None else np.intersect1d(out, part, assume_unique=True)
            if len(out) == 0:
                break
        return self.ids if out is None else out

    def _one(self, key: str, condition: Any) -> IdArray:
        if isinstance(condition, dict):
            ops = parse_operators(key, condition)
            result = self.ids
            if "not" in ops:
                result = np.setdiff1d(result, self._equal(key, ops["not"]), assume_unique=True)
            if RANGES & ops.keys():
                result = np.intersect1d(result, self._range(key, ops), assume_unique=True)
            return result
        return self._equal(key, check_values(key, condition))

    def _equal(self, key: str, values: list[MetaValue]) -> IdArray:
        if key == "id":
            found = {
                self.by_external[v] for v in values if isinstance(v, str) and v in self.by_external
            }
            return np.array(sorted(found), np.int64)
        entry = self.keys.get(key)
        if entry is None:
            return _EMPTY
        parts = [entry.exact.get(typed(v), _EMPTY) for v in values]
        return np.unique(np.concatenate(parts)) if len(parts) > 1 else parts[0]

    def _range(self, key: str, ops: dict[str, Any]) -> IdArray:
        entry = self.keys.get(key)
        if entry is None or len(entry.numbers) == 0:
            return _EMPTY
        lo, hi = 0, len(entry.numbers)
        if "gt" in ops:
            lo = max(lo, int(np.searchsorted(entry.numbers, ops["gt"], "right")))
        if "gte" in ops:
            lo = max(lo, int(np.searchsorted(entry.numbers, ops["gte"], "left")))
        if "lt" in ops:
            hi = min(hi, int(np.searchsorted(entry.numbers, ops["lt"], "left")))
        if "lte" in ops:
            hi = min(hi, int(np.searchsorted(entry.numbers, ops["lte"], "right")))
        return np.sort(entry.number_ids[lo:hi]) if lo < hi else _EMPTY


def check_values(key: str, value: Any) -> list[MetaValue]:
    """A value or a non-empty list of strings, numbers or bools, as a list."""
    values = value if isinstance(value, list) else [value]
    if len(values) > MAX_VALUES:
        raise InvalidInput(
            f"filter {key!r} lists {len(values)} values, at most {MAX_VALUES}", field="filters"
        )
    if not values or not all(isinstance(v, MetaValue) for v in values):  # type: ignore[arg-type]
        raise InvalidInput(
            f"filter {key!r} needs a string, number or bool, a non-empty list of them, "
            "or an object of operators (not, lt, lte, gt, gte)",
            field="filters",
        )
    return list({typed(v): v for v in values}.values())  # each once: cost follows matches


def parse_operators(key: str, condition: dict[str, Any]) -> dict[str, Any]:
    """`{"not": ...}` and numeric bounds, checked: unknown operators and non-numeric
    bounds (a bool is not a number) are refused, naming the filter."""
    unknown = sorted(set(condition) - OPERATORS)
    if unknown or not condition:
        raise InvalidInput(
            f"filter {key!r}: unknown operator {unknown[0]!r}" if unknown
            else f"filter {key!r}: an empty object of operators",
            hint="operators: not, lt, lte, gt, gte",
            field="filters",
        )  # fmt: skip
    ops: dict[str, Any] = {}
    for op, bound in condition.items():
        if op == "not":
            ops["not"] = check_values(key, bound)
        elif isinstance(bound, bool) or not isinstance(bound, int | float) or bound != bound:
            raise InvalidInput(f"filter {key!r}: {op!r} needs a number", field="filters")
        else:
            ops[op] = float(bound)
    if key == "id" and RANGES & ops.keys():
        raise InvalidInput("filter 'id': ids have no order, use a value or not", field="filters")
    return ops
