"""fedmsk stats: study statistics on CSV files (a public, stable interface).

All commands read CSV files with a header row. Without ``--json`` they print a readable table;
with ``--json`` exactly one JSON object (NaN/undefined -> null). A user error (missing file or
column, missing or non-numeric value, a single class, unknown label) prints one line
``fedmsk stats CMD: error: FILE: ...`` on stderr and exits with status 2.

Labels may be 0/1, true/false, yes/no or any two strings; for strings other than those, name
the positive one with ``--positive VALUE`` (compared case-insensitively, numbers by value).
A case is called positive when ``score >= threshold``. Tied scores are allowed and handled
exactly (midranks). All 95% CIs: DeLong normal CI clipped to [0, 1] for AUC; Wilson for
proportions.

``fedmsk stats roc FILE --label COL --score COL [--score2 COL] [--positive V]
[--bootstrap N --seed S] [--json]``
    n_positive, n_negative, auc, auc_variance (DeLong), auc_ci95 [low, high] (DeLong),
    youden {threshold, sensitivity, specificity};
    with --bootstrap N: bootstrap_ci95 [low, high] (stratified percentile, N resamples, --seed);
    with --score2 COL: paired {auc2, auc2_variance, auc2_ci95, covariance, z, p}
    (DeLong test for two correlated ROC curves, z = (auc - auc2) / SE, two-sided normal p).

``fedmsk stats roc-unpaired FILE_A FILE_B --label COL --score COL [--positive V] [--json]``
    auc1, auc2, auc1_variance, auc2_variance, statistic, df, p
    (DeLong test for two independent ROC curves, as pROC roc.test(paired=FALSE): t statistic,
    Welch-Satterthwaite df, two-sided t p-value).

``fedmsk stats multiclass FILE --label COL --score-prefix PREFIX [--json]``
    One score column per class, named PREFIX + class; the prediction is the top score.
    classes (numeric order when all class names are numbers, else alphabetical),
    top1_accuracy, macro_f1, weighted_f1, confusion_matrix (rows true, columns predicted, in
    the order of classes), per_class {class: {auc, auc_ci95, precision, sensitivity,
    specificity, f1}} (one-vs-rest; auc null when the class is absent).

``fedmsk stats readers SCORES_FILE READERS_FILE [--image COL] [--label COL] [--score COL |
--score-prefix PREFIX] [--positive V] [--threshold T] [--mcnemar-exact-below N] [--json]``
    SCORES_FILE: one row per image (image key, reference label, model score(s)).
    READERS_FILE: reader,experience,image,call[,confidence]; calls use the label values.
    Binary (``--score``): task_type "binary", n_images, n_positive, n_negative, mcnemar_rule,
    model {auc, auc_ci95, threshold, threshold_source ("locked" with --threshold, else "youden
    (not locked)"), sensitivity, specificity, roc {fpr, tpr} on a 101-point FPR grid},
    readers [{reader, experience, n_images, sensitivity, specificity, accuracy,
    roc_point {fpr, tpr}, reader_auc (from confidence: +conf for positive calls, -conf for
    negative; null without confidence), model_at_reader_specificity {threshold, sensitivity,
    specificity, sensitivity_difference}, model_at_reader_sensitivity {threshold, sensitivity,
    specificity, specificity_difference}, locked_threshold {threshold, model_sensitivity,
    model_specificity, model_accuracy, mcnemar {accuracy, sensitivity, specificity}}}],
    groups {experience: {n_readers, mean_sensitivity, mean_specificity, pooled_sensitivity,
    pooled_specificity, roc_point, model_sensitivity_at_mean_specificity,
    model_specificity_at_mean_sensitivity}}.
    Multi-class (``--score-prefix``): task_type "multiclass", classes, n_images, mcnemar_rule,
    model {top1_accuracy, per_class {class: {auc, auc_ci95, roc}}}, readers [{reader,
    experience, n_images, accuracy, model_accuracy, accuracy_difference, mcnemar,
    per_class {class: {sensitivity, specificity, roc_point,
    model_sensitivity_at_reader_specificity}}}], groups {experience: {n_readers,
    mean_accuracy, pooled_accuracy, mean_model_accuracy}}.
    Metrics with CIs are {value, ci95}; differences are model minus reader; each reader is
    compared with the model on the images that reader read. A McNemar result is {n,
    model_only_correct, reader_only_correct, statistic (null for the exact test), p, method}:
    exact binomial when the discordant count is below --mcnemar-exact-below (default 25),
    otherwise chi-square with continuity correction.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

MISSING_TOKENS = {"", "na", "nan", "n/a", "null", "none"}
TRUE_TOKENS = {"true", "yes", "t", "y"}
FALSE_TOKENS = {"false", "no", "f", "n"}


class StatsInputError(Exception):
    """A problem with the user's files or options; the message names the file and column."""


