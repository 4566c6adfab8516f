"""``fedmsk data check``: is this site's data usable, and what is wrong with it?

Hospital IT runs this before joining a federation. Every manifest row is checked: the file
exists, decodes with :func:`load_image`, has a label of the task (and a view of the task when
the task names views), is not an exact copy of another row's file, and its patient is not
already in two splits. Then each class must keep ``min_examples_per_class`` usable images.

The rules for what is left out match the dataset builder's (same split and duplicate rules),
so the counts printed here are the counts training will see. The report names files and their
manifest line, since it is read on the node by the people who must fix them, but never a
patient identifier: the output may be pasted into a support ticket. Layouts such as MURA put
the patient id into the path (``patient11185/``), so every patient id of the manifest (of at
least :data:`MASK_MIN_LENGTH` characters) is masked as ``<patient>`` in printed paths and
messages; the manifest line number still locates the file.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedmsk.data.errors import ImageReadError
from fedmsk.data.images import load_image
from fedmsk.data.manifest import ManifestRow, read_manifest
from fedmsk.data.splits import find_split_issues

PROBLEM_KINDS = (
    "missing_file",
    "unreadable_image",
    "unknown_label",
    "other_view",
    "unknown_split",
    "patient_in_two_splits",
    "duplicate_content",
    "too_few_examples",
)
MASK = "<patient>"
MASK_MIN_LENGTH = 3


@dataclass(frozen=True)
class Problem:
    """One finding: ``images`` are manifest paths, ``lines`` their manifest line numbers."""

    kind: str
    detail: str
    images: tuple[str, ...] = ()
    lines: tuple[int, ...] = ()


@dataclass
class CheckReport:
    """Outcome of :func:`check_site`; ``counts`` is class -> view -> usable images."""

    site_dir: Path
    classes: list[str]
    total_rows: int
    usable: list[ManifestRow]
    problems: list[Problem]
    counts: dict[str, dict[str, int]]
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    patient_ids: frozenset[str] = field(default_factory=frozenset, repr=False)

    @property
    def ok(self) -> bool:
        """Something usable remains (the exit status of ``fedmsk data check``)."""
        return bool(self.usable)

    def render(self) -> str:
        """Human-readable report: count tables, then problems with the files concerned."""
        mask = _masker(self.patient_ids)
        lines = [
            f"site: {mask(str(self.site_dir))}",
            f"rows: {self.total_rows}, usable: {len(self.usable)}, problems: {len(self.problems)}",
            "",
            "usable images per class and view:",
            *_table(self.counts, self.classes),
        ]
        if any(self.split_counts.values()):
            lines += ["", "usable images per class and split:"]
            lines += _table(self.split_counts, self.classes)
        lines.append("")
        if not self.problems:
            lines.append("no problems found")
        else:
            kinds = Counter(p.kind for p in self.problems)
            summary = ", ".join(f"{k}: {kinds[k]}" for k in PROBLEM_KINDS if kinds[k])
            lines.append(f"problems ({summary}):")
            for problem in self.problems:
                lines.append(f"  [{problem.kind}] {mask(problem.detail)}")
                for image, line in zip(problem.images, problem.lines, strict=False):
                    lines.append(f"      manifest line {line}: {mask(image)}")
        if not self.usable:
            lines += ["", "NOTHING USABLE REMAINS: fix the problems above and run the check again"]
        return "\n".join(lines)


def _masker(patient_ids: frozenset[str]):  # type: ignore[no-untyped-def]
    """A function that replaces every (long enough) patient id in a text by ``<patient>``."""
    ids = sorted((p for p in patient_ids if len(p) >= MASK_MIN_LENGTH), key=len, reverse=True)
    if not ids:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(p) for p in ids))
    return lambda text: pattern.sub(MASK, text)


def _table(counts: dict[str, dict[str, int]], classes: list[str]) -> list[str]:
    columns = sorted({col for per in counts.values() for col in per})
    header = ["class", *[c or "(none)" for c in columns], "total"]
    body = []
    for cls in classes:
        per = counts.get(cls, {})
        values = [per.get(col, 0) for col in columns]
        body.append([cls, *map(str, values), str(sum(values))])
    totals = [sum(counts.get(cls, {}).get(col, 0) for cls in classes) for col in columns]
    body.append(["total", *map(str, totals), str(sum(totals))])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return [
        ("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True))).rstrip()
        for r in [header, *body]
    ]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _row_problem(
    row: ManifestRow, site_dir: Path, classes: Sequence[str], views: Sequence[str], frame: str
) -> Problem | None:
    """The first problem of one row on its own (label, view, file, decode), or None."""
    if row.label not in classes:
        return Problem(
            "unknown_label", f"label {row.label!r} is not a class of the task", (row.image,)
        )
    if views and row.view and row.view not in views:
        return Problem("other_view", f"view {row.view!r} is not a view of the task", (row.image,))
    path = site_dir / row.image
    if not path.is_file():
        return Problem("missing_file", "file not found", (row.image,))
    try:
        load_image(path, frame=frame)
    except ImageReadError as exc:
        return Problem("unreadable_image", f"{type(exc).__name__}: {exc.cause}", (row.image,))
    except Exception as exc:  # a decoder bug is still one bad file, not a failed check
        return Problem("unreadable_image", f"{type(exc).__name__}: {exc}", (row.image,))
    return None


def check_site(
    site_dir: Path,
    classes: Sequence[str] | None,
    min_examples_per_class: int = 2,
    *,
    views: Sequence[str] = (),
    frame: str = "0",
) -> CheckReport:
    """Validate every row of ``SITE_DIR/manifest.csv`` (raises ManifestError if none is there).

    ``classes=None`` takes the labels found in the manifest as the classes (then no label is
    unknown). ``views``: when given, rows whose view is set and not listed are left out.
    """
    site_dir = Path(site_dir)
    rows = read_manifest(site_dir)
    class_list = list(classes) if classes else sorted({r.label for r in rows})
    line_of: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        line_of.setdefault(row.image, number)
    kept, split_issues = find_split_issues(rows)
    problems = [
        Problem(i.kind, i.detail, i.images, tuple(line_of[m] for m in i.images))
        for i in split_issues
    ]
    usable: list[ManifestRow] = []
    first_of: dict[str, str] = {}
    for row in kept:
        problem = _row_problem(row, site_dir, class_list, views, frame)
        if problem is None:
            digest = _file_digest(site_dir / row.image)
            if digest in first_of:
                problem = Problem(
                    "duplicate_content",
                    "same bytes as an earlier file (the earlier one is kept)",
                    (row.image, first_of[digest]),
                )
            else:
                first_of[digest] = row.image
        if problem is None:
            usable.append(row)
        else:
            problems.append(replace(problem, lines=tuple(line_of[m] for m in problem.images)))
    counts = {cls: dict(Counter(r.view for r in usable if r.label == cls)) for cls in class_list}
    split_counts = {
        cls: dict(Counter(r.split for r in usable if r.label == cls and r.split))
        for cls in class_list
    }
    for cls in class_list:
        n = sum(counts[cls].values())
        if n < min_examples_per_class:
            problems.append(
                Problem(
                    "too_few_examples",
                    f"class {cls!r} has {n} usable image(s); at least {min_examples_per_class} "
                    "are needed (data.min_examples_per_class)",
                )
            )
    patient_ids = frozenset(r.patient_id for r in rows if r.patient_id)
    return CheckReport(
        site_dir, class_list, len(rows), usable, problems, counts, split_counts, patient_ids
    )
