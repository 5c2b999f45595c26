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

import io
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from embcompat.arrays import IdArray, member
from embcompat.errors import InvalidInput

MetaValue = str | int | float | bool
RANGES = {"lt", "lte", "gt", "gte"}
OPERATORS = RANGES | {"not"}
MAX_VALUES = 1000
_EMPTY = np.zeros(0, np.int64)


MAX_EXACT = 2**53  # integers beyond this have no exact float: two would compare equal


def number_problem(value: Any) -> str | None:
    """Why a metadata or filter number cannot be compared exactly (NaN sorts above every
    bound, 2**53 + 1 equals 2**53 as a float, 10**400 has no float), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > MAX_EXACT:
        return f"the integer {value if abs(value) < 10**30 else 'given'} is beyond ±2**53"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    return None


def typed(value: Any) -> tuple[str, Any]:
    """A value with its kind (see the module docstring)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    return ("str", value)


@dataclass(frozen=True)
class _Postings:
    """One key's postings as parallel arrays sorted by (value code, id): the ids holding
    a value are one slice. Numeric values also sorted by value, for ranges."""

    codes: IdArray
    owners: IdArray
    numbers: npt.NDArray[np.float64]
    number_ids: IdArray

    def without(self, ids: IdArray) -> _Postings:
        keep, nkeep = ~member(ids, self.owners), ~member(ids, self.number_ids)
        return _Postings(
            self.codes[keep], self.owners[keep], self.numbers[nkeep], self.number_ids[nkeep]
        )

    def plus(
        self, codes: list[int], owners: list[int], numbers: list[float], nids: list[int]
    ) -> _Postings:
        c = np.concatenate([self.codes, np.asarray(codes, np.int64)])
        o = np.concatenate([self.owners, np.asarray(owners, np.int64)])
        n = np.concatenate([self.numbers, np.asarray(numbers, np.float64)])
        ni = np.concatenate([self.number_ids, np.asarray(nids, np.int64)])
        order, norder = np.lexsort((o, c)), np.lexsort((ni, n))
        return _Postings(c[order], o[order], n[norder], ni[norder])


_NONE = _Postings(_EMPTY, _EMPTY, np.zeros(0), _EMPTY)
Rows = Iterable[tuple[int, Mapping[str, Any] | None]]
Resolver = Callable[[list[str]], IdArray]


class MetaIndex:
    """The metadata of a gallery's items as postings; answers `matching(filters)`.

    Built once from (id, metadata) rows, then kept current by `updated(rows, removed)`
    with only the items written since (array work per key, no pass over the items).
    Value codes are shared by the versions of one index and only ever appended, so an
    older version still being read stays valid."""

    def __init__(
        self, ids: IdArray, keys: dict[str, _Postings], codes: dict[tuple[str, Any], int]
    ) -> None:
        self.ids, self.keys, self._codes = ids, keys, codes

    @classmethod
    def build(cls, rows: Rows) -> MetaIndex:
        return cls(_EMPTY, {}, {}).updated(rows, _EMPTY)

    def __len__(self) -> int:
        return len(self.ids)

    def updated(self, rows: Rows, removed: IdArray) -> MetaIndex:
        """A new index: items of `rows` (id, metadata) written or rewritten, `removed`
        ids gone; this one is left as it was for the searches still using it."""
        fresh: dict[str, tuple[list[int], list[int], list[float], list[int]]] = {}
        written: list[int] = []
        for item_id, meta in rows:
            written.append(item_id)
            for key, value in (meta or {}).items():
                kind_value = typed(value)
                code = self._codes.setdefault(kind_value, len(self._codes))
                codes, owners, numbers, nids = fresh.setdefault(key, ([], [], [], []))
                codes.append(code)
                owners.append(item_id)
                if kind_value[0] == "number":
                    numbers.append(kind_value[1])
                    nids.append(item_id)
        changed = np.unique(np.concatenate([np.asarray(written, np.int64), removed]))
        keys = {}
        for key in self.keys.keys() | fresh.keys():
            postings = self.keys.get(key, _NONE)
            if len(changed):
                postings = postings.without(changed)
            if key in fresh:
                postings = postings.plus(*fresh[key])
            if len(postings.owners):
                keys[key] = postings
        ids = np.setdiff1d(self.ids, removed, assume_unique=True)
        ids = np.union1d(ids, np.asarray(written, np.int64))
        return MetaIndex(ids, keys, self._codes)

    def matching(self, filters: Mapping[str, Any], resolve: Resolver) -> IdArray:
        """The sorted ids of the items every condition holds for; `resolve` maps external
        item ids to ids (the key `id`)."""
        out: IdArray | None = None
        for key, condition in filters.items():
            part = self._one(key, condition, resolve)
            out = part if out is None else np.intersect1d(out, part, assume_unique=True)
            if len(out) == 0:
                break
        return self.ids if out is None else out

    def _one(self, key: str, condition: Any, resolve: Resolver) -> IdArray:
        if isinstance(condition, dict):
            ops = parse_operators(key, condition)
            result = self.ids
            if "not" in ops:
                result = np.setdiff1d(
                    result, self._equal(key, ops["not"], resolve), assume_unique=True
                )
            if RANGES & ops.keys():
                result = np.intersect1d(result, self._range(key, ops), assume_unique=True)
            return result
        return self._equal(key, check_values(key, condition), resolve)

    def _equal(self, key: str, values: list[MetaValue], resolve: Resolver) -> IdArray:
        if key == "id":
            names = [v for v in values if isinstance(v, str)]
            found = resolve(names) if names else _EMPTY
            return np.intersect1d(found, self.ids)
        entry = self.keys.get(key)
        if entry is None:
            return _EMPTY
        parts = []
        for v in values:
            code = self._codes.get(typed(v))
            if code is not None:
                lo, hi = np.searchsorted(entry.codes, [code, code + 1])
                parts.append(entry.owners[lo:hi])
        if not parts:
            return _EMPTY
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
    for v in values:
        if problem := number_problem(v):
            raise InvalidInput(f"filter {key!r}: {problem}", field="filters")
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
        elif problem := number_problem(bound):
            raise InvalidInput(f"filter {key!r}: {op!r}: {problem}", field="filters")
        else:
            ops[op] = float(bound)
    if key == "id" and RANGES & ops.keys():
        raise InvalidInput("filter 'id': ids have no order, use a value or not", field="filters")
    return ops