# ----------------------------------------------------------------------------- registration


def register(subparsers: argparse._SubParsersAction) -> None:
    stats = subparsers.add_parser(
        "stats",
        help="AUC/DeLong, ROC comparisons, multi-class metrics and reader studies on CSV files",
        description=__doc__.split("\n\n")[0],
    )
    stats.set_defaults(func=lambda args: _usage(stats))
    sub = stats.add_subparsers(dest="stats_command", metavar="STATS_COMMAND")

    roc = sub.add_parser("roc", help="AUC with DeLong CI; paired DeLong test with --score2")
    roc.add_argument("file", type=Path)
    roc.add_argument("--label", required=True, help="column with the reference label")
    roc.add_argument("--score", required=True, help="column with the model score")
    roc.add_argument("--score2", help="second score column on the same cases (paired test)")
    roc.add_argument("--positive", help="label value of the positive class")
    roc.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples")
    roc.add_argument("--seed", type=int, default=0)
    roc.add_argument("--json", action="store_true")
    roc.set_defaults(func=run_roc)

    unp = sub.add_parser("roc-unpaired", help="DeLong test of two independent ROC curves")
    unp.add_argument("file_a", type=Path)
    unp.add_argument("file_b", type=Path)
    unp.add_argument("--label", required=True)
    unp.add_argument("--score", required=True)
    unp.add_argument("--positive")
    unp.add_argument("--json", action="store_true")
    unp.set_defaults(func=run_roc_unpaired)

    mc = sub.add_parser("multiclass", help="top-1 accuracy, F1, per-class AUC, confusion matrix")
    mc.add_argument("file", type=Path)
    mc.add_argument("--label", required=True)
    mc.add_argument("--score-prefix", required=True, help="score columns are PREFIX + class")
    mc.add_argument("--json", action="store_true")
    mc.set_defaults(func=run_multiclass)

    rd = sub.add_parser("readers", help="compare the model with human readers")
    rd.add_argument("scores_file", type=Path)
    rd.add_argument("readers_file", type=Path)
    rd.add_argument("--image", default="image", help="image key column (default: image)")
    rd.add_argument("--label", default="label", help="label column (default: label)")
    rd.add_argument("--score", default=None, help="binary score column (default: score)")
    rd.add_argument("--score-prefix", help="multi-class score columns PREFIX + class")
    rd.add_argument("--positive")
    rd.add_argument("--threshold", type=float, help="locked model threshold (else Youden)")
    rd.add_argument("--mcnemar-exact-below", type=int, default=25, metavar="N")
    rd.add_argument("--json", action="store_true")
    rd.set_defaults(func=run_readers)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _guarded(name: str):  # type: ignore[no-untyped-def]
    """Turn user errors into one line on stderr and exit status 2."""

    def wrap(fn):  # type: ignore[no-untyped-def]
        def run(args: argparse.Namespace) -> int:
            try:
                result = fn(args)
            except (StatsInputError, ValueError) as exc:
                print(f"fedmsk stats {name}: error: {exc}", file=sys.stderr)
                return 2
            _emit(result, args.json, name)
            return 0

        run.__doc__ = fn.__doc__
        return run

    return wrap


# ----------------------------------------------------------------------------- CSV reading


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[dict[str, str]]

    def column(self, name: str) -> list[str]:
        if name not in self.columns:
            raise StatsInputError(
                f"{self.path}: no column {name!r} (columns: {', '.join(self.columns)})"
            )
        return [(r.get(name) or "").strip() for r in self.rows]

    def where(self, name: str, i: int) -> str:
        return f"{self.path}: column {name!r}, line {i + 2}"


