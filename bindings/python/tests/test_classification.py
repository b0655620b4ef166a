"""phenocore.metrics classification metrics, statistics and subprofiles against tests/fixtures/stats (made
by tests/fixtures/make_stats_fixture.py from scikit-learn 1.9.1, scipy 1.17.1, statsmodels and an
independent numpy + sklearn transcription of the prediction protocol) and numpy closed forms."""

from pathlib import Path

import numpy as np
import pytest

import phenocore
from phenocore import PhenoError, Status
from phenocore.metrics import (
    anova_oneway,
    average_precision_score,
    biosimilarity,
    compare_methods,
    moa_prediction,
    reference_subprofile,
    roc_auc,
    tukey_hsd,
)

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "stats"


def load(name):
    with np.load(FIXTURE / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def same(ours, theirs, tol=1e-12):
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    ok = ~np.isnan(theirs)
    np.testing.assert_allclose(ours[ok], theirs[ok], rtol=0, atol=tol)


def mann_whitney_auc(scores, truth):
    """P(score_pos > score_neg) + P(tie) / 2 from midranks: a closed form of the trapezoidal ROC-AUC."""
    scores, truth = np.asarray(scores, float), np.asarray(truth, bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    p, n = truth.sum(), (~truth).sum()
    return (ranks[truth].sum() - p * (p + 1) / 2) / (p * n)


def test_binary_metrics_match_sklearn_and_closed_forms():
    f = load("classification")
    s, t, off = f["bin_scores"], f["bin_truth"], f["bin_offsets"]
    ap = [average_precision_score(s[a:b], t[a:b]) for a, b in zip(off[:-1], off[1:])]
    auc = [roc_auc(s[a:b], t[a:b]) for a, b in zip(off[:-1], off[1:])]
    same(ap, f["bin_ap"])
    same(auc, f["bin_auc"])
    for a, b in zip(off[:-1], off[1:]):
        if 0 < t[a:b].sum() < b - a:
            assert abs(roc_auc(s[a:b], t[a:b].astype(bool)) - mann_whitney_auc(s[a:b], t[a:b])) < 1e-12
    # sklearn docstring: AP 0.8333...; all scores tied: AP = prevalence, AUC = 1/2.
    assert average_precision_score([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6, abs=1e-15)
    assert average_precision_score(np.full(5, 0.3), [1, 0, 0, 1, 0]) == pytest.approx(0.4, abs=1e-15)
    assert roc_auc(np.full(5, 0.3), [1, 0, 0, 1, 0]) == 0.5
    assert np.isnan(roc_auc([0.2, 0.1], [1, 1]))
    assert average_precision_score([0.2, 0.1], [0, 0]) == 0.0


def test_multilabel_averages_match_sklearn():
    f = load("classification")
    s = f["ml_scores"]
    for truth, prefix, averages in [
        (f["ml_truth"], "ml", ["macro", "micro", "weighted", "samples"]),
        (f["ml1_truth"], "ml1", ["macro", "weighted"]),
    ]:
        for avg in averages:
            same([average_precision_score(s, truth, average=avg)], f[f"{prefix}_ap_{avg}"])
            same([roc_auc(s, truth, average=avg)], f[f"{prefix}_auc_{avg}"])
        same(average_precision_score(s, truth, average=None), f[f"{prefix}_ap_none"])
        same(roc_auc(s, truth, average=None), f[f"{prefix}_auc_none"])
    # Macro AUC is the mean of the per-column Mann-Whitney statistics.
    t = f["ml_truth"]
    mw = np.mean([mann_whitney_auc(s[:, j], t[:, j]) for j in range(s.shape[1])])
    assert abs(roc_auc(s, t) - mw) < 1e-12


def test_classification_bad_input():
    with pytest.raises(PhenoError) as e:
        roc_auc([0.1, np.nan], [0, 1])
    assert e.value.status == Status.NON_FINITE
    with pytest.raises(PhenoError) as e:
        roc_auc([0.1, 0.2], [0, 1, 1])
    assert e.value.status == Status.SHAPE
    with pytest.raises(PhenoError) as e:
        roc_auc(np.zeros((3, 2)), np.zeros((3, 2)), average="median")
    assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(PhenoError) as e:
        average_precision_score([], [])
    assert e.value.status == Status.INVALID_ARGUMENT


def layout_groups(f, c):
    values, sizes = f[f"g{c}_values"], f[f"g{c}_sizes"]
    return np.split(values, np.cumsum(sizes)[:-1])


def test_anova_and_tukey_match_scipy_and_statsmodels():
    f = load("stats")
    for c in range(int(f["n_layouts"][0])):
        groups = layout_groups(f, c)
        a = anova_oneway(*groups)
        want_f, want_p = f[f"g{c}_anova"]
        assert abs(a.statistic / want_f - 1) < 1e-12 and abs(a.pvalue - want_p) < 1e-12
        # Closed form of F from numpy.
        grand = np.concatenate(groups).mean()
        k, n = len(groups), sum(len(g) for g in groups)
        ssb = sum(len(g) * (g.mean() - grand) ** 2 for g in groups)
        ssw = sum(((g - g.mean()) ** 2).sum() for g in groups)
        assert abs(a.statistic - (ssb / (k - 1)) / (ssw / (n - k))) < 1e-9 * a.statistic
        t = tukey_hsd(*groups)
        same(t.statistic, f[f"g{c}_tukey_statistic"], 1e-14)
        same(t.pvalue, f[f"g{c}_tukey_pvalue"], 1e-9)
        same(t.low, f[f"g{c}_tukey_low"], 1e-8)
        same(t.high, f[f"g{c}_tukey_high"], 1e-8)
        _, pairs = compare_methods({f"m{i}": g for i, g in enumerate(groups)})
        same([p.meandiff for p in pairs], f[f"g{c}_sm_meandiff"])
        same([p.p_adj for p in pairs], f[f"g{c}_sm_padj"], 1e-9)
        same([p.lower for p in pairs], f[f"g{c}_sm_lower"], 1e-8)
        same([p.upper for p in pairs], f[f"g{c}_sm_upper"], 1e-8)
        assert [p.reject for p in pairs] == [p.p_adj < 0.05 for p in pairs]
    with pytest.raises(PhenoError):
        tukey_hsd([1.0, 2.0], [3.0])
    with pytest.raises(PhenoError) as e:
        anova_oneway([1.0, np.inf], [2.0, 3.0])
    assert e.value.status == Status.NON_FINITE


def test_subprofile_and_biosimilarity():
    f = load("subprofile")
    g = f["group"]
    for t in (85, 60):
        sp = reference_subprofile(g, threshold=t / 100)
        np.testing.assert_array_equal(sp.mask, f[f"group_mask_{t}"].astype(bool))
        np.testing.assert_array_equal(sp.values[sp.mask], f[f"group_median_{t}"][sp.mask])
        assert np.isnan(sp.values[~sp.mask]).all()
    mask = f["group_mask_60"].astype(bool)
    u, v = f["bs_u"], f["bs_v"]
    same([biosimilarity(u, v, mask), biosimilarity(u, v)], f["bs_pearson"])
    same([biosimilarity(u, v, mask, form="pahl"), biosimilarity(u, v, form="pahl")], f["bs_pahl"])
    # Closed form: numpy's Pearson over the mask, for a batch of rows and by feature indices.
    rows = np.stack([u, v, u + v])
    want = [np.corrcoef(r[mask], v[mask])[0, 1] for r in rows]
    same(biosimilarity(rows, v, np.flatnonzero(mask)), want, 1e-13)
    with pytest.raises(PhenoError):
        biosimilarity(u, v[:3])
    with pytest.raises(PhenoError):
        biosimilarity(u, v, form="cosine")
    with pytest.raises(PhenoError):
        reference_subprofile(g, threshold=0.0)


def test_moa_prediction_matches_independent_protocol():
    f = load("subprofile")
    profiles, seen = f["profiles"], f["seen"].astype(bool)
    for case, labels, single in [("moa", f["labels"], True), ("target", f["target_labels"], False)]:
        refs = [[str(c) for c in fold] for fold in f[f"{case}_refs"]]
        for form in ("pearson", "pahl"):
            r = moa_prediction(
                profiles, [str(s) for s in labels], seen=seen, references=refs, form=form, single_label=single
            )
            want = f[f"{case}_{form}_metrics"]
            assert r.n_labels == len(f[f"{case}_kept"])
            np.testing.assert_array_equal(r.n_references, want[:, 0])
            for s, sub in enumerate([r.all, r.seen, r.unseen]):
                w = want[:, 1 + 6 * s : 7 + 6 * s]
                np.testing.assert_array_equal(sub.n_queries, w[:, 0])
                np.testing.assert_array_equal(sub.n_labels_scored, w[:, 1])
                for j, key in enumerate(["map", "ap_macro", "roc_auc_macro", "top1_accuracy"]):
                    same(getattr(sub, key), w[:, 2 + j])


def test_seeded_moa_prediction():
    f = load("subprofile")
    profiles, labels = f["profiles"], [str(s) for s in f["labels"]]
    a = moa_prediction(profiles, labels, seed=5)
    b = moa_prediction(profiles, labels, seed=5)
    c = moa_prediction(profiles, labels, seed=6)
    np.testing.assert_array_equal(a.all.map, b.all.map)
    assert not np.array_equal(a.all.map, c.all.map)
    assert len(a.all.map) == 10 and a.n_labels == 5
    np.testing.assert_array_equal(a.n_references, np.full(10, 25))
    assert (a.unseen.n_queries == 0).all() and np.isnan(a.unseen.map).all()
    with pytest.raises(PhenoError) as e:
        moa_prediction(profiles, labels[:-1])
    assert e.value.status == Status.SHAPE
    with pytest.raises(PhenoError) as e:
        moa_prediction(profiles, labels, references=[["no_such_label"] + [""] * (len(labels) - 1)])
    assert e.value.status == Status.INVALID_ARGUMENT


def test_exported_from_metrics():
    for name in ["average_precision_score", "roc_auc", "anova_oneway", "tukey_hsd", "moa_prediction"]:
        assert name in phenocore.metrics.__all__
