"""The anomaly store and the anomaly set D_a (method.md step 9, "Updating the anomaly set").

The store is a Parquet dataset under ``<run>/anomalies/``: one file per iteration holding
every anomaly drawn that iteration, with its prompt, text, PNG image, the adapter version that
wrote it, the normal-likeness guard's verdict (``guard_reason``: null when kept, else why it was
dropped) and scores, the confusion evaluator's distance and the hard flag (Eq. 6; NaN / false
for dropped rows). Only kept rows ever reach the evaluator, the detector or DPO. The anomaly
set D_a (what the detector trains on) is a list of store ids per iteration under ``<run>/sets/``.

``add``: D_a grows by all new anomalies each iteration. ``rep``: D_a keeps the size it had after
its first iteration; its easy members are replaced by new anomalies, hardest new first against
easiest (farthest) old first, and a swap happens only when the new one is harder (smaller
distance) than the one it replaces.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

# Columns every store file has, in this order (features are the backbone's pooled features).
STORE_COLUMNS = (
    "id", "run", "iteration", "prompt_id", "sample_idx", "cluster", "prompt", "description",
    "text", "image", "seed", "adapter_version", "distance", "is_hard", "features",
    "guard_reason", "normal_score", "text_similarity",
)
# Columns that files written before the guard existed lack; read() fills them (null = kept, NaN).
GUARD_COLUMNS = ("guard_reason", "normal_score", "text_similarity")


def anomaly_id(run: str, iteration: int, prompt_id: int, sample_idx: int) -> str:
    """Stable id of a generated anomaly, derived from run, iteration and position."""
    return f"{run}/it{iteration}/p{int(prompt_id):04d}/s{int(sample_idx):02d}"


def item_seed(base_seed: int, iteration: int, prompt_id: int, sample_idx: int = 0) -> int:
    """A deterministic 31-bit seed for one prompt (or one drawing) of one iteration."""
    h = np.uint64(1469598103934665603)
    for v in (base_seed, iteration, prompt_id, sample_idx):
        h = np.uint64((int(h) ^ (int(v) & 0xFFFFFFFF)) * 1099511628211 % (1 << 64))
    return int(h) % (2**31 - 1)


def write_table_atomic(table: Any, path: str | os.PathLike) -> None:
    """Write a pyarrow table to ``path`` through a temp file + rename (no half-written file)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class AnomalyStore:
    """Parquet anomaly store of one run (``<run>/anomalies/iter_<k>.parquet``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration}.parquet"

    def write(self, iteration: int, table: Any) -> Path:
        missing = [c for c in STORE_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"anomaly store rows lack columns {missing}")
        write_table_atomic(table.select(list(STORE_COLUMNS)), self.path(iteration))
        return self.path(iteration)

    def iterations(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.stem.split("_")[1]) for p in self.root.glob("iter_*.parquet"))

    def read(self, iterations: Iterable[int] | None = None, columns: list[str] | None = None) -> Any:
        """All rows of the given iterations (default: all) as one pyarrow table."""
        import pyarrow as pa

        its = list(self.iterations() if iterations is None else iterations)
        tables = [_with_guard_columns(self.path(k), columns) for k in its if self.path(k).is_file()]
        if not tables:
            return None
        return pa.concat_tables(tables)

    def read_kept(self, iterations: Iterable[int] | None = None, columns: list[str] | None = None) -> Any:
        """Like :meth:`read`, only the rows the guard kept (None when there are none)."""
        cols = None if columns is None else list(dict.fromkeys([*columns, "guard_reason"]))
        table = self.read(iterations, cols)
        if table is None:
            return None
        table = table.filter(kept_mask(table))
        return table if columns is None else table.select(columns)

    def rows(self, ids: Iterable[str], columns: list[str] | None = None) -> Any:
        """The rows whose id is in ``ids`` (any iteration), in the order of ``ids``."""
        import pyarrow as pa

        ids = list(ids)
        cols = None if columns is None else list(dict.fromkeys(["id", *columns]))
        table = self.read(columns=cols)
        if table is None or not ids:
            return table.slice(0, 0) if table is not None else None
        index = {v: i for i, v in enumerate(table.column("id").to_pylist())}
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"{len(missing)} anomaly ids are not in the store at {self.root}, e.g. {missing[0]}")
        return table.take(pa.array([index[i] for i in ids]))


def kept_mask(table: Any) -> np.ndarray:
    """True for the rows the guard kept (``guard_reason`` null or empty)."""
    reasons = table.column("guard_reason").to_pylist()
    return np.array([not r for r in reasons], dtype=bool)


def _with_guard_columns(path: Path, columns: list[str] | None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    want = list(STORE_COLUMNS if columns is None else columns)
    table = pq.read_table(path, columns=[c for c in want if c in present])
    for name in want:
        if name in present:
            continue
        if name not in GUARD_COLUMNS:
            raise KeyError(f"{path} has no column {name!r}")
        kind = pa.string() if name == "guard_reason" else pa.float64()
        fill = None if name == "guard_reason" else float("nan")
        table = table.append_column(name, pa.array([fill] * table.num_rows, kind))
    return table.select(want)


@dataclass(frozen=True)
class Member:
    """One anomaly in D_a with its current evaluator distance."""

    id: str
    distance: float
    is_hard: bool


def update_anomaly_set(
    current: list[Member], new: list[Member], mode: Literal["add", "rep"], target_size: int | None = None
) -> list[Member]:
    """D_a after one iteration (method.md step 9).

    ``add``: current + new. ``rep``: the set keeps ``target_size`` members (default: its current
    size; when the set is still empty it takes the new anomalies up to that size, or all of them);
    easy members are swapped for new ones, hardest new first against easiest (largest distance)
    old first, only while the new one is harder than the one it replaces.
    """
    if mode == "add":
        return list(current) + list(new)
    if mode != "rep":
        raise ValueError(f"mode must be 'add' or 'rep', got {mode!r}")
    if not current:
        size = len(new) if target_size is None else target_size
        return sorted(new, key=lambda m: m.distance)[:size]
    size = len(current) if target_size is None else target_size
    kept = list(current)
    easy_old = sorted((m for m in kept if not m.is_hard), key=lambda m: -m.distance)
    hard_new = sorted(new, key=lambda m: m.distance)
    out_ids: set[str] = set()
    swaps: list[Member] = []
    for old, cand in zip(easy_old, hard_new):
        if cand.distance >= old.distance:
            break
        out_ids.add(old.id)
        swaps.append(cand)
    result = [m for m in kept if m.id not in out_ids] + swaps
    if len(result) < size:  # the set was below its target size: top it up with the next hardest
        rest = [m for m in hard_new if m not in swaps]
        result += rest[: size - len(result)]
    return result[:size] if len(result) > size else result


def save_anomaly_set(members: list[Member], path: str | os.PathLike) -> None:
    write_json_atomic(
        [{"id": m.id, "distance": float(m.distance), "is_hard": bool(m.is_hard)} for m in members], path
    )


def load_anomaly_set(path: str | os.PathLike) -> list[Member]:
    data = json.loads(Path(path).read_text())
    return [Member(d["id"], float(d["distance"]), bool(d["is_hard"])) for d in data]
