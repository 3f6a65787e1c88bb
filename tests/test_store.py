"""Anomaly store and D_a bookkeeping (method.md step 9), checked on hand-made sets."""

import numpy as np
import pyarrow as pa
import pytest

from kka_ray.data.store import (
    STORE_COLUMNS, AnomalyStore, Member, anomaly_id, item_seed, load_anomaly_set, save_anomaly_set,
    update_anomaly_set,
)
from kka_ray.loop import relative_hardness


def M(i, d, h):
    return Member(i, d, h)


def test_add_grows_by_all_new():
    cur = [M("a", 1.0, True), M("b", 5.0, False)]
    new = [M("c", 0.5, True), M("d", 9.0, False)]
    out = update_anomaly_set(cur, new, "add")
    assert [m.id for m in out] == ["a", "b", "c", "d"]


def test_rep_keeps_size_and_swaps_easiest_old_for_hardest_new():
    # old easy: b (5.0), e (7.0); new sorted by hardness: c (0.5), f (6.0), d (9.0)
    # pairs: easiest old e (7.0) <- c (0.5) swap; next b (5.0) <- f (6.0): 6.0 >= 5.0, stop.
    cur = [M("a", 1.0, True), M("b", 5.0, False), M("e", 7.0, False)]
    new = [M("d", 9.0, False), M("c", 0.5, True), M("f", 6.0, False)]
    out = update_anomaly_set(cur, new, "rep")
    assert len(out) == 3
    assert sorted(m.id for m in out) == ["a", "b", "c"]


def test_rep_never_replaces_hard_members():
    cur = [M("a", 1.0, True), M("b", 2.0, True)]
    new = [M("c", 0.1, True)]
    assert [m.id for m in update_anomaly_set(cur, new, "rep")] == ["a", "b"]


def test_rep_first_iteration_takes_new_up_to_target():
    new = [M("x", 3.0, False), M("y", 1.0, True), M("z", 2.0, True)]
    assert [m.id for m in update_anomaly_set([], new, "rep")] == ["y", "z", "x"]
    assert [m.id for m in update_anomaly_set([], new, "rep", target_size=2)] == ["y", "z"]


def test_rep_tops_up_a_set_below_target():
    cur = [M("a", 1.0, True)]
    new = [M("b", 4.0, False), M("c", 2.0, False)]
    out = update_anomaly_set(cur, new, "rep", target_size=2)
    assert [m.id for m in out] == ["a", "c"]


def test_bad_mode():
    with pytest.raises(ValueError, match="add' or 'rep"):
        update_anomaly_set([], [], "grow")


def test_ids_and_seeds_are_stable():
    assert anomaly_id("r1", 2, 7, 3) == "r1/it2/p0007/s03"
    assert item_seed(0, 1, 2, 3) == item_seed(0, 1, 2, 3)
    assert item_seed(0, 1, 2, 3) != item_seed(0, 1, 2, 4)
    assert 0 <= item_seed(123, 9, 9, 9) < 2**31 - 1


def _table(ids, iteration):
    n = len(ids)
    cols = {c: [None] * n for c in STORE_COLUMNS}
    cols.update(id=ids, run=["r"] * n, iteration=[iteration] * n, prompt_id=list(range(n)), sample_idx=[0] * n,
                cluster=[0] * n, prompt=["p"] * n, description=["d"] * n, text=[f"t{i}" for i in ids],
                image=[b"png"] * n, seed=[1] * n, adapter_version=[0] * n, distance=[float(i) for i in range(n)],
                is_hard=[True] * n, features=[[0.0, 1.0]] * n)
    return pa.table(cols)


def test_store_roundtrip_and_rows_by_id(tmp_path):
    store = AnomalyStore(tmp_path / "anomalies")
    store.write(1, _table(["a", "b"], 1))
    store.write(2, _table(["c"], 2))
    assert store.iterations() == [1, 2]
    assert store.read().num_rows == 3
    rows = store.rows(["c", "a"], columns=["text"])
    assert rows.column("id").to_pylist() == ["c", "a"]
    assert rows.column("text").to_pylist() == ["tc", "ta"]
    with pytest.raises(KeyError, match="not in the store"):
        store.rows(["zz"])
    with pytest.raises(ValueError, match="lack columns"):
        store.write(3, pa.table({"id": ["x"]}))


def test_anomaly_set_file_roundtrip(tmp_path):
    members = [M("a", 1.5, True), M("b", np.float64(2.0), False)]
    save_anomaly_set(members, tmp_path / "s.json")
    assert load_anomaly_set(tmp_path / "s.json") == [M("a", 1.5, True), M("b", 2.0, False)]


def test_relative_hardness_thirds():
    rows = [{"id": str(i), "distance": d} for i, d in enumerate([5.0, 1.0, 3.0, 9.0, 7.0, 2.0])]
    out = relative_hardness(rows)
    assert [(r["id"], r["is_hard"]) for r in out] == [("1", True), ("5", True), ("4", False), ("3", False)]
