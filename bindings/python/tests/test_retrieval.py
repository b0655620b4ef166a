"""phenocore.metrics retrieval functions against tests/fixtures/retrieval (made by
tests/fixtures/make_retrieval_fixture.py from copairs 0.5.5, scikit-learn, scipy, statsmodels, pandas and
re-implementations of DeepProfilerExperiments' and cytominer-eval's code paths)."""

from pathlib import Path

import numpy as np
import pytest

import phenocore
from phenocore import PhenoError, Status
from phenocore.metrics import (
    folds_of_enrichment,
    mean_average_precision,
    precision_at_k,
    recall_at_k,
    replicate_reproducibility,
)

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "retrieval"
MULTI = ["random_multi", "ties_multi"]


def load(name):
    with np.load(FIXTURE / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def same(ours, theirs, tol=1e-12):
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    ok = ~np.isnan(theirs)
    np.testing.assert_allclose(ours[ok], theirs[ok], rtol=0, atol=tol)


@pytest.mark.parametrize("name", MULTI)
def test_deepprofiler_and_interpolated_map(name):
    f = load(name)
    labels = [str(s) for s in f["labels"]]
    r = mean_average_precision(f["x"], labels, "deepprofiler")
    same(r.per_query, f["dp_ap"])
    assert r.mean == pytest.approx(np.nanmean(f["dp_ap"]), abs=1e-12)
    same(r.precision, f["dp_curve"])
    same(r.recall, f["dp_recall"], 0)
    r = mean_average_precision(f["x"], labels, "deepprofiler", sklearn_before_1_1=True)
    same(r.per_query, f["dp_legacy_ap"])
    r = mean_average_precision(f["x"], labels, "deepprofiler", unlabeled="drop")
    same(r.per_query, f["dp_drop_ap"])
    r = mean_average_precision(f["x"], labels, recall_points=int(f["ip_points"]))
    same(r.per_query, f["ip_ap"])
    same(r.precision, f["ip_curve"])
    assert r.p_values is None
    # lists of labels work as well as "|"-joined strings
    lists = [s.split("|") if s else [] for s in labels]
    same(mean_average_precision(f["x"], lists).per_query, f["ip_default_ap"])


@pytest.mark.parametrize("name", MULTI)
def test_copairs_formula_multilabel(name):
    f = load(name)
    r = mean_average_precision(f["x"], list(f["labels"]), "copairs")
    same(r.per_query, f["cp_ap"])
    np.testing.assert_array_equal(r.n_positives, f["n_positives"])
    assert r.n_queries == np.count_nonzero(~np.isnan(f["cp_ap"]))


def test_copairs_ap_and_p_values_against_copairs():
    f = load("copairs_single")
    ns = int(f["null_size"])
    r = mean_average_precision(f["x"], list(f["labels"]), "copairs", null_size=ns, seed=11)
    same(r.per_query, f["peer_ap"])
    theirs = f["peer_p"]
    ok = ~np.isnan(theirs)
    np.testing.assert_array_equal(np.isnan(r.p_values), ~ok)
    pbar = (r.p_values[ok] + theirs[ok]) / 2  # two RNGs: 4 sd of the difference of two estimates
    tol = 4 * np.sqrt(2 * pbar * (1 - pbar) / ns) + 1 / ns
    assert np.all(np.abs(r.p_values[ok] - theirs[ok]) <= tol)
    assert np.all(r.q_values[ok] >= r.p_values[ok])
    again = mean_average_precision(f["x"], list(f["labels"]), "copairs", null_size=ns, seed=11)
    np.testing.assert_array_equal(again.p_values, r.p_values)
    g = load("ties_single")
    same(mean_average_precision(g["x"], list(g["labels"]), "copairs").per_query, g["peer_ap"])
    h = load("copairs_f32")  # near-duplicates that tie only in copairs' float32 similarities
    same(mean_average_precision(h["x"], list(h["labels"]), "copairs").per_query, h["peer_ap"])
    same(mean_average_precision(h["x"], list(h["labels"]), "copairs", copairs_float32=False).per_query, h["cp_ap"])


@pytest.mark.parametrize("name", MULTI)
def test_folds_of_enrichment(name):
    f = load(name)
    labels = list(f["labels"])
    for pct in (99, 90):
        e = folds_of_enrichment(f["x"], labels, percentile=pct, infinite_odds="keep")
        same(e.thresholds, f[f"enr{pct}_threshold"])
        q = ~np.isnan(f[f"enr{pct}_threshold"])
        np.testing.assert_array_equal(e.tables.reshape(-1, 4)[q], f[f"enr{pct}_table"][q])
        theirs = f[f"enr{pct}_or"]
        np.testing.assert_array_equal(np.isinf(e.odds_ratio), np.isinf(theirs))
        fin = np.isfinite(theirs)
        same(e.odds_ratio[fin], theirs[fin])
        np.testing.assert_allclose(e.p_values[q], f[f"enr{pct}_p"][q], rtol=1e-12, atol=1e-15)
        h = folds_of_enrichment(f["x"], labels, percentile=pct)
        assert np.isfinite(h.mean) and np.all(np.isfinite(h.odds_ratio[q]))
    g = folds_of_enrichment(f["x"], labels, threshold="global", infinite_odds="keep")
    assert g.threshold == pytest.approx(float(f["pooled_threshold"]), abs=1e-12)
    np.testing.assert_array_equal(g.table.ravel(), f["pooled_table"])
    assert g.p_value == pytest.approx(float(f["pooled_p"]), rel=1e-12)


@pytest.mark.parametrize("name", MULTI)
def test_precision_recall_at_k_and_replicates(name):
    f = load(name)
    ks = [int(k) for k in f["pk_ks"]]
    p = precision_at_k(f["x"], list(f["labels"]), ks)
    same(p.per_query, f["pk_precision"], 1e-15)
    same(p.mean, np.nanmean(f["pk_precision"], axis=0))
    r = recall_at_k(f["x"], list(f["labels"]), ks[1])
    same(r.per_query, f["pk_recall"][:, 1], 1e-15)
    assert isinstance(r.mean, float)
    rep = replicate_reproducibility(f["x"], list(f["groups"]))
    assert rep.threshold == pytest.approx(float(f["rep_threshold"]), abs=1e-12)
    assert rep.fraction == float(f["rep_fraction"])


def test_bad_input_and_cancel():
    f = load("random_multi")
    x, labels = f["x"], list(f["labels"])
    with pytest.raises(PhenoError) as e:
        mean_average_precision(x, labels[:5])
    assert e.value.status == Status.SHAPE
    bad = x.copy()
    bad[4, 2] = np.nan
    with pytest.raises(PhenoError) as e:
        mean_average_precision(bad, labels)
    assert e.value.status == Status.NON_FINITE and "row 4, feature 2" in e.value.message
    with pytest.raises(PhenoError):
        mean_average_precision(x, labels, "sklearn")
    with pytest.raises(PhenoError):
        precision_at_k(x, labels, 0)
    with pytest.raises(PhenoError) as e:
        replicate_reproducibility(x, [f"g{i}" for i in range(len(x))])
    assert e.value.status == Status.INVALID_ARGUMENT
    seen = []
    with pytest.raises(PhenoError) as e:
        mean_average_precision(x, labels, block_rows=2, progress=lambda d, t: seen.append(d) or False)
    assert e.value.status == Status.CANCELLED and len(seen) == 1

    class Boom(Exception):
        pass

    def explode(done, total):
        raise Boom()

    with pytest.raises(Boom):
        folds_of_enrichment(x, labels, progress=explode)


def test_exported_from_metrics():
    assert {"mean_average_precision", "folds_of_enrichment", "precision_at_k", "recall_at_k",
            "replicate_reproducibility"} <= set(phenocore.metrics.__all__)
