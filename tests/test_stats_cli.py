"""`fedmsk stats` through fedmsk.cli.main: JSON keys and values, tables, and one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from fedmsk import metrics as m
from fedmsk.cli import main


def write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def binary_rows(n=50, seed=0, positive="1", negative="0"):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2], y[2:4] = 0, 1
    s1 = np.round(rng.normal(size=n) + y, 1)  # rounded: plenty of ties
    s2 = np.round(rng.normal(size=n) + 0.5 * y, 1)
    rows = [(f"img{i}", positive if y[i] else negative, s1[i], s2[i]) for i in range(n)]
    return y, s1, s2, rows


def run_json(capsys, argv):
    rc = main([*argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def run_error(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err and out.out == ""
    return lines[0]


# ----------------------------------------------------------------------------- roc


def test_roc_json_keys_and_values(tmp_path, capsys):
    y, s1, _, rows = binary_rows()
    f = write_csv(tmp_path / "a.csv", ["image", "label", "score", "score2"], rows)
    out = run_json(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score"])
    assert set(out) == {
        "n_positive",
        "n_negative",
        "auc",
        "auc_variance",
        "auc_ci95",
        "youden",
    }
    assert out["auc"] == pytest.approx(roc_auc_score(y, s1))
    ref = m.auc_delong(y, s1)
    assert out["auc_variance"] == pytest.approx(ref.variance)
    assert out["auc_ci95"] == pytest.approx(list(ref.ci95))
    assert (out["n_positive"], out["n_negative"]) == (int(y.sum()), int(len(y) - y.sum()))
    assert set(out["youden"]) == {"threshold", "sensitivity", "specificity"}
    assert out["youden"]["threshold"] == m.youden_threshold(y, s1).threshold


def test_roc_paired_and_bootstrap(tmp_path, capsys):
    y, s1, s2, rows = binary_rows(seed=1)
    f = write_csv(tmp_path / "a.csv", ["image", "label", "score", "score2"], rows)
    argv = ["stats", "roc", str(f), "--label", "label", "--score", "score", "--score2", "score2"]
    out = run_json(capsys, [*argv, "--bootstrap", "100", "--seed", "4"])
    paired = out["paired"]
    assert {"auc2", "covariance", "z", "p"} <= set(paired)
    t = m.delong_paired_test(y, s1, s2)
    assert paired["auc2"] == pytest.approx(roc_auc_score(y, s2))
    assert paired["z"] == pytest.approx(t.z) and paired["covariance"] == pytest.approx(t.covariance)
    assert paired["p"] == pytest.approx(2 * stats.norm.sf(abs(t.z)))
    low, high = out["bootstrap_ci95"]
    assert low < out["auc"] < high
    again = run_json(capsys, [*argv, "--bootstrap", "100", "--seed", "4"])
    assert again["bootstrap_ci95"] == out["bootstrap_ci95"]


@pytest.mark.parametrize(
    "pos,neg,extra",
    [
        ("true", "false", []),
        ("True", "FALSE", []),
        ("fracture", "normal", ["--positive", "fracture"]),
        ("0", "1", ["--positive", "0"]),
        ("1.0", "0.0", []),
    ],
)
def test_roc_label_forms(tmp_path, capsys, pos, neg, extra):
    y, s1, _, rows = binary_rows(seed=2, positive=pos, negative=neg)
    f = write_csv(tmp_path / "a.csv", ["image", "label", "score", "score2"], rows)
    out = run_json(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score", *extra])
    assert out["auc"] == pytest.approx(roc_auc_score(y, s1))


def test_roc_all_ties_is_fine(tmp_path, capsys):
    rows = [(f"i{i}", i % 2, 0.5) for i in range(10)]
    f = write_csv(tmp_path / "t.csv", ["image", "label", "score"], rows)
    out = run_json(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score"])
    assert out["auc"] == 0.5 and out["auc_variance"] == 0.0


def test_roc_table_output(tmp_path, capsys):
    _, _, _, rows = binary_rows(seed=3)
    f = write_csv(tmp_path / "a.csv", ["image", "label", "score", "score2"], rows)
    rc = main(
        ["stats", "roc", str(f), "--label", "label", "--score", "score", "--score2", "score2"]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "AUC" in text and "DeLong" in text and "paired" in text
    assert not text.lstrip().startswith("{")


# ----------------------------------------------------------------------------- roc-unpaired


def test_roc_unpaired(tmp_path, capsys):
    ya, sa, _, ra = binary_rows(n=40, seed=5)
    yb, _, sb, rb = binary_rows(n=70, seed=6)
    fa = write_csv(tmp_path / "a.csv", ["image", "label", "score", "other"], ra)
    rb = [(r[0], r[1], r[3], r[2]) for r in rb]
    fb = write_csv(tmp_path / "b.csv", ["image", "label", "score", "other"], rb)
    out = run_json(
        capsys, ["stats", "roc-unpaired", str(fa), str(fb), "--label", "label", "--score", "score"]
    )
    assert {"auc1", "auc2", "statistic", "df", "p"} <= set(out)
    t = m.delong_unpaired_test(ya, sa, yb, sb)
    assert out["auc1"] == pytest.approx(roc_auc_score(ya, sa))
    assert out["auc2"] == pytest.approx(roc_auc_score(yb, sb))
    assert out["statistic"] == pytest.approx(t.statistic) and out["df"] == pytest.approx(t.df)
    assert out["p"] == pytest.approx(2 * stats.t.sf(abs(t.statistic), t.df))


# ----------------------------------------------------------------------------- multiclass


def test_multiclass(tmp_path, capsys):
    rng = np.random.default_rng(7)
    n, names = 90, ["2", "10", "1"]  # numeric sort: 1, 2, 10
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rows = [(names[y[i]], *(f"{v:.5f}" for v in p[i])) for i in range(n)]
    f = write_csv(tmp_path / "mc.csv", ["grade", *(f"prob_{c}" for c in names)], rows)
    out = run_json(
        capsys, ["stats", "multiclass", str(f), "--label", "grade", "--score-prefix", "prob_"]
    )
    assert out["classes"] == ["1", "2", "10"]
    assert {"top1_accuracy", "macro_f1", "weighted_f1", "confusion_matrix", "per_class"} <= set(out)
    order = [names.index(c) for c in out["classes"]]
    pr = np.round(p, 5)[:, order]
    yi = np.array([order.index(v) for v in y])
    res = m.multiclass_metrics(yi, pr)
    assert out["confusion_matrix"] == res.confusion.tolist()
    assert out["top1_accuracy"] == pytest.approx(np.mean(pr.argmax(1) == yi))
    for k, c in enumerate(out["classes"]):
        pc = out["per_class"][c]
        assert set(pc) == {"auc", "auc_ci95", "precision", "sensitivity", "specificity", "f1"}
        assert pc["auc"] == pytest.approx(roc_auc_score(yi == k, pr[:, k]))
    main(["stats", "multiclass", str(f), "--label", "grade", "--score-prefix", "prob_"])
    assert "confusion matrix" in capsys.readouterr().out


# ----------------------------------------------------------------------------- readers


def reader_files(tmp_path, n=40, seed=8):
    y, s1, _, rows = binary_rows(n=n, seed=seed, positive="fracture", negative="normal")
    scores = write_csv(tmp_path / "scores.csv", ["image", "label", "score", "s2"], rows)
    rng = np.random.default_rng(seed)
    calls = []
    for reader, exp in (("r1", "junior"), ("r2", "senior")):
        for i in range(n):
            c = y[i] if rng.random() < 0.8 else 1 - y[i]
            calls.append(
                (reader, exp, f"img{i}", "fracture" if c else "normal", rng.integers(1, 6))
            )
    readers = write_csv(
        tmp_path / "readers.csv", ["reader", "experience", "image", "call", "confidence"], calls
    )
    return scores, readers


def test_readers_binary_json(tmp_path, capsys):
    scores, readers = reader_files(tmp_path)
    out = run_json(
        capsys,
        [
            "stats",
            "readers",
            str(scores),
            str(readers),
            "--positive",
            "fracture",
            "--threshold",
            "0.5",
        ],
    )
    assert out["task_type"] == "binary" and out["model"]["threshold_source"] == "locked"
    assert [r["reader"] for r in out["readers"]] == ["r1", "r2"]
    r1 = out["readers"][0]
    assert r1["roc_point"]["fpr"] == pytest.approx(1 - r1["specificity"]["value"])
    assert r1["locked_threshold"]["mcnemar"]["accuracy"]["method"] in (
        "exact binomial",
        "chi-square with continuity correction",
    )
    assert set(out["groups"]) == {"junior", "senior"}
    assert r1["reader_auc"] is not None
    rc = main(["stats", "readers", str(scores), str(readers), "--positive", "fracture"])
    text = capsys.readouterr().out
    assert rc == 0 and "McNemar" in text and "r2" in text


def test_readers_multiclass_json(tmp_path, capsys):
    rng = np.random.default_rng(9)
    n = 45
    y = rng.integers(0, 3, n)
    p = rng.dirichlet([1, 1, 1], n)
    rows = [(f"x{i}", y[i], *(f"{v:.4f}" for v in p[i])) for i in range(n)]
    scores = write_csv(tmp_path / "s.csv", ["image", "grade", "p0", "p1", "p2"], rows)
    calls = [("a", "junior", f"x{i}", y[i] if i % 3 else (y[i] + 1) % 3) for i in range(n)]
    readers = write_csv(tmp_path / "r.csv", ["reader", "experience", "image", "call"], calls)
    out = run_json(
        capsys,
        ["stats", "readers", str(scores), str(readers), "--label", "grade", "--score-prefix", "p"],
    )
    assert out["task_type"] == "multiclass" and out["classes"] == ["0", "1", "2"]
    assert out["readers"][0]["accuracy"]["value"] == pytest.approx(30 / 45)


# ----------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path, capsys):
    line = run_error(
        capsys, ["stats", "roc", str(tmp_path / "nope.csv"), "--label", "l", "--score", "s"]
    )
    assert "nope.csv" in line and "no such file" in line


def test_error_missing_column(tmp_path, capsys):
    _, _, _, rows = binary_rows()
    f = write_csv(tmp_path / "a.csv", ["image", "label", "score", "score2"], rows)
    line = run_error(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "prob"])
    assert "a.csv" in line and "'prob'" in line and "columns: image, label" in line


def test_error_missing_value(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", ["label", "score"], [(0, 0.1), (1, ""), (1, 0.7), (0, 0.2)])
    line = run_error(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score"])
    assert "a.csv" in line and "'score'" in line and "line 3" in line and "missing" in line
    g = write_csv(tmp_path / "b.csv", ["label", "score"], [(0, 0.1), ("NA", 0.5), (1, 0.7)])
    line = run_error(capsys, ["stats", "roc", str(g), "--label", "label", "--score", "score"])
    assert "b.csv" in line and "'label'" in line and "missing" in line


def test_error_non_numeric_score(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", ["label", "score"], [(0, 0.1), (1, "high"), (1, 0.7)])
    line = run_error(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score"])
    assert "a.csv" in line and "'high' is not a number" in line


def test_error_single_class(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", ["label", "score"], [(1, 0.1), (1, 0.5), (1, 0.7)])
    line = run_error(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score"])
    assert "a.csv" in line and "only one class" in line


def test_error_string_labels_need_positive(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", ["label", "score"], [("yes!", 0.1), ("no!", 0.5)])
    line = run_error(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score"])
    assert "--positive" in line
    line = run_error(
        capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score", "--positive", "x"]
    )
    assert "'x'" in line and "not a value" in line


def test_error_three_labels_in_roc(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", ["label", "score"], [(0, 0.1), (1, 0.5), (2, 0.7)])
    line = run_error(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score"])
    assert "3 distinct labels" in line


def test_error_empty_file_and_unknown_reader_image(tmp_path, capsys):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    line = run_error(capsys, ["stats", "roc", str(empty), "--label", "l", "--score", "s"])
    assert "e.csv" in line and "empty" in line
    scores, readers = reader_files(tmp_path)
    with readers.open("a") as fh:
        fh.write("r1,junior,ghost,fracture,3\n")
    line = run_error(
        capsys, ["stats", "readers", str(scores), str(readers), "--positive", "fracture"]
    )
    assert "readers.csv" in line and "'ghost'" in line


def test_error_multiclass_label_not_a_class(tmp_path, capsys):
    f = write_csv(tmp_path / "m.csv", ["g", "p_a", "p_b"], [("a", 0.2, 0.8), ("c", 0.5, 0.5)])
    line = run_error(
        capsys, ["stats", "multiclass", str(f), "--label", "g", "--score-prefix", "p_"]
    )
    assert "m.csv" in line and "'c'" in line
    line = run_error(
        capsys, ["stats", "multiclass", str(f), "--label", "g", "--score-prefix", "q_"]
    )
    assert "'q_'" in line


def test_json_has_no_nan(tmp_path, capsys):
    rows = [(0, 0.1), (1, 0.9), (0, 0.2)]  # one positive: DeLong variance undefined
    f = write_csv(tmp_path / "a.csv", ["label", "score"], rows)
    out = run_json(capsys, ["stats", "roc", str(f), "--label", "label", "--score", "score"])
    assert out["auc"] == 1.0 and out["auc_variance"] is None
    assert out["auc_ci95"] == [None, None]
    assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())