def to_bytes(index: MetaIndex, stamp: tuple[int, ...]) -> bytes:
    """The index as one `.npz` (no pickles), with the stamp (ints: which gallery, which
    version of its items) it is current for."""
    keys = sorted(index.keys)
    arrays: dict[str, np.ndarray] = {"ids": index.ids, "stamp": np.asarray(stamp, np.int64)}
    for n, key in enumerate(keys):
        p = index.keys[key]
        arrays |= {f"k{n}_codes": p.codes, f"k{n}_owners": p.owners,
                   f"k{n}_numbers": p.numbers, f"k{n}_nids": p.number_ids}  # fmt: skip
    codes = sorted(index._codes.items(), key=lambda kv: kv[1])
    header = {"keys": keys, "codes": [[kind, value, code] for (kind, value), code in codes]}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    return buf.getvalue()


def from_bytes(data: bytes) -> tuple[MetaIndex, tuple[int, ...]]:
    """`to_bytes` read back, every array checked for the shape, type and order the
    index relies on (a file that parses but lies would answer filters wrongly); any
    damage raises ValueError."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            header = json.loads(bytes(f["header"]).decode())
            ids, stamp = _ints(f["ids"]), _ints(f["stamp"])
            keys = {}
            for n, key in enumerate(header["keys"]):
                numbers = np.asarray(f[f"k{n}_numbers"], np.float64)
                p = _Postings(_ints(f[f"k{n}_codes"]), _ints(f[f"k{n}_owners"]), numbers,
                              _ints(f[f"k{n}_nids"]))  # fmt: skip
                _check_postings(p, ids)
                keys[str(key)] = p
            codes = {(str(kind), value): int(code) for kind, value, code in header["codes"]}
    except ValueError:
        raise
    except Exception as exc:  # BadZipFile, KeyError, EOFError, TypeError, ...
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if not len(stamp) or len(ids) and (np.diff(ids) <= 0).any():
        raise ValueError("stamp or ids malformed")
    if sorted(codes.values()) != list(range(len(codes))):
        raise ValueError("value codes are not 0..n-1")
    return MetaIndex(ids, keys, codes), tuple(int(x) for x in stamp)


def _ints(a: np.ndarray) -> IdArray:
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"an array of {a.dtype} {a.shape} where 1-d integers belong")
    return a.astype(np.int64, copy=False)


def _check_postings(p: _Postings, ids: IdArray) -> None:
    """Parallel arrays, sorted by (code, id) and by value, of ids the index holds."""
    if len(p.codes) != len(p.owners) or len(p.numbers) != len(p.number_ids) or p.numbers.ndim != 1:
        raise ValueError("postings of unequal lengths")
    if len(p.codes) > 1:
        step = np.diff(p.codes)
        if (step < 0).any() or ((step == 0) & (np.diff(p.owners) <= 0)).any():
            raise ValueError("postings out of order")
    if len(p.numbers) > 1 and (np.diff(p.numbers) < 0).any() or not np.isfinite(p.numbers).all():
        raise ValueError("numbers out of order")
    if not (member(ids, p.owners).all() and member(ids, p.number_ids).all()):
        raise ValueError("postings name ids the index does not hold")
