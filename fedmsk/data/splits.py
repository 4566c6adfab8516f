"""Patient-grouped, label-stratified train/val/test splits.

Images of one patient are correlated (same bones, same hardware, often the same study), so a
patient whose images sit in both the training and the test split inflates every metric. The
unit of assignment here is therefore the patient, never the image; labels only steer the
assignment (stratification) so that every split sees every class in roughly the site's
proportions.

Rows that already carry a split in the manifest keep it (a site may ship an official split).
A patient whose *other* rows are blank joins the split of its pre-assigned rows. A patient whose
pre-assigned rows disagree cannot be placed without leakage: :func:`find_split_issues` reports
such patients (by file name, never by patient id) so that both ``fedmsk data check`` and the
dataset builder leave them out the same way; :func:`assign_splits` refuses them.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fedmsk.data.manifest import ManifestRow

SPLIT_NAMES = ("train", "val", "test")
_NAMES_BY_COUNT = {2: ("train", "test"), 3: ("train", "val", "test")}


class SplitError(ValueError):
    """Splits cannot be assigned; the message names the setting or the files involved."""


@dataclass(frozen=True)
class SplitIssue:
    """Rows that cannot be given a split: ``kind`` is ``unknown_split`` or
    ``patient_in_two_splits``; ``images`` are manifest paths (local use only)."""

    kind: str
    images: tuple[str, ...]
    detail: str


def split_names(ratios: Sequence[float]) -> tuple[str, ...]:
    """``train/test`` for two ratios, ``train/val/test`` for three."""
    names = _NAMES_BY_COUNT.get(len(ratios))
    if names is None:
        raise SplitError(
            f"data.split_ratios={list(ratios)}: give 2 (train, test) or 3 (train, val, test) "
            "ratios, e.g. [0.8, 0.1, 0.1]"
        )
    return names


def normalise_ratios(ratios: Sequence[float]) -> list[float]:
    """Accept ``8:1:1`` as well as ``0.8, 0.1, 0.1``: ratios are relative weights."""
    split_names(ratios)
    values = [float(r) for r in ratios]
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise SplitError(
            f"data.split_ratios={list(ratios)}: ratios must be >= 0 with a positive sum"
        )
    total = sum(values)
    return [v / total for v in values]


def find_split_issues(rows: Sequence[ManifestRow]) -> tuple[list[ManifestRow], list[SplitIssue]]:
    """Separate rows that can be split from those that cannot.

    Returns ``(kept_rows, issues)``. Dropped: rows whose ``split`` value is not one of
    train/val/test, and every row of a patient whose pre-assigned splits disagree.
    """
    issues: list[SplitIssue] = []
    valid: list[ManifestRow] = []
    unknown = [r for r in rows if r.split and r.split not in SPLIT_NAMES]
    for row in unknown:
        issues.append(
            SplitIssue(
                "unknown_split",
                (row.image,),
                f"split value {row.split!r} is not one of {', '.join(SPLIT_NAMES)}",
            )
        )
    valid = [r for r in rows if not r.split or r.split in SPLIT_NAMES]
    preset: dict[str, set[str]] = defaultdict(set)
    for row in valid:
        if row.split:
            preset[row.patient_id].add(row.split)
    conflicted = {pid for pid, splits in preset.items() if len(splits) > 1}
    for pid in sorted(conflicted):
        images = tuple(r.image for r in valid if r.patient_id == pid)
        splits = ", ".join(sorted(preset[pid]))
        issues.append(
            SplitIssue(
                "patient_in_two_splits",
                images,
                f"{len(images)} images of one patient are assigned to different splits "
                f"({splits}); give them one split in the manifest",
            )
        )
    kept = [r for r in valid if r.patient_id not in conflicted]
    return kept, issues


def _majority_label(rows: Sequence[ManifestRow]) -> str:
    """The patient's most frequent label; ties go to the label seen first."""
    counts = Counter(r.label for r in rows)
    best = max(counts.values())
    return next(r.label for r in rows if counts[r.label] == best)


def _stable_seed(seed: int, text: str) -> int:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _ordered_patients(groups: dict[str, list[ManifestRow]], seed: int) -> list[str]:
    """Patients grouped by stratum (majority label), shuffled within and across strata.

    Sorting before shuffling makes the result independent of the manifest's row order.
    """
    strata: dict[str, list[str]] = defaultdict(list)
    for pid in sorted(groups):
        strata[_majority_label(groups[pid])].append(pid)
    labels = sorted(strata)
    random.Random(_stable_seed(seed, "strata")).shuffle(labels)
    ordered: list[str] = []
    for label in labels:
        patients = strata[label]
        random.Random(_stable_seed(seed, label)).shuffle(patients)
        ordered.extend(patients)
    return ordered


def _allocate(patients: list[str], sizes: dict[str, int], ratios: list[float]) -> dict[str, int]:
    """Deal patients to splits so that image counts track the ratios at every prefix.

    A weighted smooth round-robin: each patient goes to the split that is furthest below its
    share of the images dealt so far. Because patients of one stratum are contiguous, every
    stratum is split in proportion (to within one patient) and the remainders carry over, so
    the overall ratios hold even when strata are tiny.
    """
    assigned = [0.0] * len(ratios)
    dealt = 0
    result: dict[str, int] = {}
    for pid in patients:
        dealt += sizes[pid]
        deficits = [ratios[i] * dealt - assigned[i] for i in range(len(ratios))]
        choice = max(range(len(ratios)), key=lambda i: (deficits[i], ratios[i], -i))
        assigned[choice] += sizes[pid]
        result[pid] = choice
    return result


def assign_splits(
    rows: Sequence[ManifestRow], ratios: Sequence[float], seed: int
) -> list[ManifestRow]:
    """Give every row a split; patient-grouped, label-stratified, deterministic for a seed.

    ``ratios`` are relative weights over ``train/val/test`` (3 values) or ``train/test``
    (2 values), honoured on image counts among the rows without a split. Rows that already
    have a split keep it, and blank rows of the same patient join them. Raises
    :class:`SplitError` for an unknown split value or a patient already in two splits (use
    :func:`find_split_issues` first to drop those rows instead).
    """
    names = split_names(ratios)
    weights = normalise_ratios(ratios)
    _, issues = find_split_issues(rows)
    if issues:
        first = issues[0]
        shown = ", ".join(first.images[:5])
        raise SplitError(f"{first.detail}: {shown}")
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        groups[row.patient_id].append(row)
    fixed = {
        pid: next(r.split for r in group if r.split)
        for pid, group in groups.items()
        if any(r.split for r in group)
    }
    free = {pid: group for pid, group in groups.items() if pid not in fixed}
    order = _ordered_patients(free, seed)
    chosen = _allocate(order, {pid: len(g) for pid, g in free.items()}, weights)
    split_of = dict(fixed)
    split_of.update({pid: names[index] for pid, index in chosen.items()})
    return [r if r.split else replace(r, split=split_of[r.patient_id]) for r in rows]