def read_table(path: Path) -> Table:
    if not path.exists():
        raise StatsInputError(f"{path}: no such file")
    if not path.is_file():
        raise StatsInputError(f"{path}: not a file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = list(reader)
    except UnicodeDecodeError:
        raise StatsInputError(f"{path}: not a UTF-8 text CSV file") from None
    except csv.Error as exc:
        raise StatsInputError(f"{path}: not a readable CSV file ({exc})") from None
    if not columns:
        raise StatsInputError(f"{path}: empty file (a header row is needed)")
    if not rows:
        raise StatsInputError(f"{path}: no data rows")
    return Table(path, columns, rows)


def numeric_column(table: Table, name: str) -> list[float]:
    out = []
    for i, raw in enumerate(table.column(name)):
        if raw.lower() in MISSING_TOKENS:
            raise StatsInputError(f"{table.where(name, i)}: missing value")
        try:
            value = float(raw)
        except ValueError:
            raise StatsInputError(f"{table.where(name, i)}: {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise StatsInputError(f"{table.where(name, i)}: {raw!r} is not a finite number")
        out.append(value)
    return out


def canon(value: str) -> str:
    """Comparable form of a label: numbers by value, true/yes = 1, false/no = 0, else lowercase."""
    v = value.strip().lower()
    if v in TRUE_TOKENS:
        return "1"
    if v in FALSE_TOKENS:
        return "0"
    try:
        f = float(v)
    except ValueError:
        return v
    return format(f, "g") if math.isfinite(f) else v


def label_column(table: Table, name: str) -> list[str]:
    values = table.column(name)
    for i, raw in enumerate(values):
        if raw.lower() in MISSING_TOKENS:
            raise StatsInputError(f"{table.where(name, i)}: missing label")
    return [canon(v) for v in values]


def positive_token(table: Table, name: str, labels: list[str], positive: str | None) -> str:
    """The canonical positive label; the column must hold exactly two distinct values."""
    distinct = sorted(set(labels))
    if len(distinct) == 1:
        raise StatsInputError(
            f"{table.path}: column {name!r} has only one class ({distinct[0]!r}); "
            "an ROC analysis needs positive and negative cases"
        )
    if len(distinct) > 2:
        shown = ", ".join(repr(d) for d in distinct[:6])
        raise StatsInputError(
            f"{table.path}: column {name!r} has {len(distinct)} distinct labels ({shown}); "
            "a binary analysis needs exactly two (use `fedmsk stats multiclass` for more)"
        )
    if positive is not None:
        token = canon(positive)
        if token not in distinct:
            raise StatsInputError(
                f"{table.path}: --positive {positive!r} is not a value of column {name!r} "
                f"(values: {', '.join(distinct)})"
            )
        return token
    if distinct == ["0", "1"]:
        return "1"
    raise StatsInputError(
        f"{table.path}: column {name!r} has labels {distinct[0]!r} and {distinct[1]!r}; "
        "name the positive one with --positive"
    )


def binary_data(
    table: Table, label: str, score: str, positive: str | None
) -> tuple[list[int], list[float]]:
    scores = numeric_column(table, score)
    labels = label_column(table, label)
    pos = positive_token(table, label, labels, positive)
    return [int(v == pos) for v in labels], scores


# ----------------------------------------------------------------------------- roc


@_guarded("roc")
def run_roc(args: argparse.Namespace) -> dict:
    """AUC with DeLong variance/CI, Youden point, optional bootstrap CI and paired test."""
    from fedmsk import metrics as m

    table = read_table(args.file)
    y, s = binary_data(table, args.label, args.score, args.positive)
    if args.bootstrap < 0:
        raise StatsInputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    res = m.auc_delong(y, s)
    yd = m.youden_threshold(y, s)
    out: dict = {
        "n_positive": res.n_positive,
        "n_negative": res.n_negative,
        "auc": res.auc,
        "auc_variance": res.variance,
        "auc_ci95": list(res.ci95),
        "youden": {
            "threshold": yd.threshold,
            "sensitivity": yd.sensitivity,
            "specificity": yd.specificity,
        },
    }
    if args.bootstrap:
        out["bootstrap_ci95"] = list(m.bootstrap_auc_ci(y, s, args.bootstrap, args.seed))
    if args.score2:
        s2 = numeric_column(table, args.score2)
        test = m.delong_paired_test(y, s, s2)
        out["paired"] = {
            "auc2": test.auc2,
            "auc2_variance": test.variance2,
            "auc2_ci95": list(m.normal_ci(test.auc2, test.variance2)),
            "covariance": test.covariance,
            "z": test.z,
            "p": test.p,
        }
    return out


@_guarded("roc-unpaired")
def run_roc_unpaired(args: argparse.Namespace) -> dict:
    """DeLong test of two ROC curves on independent case sets."""
    from fedmsk import metrics as m

    ta, tb = read_table(args.file_a), read_table(args.file_b)
    ya, sa = binary_data(ta, args.label, args.score, args.positive)
    yb, sb = binary_data(tb, args.label, args.score, args.positive)
    t = m.delong_unpaired_test(ya, sa, yb, sb)
    return {
        "auc1": t.auc1,
        "auc2": t.auc2,
        "auc1_variance": t.variance1,
        "auc2_variance": t.variance2,
        "statistic": t.statistic,
        "df": t.df,
        "p": t.p,
    }


# ----------------------------------------------------------------------------- multiclass


def class_columns(table: Table, prefix: str) -> tuple[list[str], list[str]]:
    """Class names (sorted numerically when all are numbers) and their score columns."""
    cols = [c for c in table.columns if c.startswith(prefix) and len(c) > len(prefix)]
    if len(cols) < 2:
        raise StatsInputError(
            f"{table.path}: fewer than two score columns start with {prefix!r} "
            f"(columns: {', '.join(table.columns)})"
        )
    names = [c[len(prefix) :] for c in cols]
    if len({canon(n) for n in names}) != len(names):
        raise StatsInputError(f"{table.path}: score columns {cols} name the same class twice")
    try:
        order = sorted(range(len(names)), key=lambda i: float(names[i]))
    except ValueError:
        order = sorted(range(len(names)), key=lambda i: names[i])
    return [names[i] for i in order], [cols[i] for i in order]


def class_indices(table: Table, column: str, values: list[str], classes: list[str]) -> list[int]:
    index = {canon(c): i for i, c in enumerate(classes)}
    out = []
    for i, raw in enumerate(values):
        if raw.lower() in MISSING_TOKENS:
            raise StatsInputError(f"{table.where(column, i)}: missing value")
        if canon(raw) not in index:
            raise StatsInputError(
                f"{table.where(column, i)}: {raw!r} is not one of the classes {', '.join(classes)}"
            )
        out.append(index[canon(raw)])
    return out


def multiclass_data(table: Table, label: str, prefix: str):  # type: ignore[no-untyped-def]
    import numpy as np

    classes, cols = class_columns(table, prefix)
    probs = np.column_stack([numeric_column(table, c) for c in cols])
    y = class_indices(table, label, table.column(label), classes)
    if len(set(y)) < 2:
        raise StatsInputError(
            f"{table.path}: column {label!r} has only one class ({classes[y[0]]!r}); "
            "per-class AUCs need at least two classes present"
        )
    return classes, np.asarray(y), probs


@_guarded("multiclass")
def run_multiclass(args: argparse.Namespace) -> dict:
    """Top-1 accuracy, macro/weighted F1, confusion matrix and one-vs-rest per-class metrics."""
    from fedmsk import metrics as m

    table = read_table(args.file)
    classes, y, probs = multiclass_data(table, args.label, args.score_prefix)
    res = m.multiclass_metrics(y, probs)
    per_class = {}
    for name, pc in zip(classes, res.per_class, strict=True):
        per_class[name] = {
            "auc": None if pc.auc is None else pc.auc.auc,
            "auc_ci95": None if pc.auc is None else list(pc.auc.ci95),
            "precision": pc.precision.value,
            "sensitivity": pc.sensitivity.value,
            "specificity": pc.specificity.value,
            "f1": pc.f1.value,
        }
    return {
        "classes": classes,
        "top1_accuracy": res.top1_accuracy.value,
        "macro_f1": res.macro_f1,
        "weighted_f1": res.weighted_f1,
        "confusion_matrix": res.confusion.tolist(),
        "per_class": per_class,
    }


# ----------------------------------------------------------------------------- readers


def image_keys(table: Table, column: str) -> list[str]:
    keys = table.column(column)
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if not key:
            raise StatsInputError(f"{table.where(column, i)}: missing image key")
        if key in seen:
            raise StatsInputError(f"{table.where(column, i)}: image {key!r} appears twice")
        seen.add(key)
    return keys


def reader_calls(table: Table, to_call, known: set[str]):  # type: ignore[no-untyped-def]
    """ReaderCall records; ``to_call(raw, where)`` maps a call value to an int."""
    from fedmsk.reader_study import ReaderCall

    readers, exps = table.column("reader"), table.column("experience")
    images, calls = table.column("image"), table.column("call")
    conf = numeric_column(table, "confidence") if "confidence" in table.columns else None
    out = []
    for i in range(len(table.rows)):
        for col, value in (("reader", readers[i]), ("image", images[i]), ("call", calls[i])):
            if value.lower() in MISSING_TOKENS:
                raise StatsInputError(f"{table.where(col, i)}: missing value")
        if images[i] not in known:
            raise StatsInputError(
                f"{table.where('image', i)}: image {images[i]!r} has no row in the scores file"
            )
        out.append(
            ReaderCall(
                reader=readers[i],
                experience=exps[i] or "unspecified",
                image=images[i],
                call=to_call(calls[i], table.where("call", i)),
                confidence=None if conf is None else conf[i],
            )
        )
    return out


@_guarded("readers")
def run_readers(args: argparse.Namespace) -> dict:
    """Model-vs-reader comparison (binary with --score, multi-class with --score-prefix)."""
    from fedmsk import reader_study

    scores_t, readers_t = read_table(args.scores_file), read_table(args.readers_file)
    keys = image_keys(scores_t, args.image)
    if args.mcnemar_exact_below < 0:
        raise StatsInputError("--mcnemar-exact-below must be >= 0")
    if args.score_prefix and args.score:
        raise StatsInputError("give either --score (binary) or --score-prefix (multi-class)")
    try:
        if args.score_prefix:
            classes, y, probs = multiclass_data(scores_t, args.label, args.score_prefix)
            index = {canon(c): i for i, c in enumerate(classes)}

            def to_class(raw: str, where: str) -> int:
                if canon(raw) not in index:
                    raise StatsInputError(f"{where}: {raw!r} is not one of {', '.join(classes)}")
                return index[canon(raw)]

            calls = reader_calls(readers_t, to_class, set(keys))
            return reader_study.compare_multiclass(
                calls,
                dict(zip(keys, y.tolist(), strict=True)),
                {k: probs[i].tolist() for i, k in enumerate(keys)},
                classes,
                exact_below=args.mcnemar_exact_below,
            )
        score_col = args.score or "score"
        y, s = binary_data(scores_t, args.label, score_col, args.positive)
        labels = label_column(scores_t, args.label)
        pos = positive_token(scores_t, args.label, labels, args.positive)
        neg = next(v for v in labels if v != pos)

        def to_binary(raw: str, where: str) -> int:
            token = canon(raw)
            if token not in (pos, neg):
                raise StatsInputError(
                    f"{where}: call {raw!r} is neither the positive ({pos!r}) nor the negative "
                    f"({neg!r}) label"
                )
            return int(token == pos)

        calls = reader_calls(readers_t, to_binary, set(keys))
        return reader_study.compare_binary(
            calls,
            dict(zip(keys, y, strict=True)),
            dict(zip(keys, s, strict=True)),
            threshold=args.threshold,
            exact_below=args.mcnemar_exact_below,
        )
    except ValueError as exc:
        raise StatsInputError(f"{args.readers_file}: {exc}") from None


# ----------------------------------------------------------------------------- output


def _json_safe(obj):  # type: ignore[no-untyped-def]
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _emit(result: dict, as_json: bool, name: str) -> None:
    result = _json_safe(result)
    if as_json:
        print(json.dumps(result, indent=2, allow_nan=False))
        return
    printer = {
        "roc": _print_roc,
        "roc-unpaired": _print_flat,
        "multiclass": _print_multiclass,
        "readers": _print_readers,
    }[name]
    printer(result)


def _f(x, digits: int = 4) -> str:  # type: ignore[no-untyped-def]
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _ci(pair) -> str:  # type: ignore[no-untyped-def]
    return "-" if pair is None else f"[{_f(pair[0])}, {_f(pair[1])}]"


def _est(e) -> str:  # type: ignore[no-untyped-def]
    return "-" if e is None else f"{_f(e['value'])} {_ci(e['ci95'])}"


def _print_roc(r: dict) -> None:
    print(f"cases          {r['n_positive']} positive, {r['n_negative']} negative")
    print(f"AUC            {_f(r['auc'])}  95% CI (DeLong) {_ci(r['auc_ci95'])}")
    print(f"variance       {_f(r['auc_variance'], 6)}")
    if "bootstrap_ci95" in r:
        print(f"bootstrap CI   {_ci(r['bootstrap_ci95'])}")
    y = r["youden"]
    print(
        f"Youden         threshold {_f(y['threshold'])}  sensitivity {_f(y['sensitivity'])}  "
        f"specificity {_f(y['specificity'])}"
    )
    if "paired" in r:
        p = r["paired"]
        print(f"AUC (score2)   {_f(p['auc2'])}  95% CI (DeLong) {_ci(p['auc2_ci95'])}")
        print(f"paired DeLong  covariance {_f(p['covariance'], 6)}  z {_f(p['z'])}  p {_f(p['p'])}")


def _print_flat(r: dict) -> None:
    for key, value in r.items():
        print(f"{key:<15}{_f(value)}")


def _print_multiclass(r: dict) -> None:
    print(f"top-1 accuracy {_f(r['top1_accuracy'])}")
    print(f"macro F1       {_f(r['macro_f1'])}")
    print(f"weighted F1    {_f(r['weighted_f1'])}")
    width = max(8, *(len(c) for c in r["classes"])) + 2
    header = ["AUC", "95% CI", "precision", "sensitivity", "specificity", "F1"]
    print(
        "".ljust(width)
        + f"{header[0]:>8} {header[1]:>18} "
        + " ".join(f"{h:>11}" for h in header[2:])
    )
    for c in r["classes"]:
        pc = r["per_class"][c]
        vals = [pc[k] for k in ("precision", "sensitivity", "specificity", "f1")]
        print(
            c.ljust(width)
            + f"{_f(pc['auc']):>8} {_ci(pc['auc_ci95']):>18} "
            + " ".join(f"{_f(v):>11}" for v in vals)
        )
    print("confusion matrix (rows true, columns predicted):")
    print("".ljust(width) + "".join(f"{c:>{width}}" for c in r["classes"]))
    for c, row in zip(r["classes"], r["confusion_matrix"], strict=True):
        print(c.ljust(width) + "".join(f"{v:>{width}}" for v in row))


def _print_readers(r: dict) -> None:
    model = r["model"]
    if r["task_type"] == "binary":
        print(
            f"model AUC {_f(model['auc'])} {_ci(model['auc_ci95'])}; threshold "
            f"{_f(model['threshold'])} ({model['threshold_source']}): sensitivity "
            f"{_est(model['sensitivity'])}, specificity {_est(model['specificity'])}"
        )
        for rd in r["readers"]:
            at_spec = rd["model_at_reader_specificity"] or {}
            mc = rd["locked_threshold"]["mcnemar"]["accuracy"]
            print(
                f"{rd['reader']} ({rd['experience']}, n={rd['n_images']}): sensitivity "
                f"{_est(rd['sensitivity'])}, specificity {_est(rd['specificity'])}; model "
                f"sensitivity at reader specificity {_est(at_spec.get('sensitivity'))}; "
                f"McNemar accuracy p {_f(mc['p'])} ({mc['method']})"
            )
        for exp, g in r["groups"].items():
            print(
                f"group {exp} ({g['n_readers']} readers): mean sensitivity "
                f"{_f(g['mean_sensitivity'])}, mean specificity {_f(g['mean_specificity'])}, "
                f"model sensitivity at mean specificity "
                f"{_f(g['model_sensitivity_at_mean_specificity'])}"
            )
    else:
        print(f"model top-1 accuracy {_est(model['top1_accuracy'])}")
        for rd in r["readers"]:
            mc = rd["mcnemar"]
            print(
                f"{rd['reader']} ({rd['experience']}, n={rd['n_images']}): accuracy "
                f"{_est(rd['accuracy'])}, model {_est(rd['model_accuracy'])}; McNemar p "
                f"{_f(mc['p'])} ({mc['method']})"
            )
        for exp, g in r["groups"].items():
            print(
                f"group {exp} ({g['n_readers']} readers): mean accuracy "
                f"{_f(g['mean_accuracy'])}, pooled {_est(g['pooled_accuracy'])}"
            )
    print(f"McNemar: {r['mcnemar_rule']}")
