"""Patient-grouped, stratified splits: no patient in two splits, ever."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from fedmsk.data.manifest import ManifestRow
from fedmsk.data.splits import SplitError, assign_splits, find_split_issues, normalise_ratios


def _random_rows(rng: random.Random, n_patients: int, labels: list[str]) -> list[ManifestRow]:
    rows = []
    for p in range(n_patients):
        label = rng.choice(labels)
        for k in range(rng.randint(1, 5)):
            # a few patients have mixed labels (e.g. one fractured and one normal wrist)
            row_label = label if rng.random() > 0.1 else rng.choice(labels)
            rows.append(ManifestRow(f"img/{p}_{k}.png", row_label, f"patient-{p}"))
    rng.shuffle(rows)
    return rows


def _splits_per_patient(rows: list[ManifestRow]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        found[row.patient_id].add(row.split)
    return found


def _assert_no_leakage(rows: list[ManifestRow]) -> None:
    for pid, splits in _splits_per_patient(rows).items():
        assert len(splits) == 1, f"patient {pid} in {splits}"


@pytest.mark.parametrize("case", range(150))
def test_no_patient_in_two_splits_random_cases(case: int) -> None:
    rng = random.Random(case)
    labels = ["a", "b", "c"][: rng.randint(1, 3)]
    rows = _random_rows(rng, rng.randint(1, 60), labels)
    # some rows arrive with a split already: whole patients, as the rules require
    preset = {
        r.patient_id: rng.choice(["train", "val", "test"]) for r in rows if rng.random() < 0.1
    }
    rows = [
        ManifestRow(r.image, r.label, r.patient_id, split=preset[r.patient_id])
        if r.patient_id in preset and rng.random() < 0.5
        else r
        for r in rows
    ]
    ratios = rng.choice([[0.8, 0.1, 0.1], [6, 4], [1, 1, 1], [0.7, 0.3]])
    result = assign_splits(rows, ratios, seed=case)
    assert [r.image for r in result] == [r.image for r in rows]
    allowed = {"train", "val", "test"} if len(ratios) == 3 else {"train", "test"}
    for before, after in zip(rows, result, strict=True):
        if before.split:
            assert after.split == before.split
        elif before.patient_id not in preset:
            assert after.split in allowed
    _assert_no_leakage(result)


def test_hypothesis_no_leakage() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(
        patients=st.lists(
            st.tuples(st.integers(0, 30), st.sampled_from(["x", "y", "z"])), max_size=80
        ),
        ratios=st.sampled_from([[8, 1, 1], [6, 4], [0.5, 0.25, 0.25]]),
        seed=st.integers(0, 2**31),
    )
    def check(patients: list[tuple[int, str]], ratios: list[float], seed: int) -> None:
        rows = [ManifestRow(f"{i}.png", lab, str(p)) for i, (p, lab) in enumerate(patients)]
        _assert_no_leakage(assign_splits(rows, ratios, seed))

    check()


@pytest.mark.parametrize(
    ("ratios", "expected"), [([8, 1, 1], [0.8, 0.1, 0.1]), ([6, 4], [0.6, 0.4])]
)
def test_ratios_roughly_honoured(ratios: list[float], expected: list[float]) -> None:
    rows = [
        ManifestRow(f"{p}_{k}.png", "fracture" if p % 3 == 0 else "normal", f"P{p}")
        for p in range(400)
        for k in range(1 + p % 3)
    ]
    result = assign_splits(rows, ratios, seed=3)
    names = ["train", "val", "test"] if len(ratios) == 3 else ["train", "test"]
    counts = Counter(r.split for r in result)
    assert set(counts) == set(names)
    for name, share in zip(names, expected, strict=True):
        assert counts[name] / len(rows) == pytest.approx(share, abs=0.02)


def test_each_split_is_stratified_by_label() -> None:
    rows = [ManifestRow(f"{p}.png", "rare" if p < 50 else "common", f"P{p}") for p in range(500)]
    result = assign_splits(rows, [0.8, 0.1, 0.1], seed=11)
    for split in ("train", "val", "test"):
        in_split = [r for r in result if r.split == split]
        rare = sum(r.label == "rare" for r in in_split) / len(in_split)
        assert rare == pytest.approx(0.1, abs=0.02), split


def test_small_strata_still_fill_every_split() -> None:
    # ten labels with three patients each: per-stratum rounding alone would put all in train
    rows = [
        ManifestRow(f"{lab}{p}.png", f"c{lab}", f"{lab}-{p}") for lab in range(10) for p in range(3)
    ]
    counts = Counter(r.split for r in assign_splits(rows, [0.8, 0.1, 0.1], seed=0))
    assert counts["val"] == 3 and counts["test"] == 3 and counts["train"] == 24


def test_deterministic_for_a_seed_and_independent_of_row_order() -> None:
    rows = _random_rows(random.Random(5), 80, ["n", "f"])
    first = assign_splits(rows, [0.8, 0.1, 0.1], seed=7)
    assert first == assign_splits(rows, [0.8, 0.1, 0.1], seed=7)
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    again = {r.image: r.split for r in assign_splits(shuffled, [0.8, 0.1, 0.1], seed=7)}
    assert {r.image: r.split for r in first} == again
    other = assign_splits(rows, [0.8, 0.1, 0.1], seed=8)
    assert [r.split for r in other] != [r.split for r in first]


def test_preset_split_is_kept_and_pulls_in_the_patients_other_rows() -> None:
    rows = [
        ManifestRow("a1.png", "n", "A", split="test"),
        ManifestRow("a2.png", "n", "A"),
        *[ManifestRow(f"b{i}.png", "n", f"B{i}") for i in range(20)],
    ]
    result = {r.image: r.split for r in assign_splits(rows, [0.5, 0.5], seed=0)}
    assert result["a1.png"] == "test" and result["a2.png"] == "test"


def test_patient_in_two_preset_splits_is_refused_without_naming_the_patient() -> None:
    rows = [
        ManifestRow("x/one.png", "n", "SECRET-ID-42", split="train"),
        ManifestRow("x/two.png", "n", "SECRET-ID-42", split="test"),
        ManifestRow("x/three.png", "n", "other", split="val"),
    ]
    with pytest.raises(SplitError) as info:
        assign_splits(rows, [8, 1, 1], seed=0)
    assert "x/one.png" in str(info.value) and "SECRET-ID-42" not in str(info.value)
    kept, issues = find_split_issues(rows)
    assert [r.image for r in kept] == ["x/three.png"]
    assert issues[0].kind == "patient_in_two_splits"
    assert set(issues[0].images) == {"x/one.png", "x/two.png"}


def test_unknown_split_value_is_reported() -> None:
    rows = [ManifestRow("a.png", "n", "A", split="validation"), ManifestRow("b.png", "n", "B")]
    kept, issues = find_split_issues(rows)
    assert [r.image for r in kept] == ["b.png"]
    assert issues[0].kind == "unknown_split"
    with pytest.raises(SplitError, match="validation"):
        assign_splits(rows, [8, 1, 1], seed=0)


@pytest.mark.parametrize("bad", [[1.0], [0.5, 0.3, 0.1, 0.1], [0, 0], [-1, 2]])
def test_bad_ratios_name_the_setting(bad: list[float]) -> None:
    with pytest.raises(SplitError, match="data.split_ratios"):
        normalise_ratios(bad)
    with pytest.raises(SplitError, match="data.split_ratios"):
        assign_splits([ManifestRow("a.png", "n", "A")], bad, seed=0)
