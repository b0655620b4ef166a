"""phenocore.Sphering and phenocore.treatment_effect against numpy closed forms (numpy.linalg.eigh) and
the committed pycytominer fixtures (tests/fixtures/sphering, made by make_sphering_fixture.py)."""

from pathlib import Path

import numpy as np
import pytest

import phenocore
from phenocore import PhenoError, Status

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "sphering"


def numpy_sphering(x, lam, method):
    """REFERENCE §5 in numpy: Σ = Xcᵀ Xc / n = U Δ Uᵀ; ZCA U (Δ+λ)^(-1/2) Uᵀ, PCA (Δ+λ)^(-1/2) Uᵀ with
    each row's largest-magnitude entry positive; -cor on features divided by their sd (ddof 0)."""
    mu = x.mean(axis=0)
    xc = x - mu
    scale = xc.std(axis=0) if method.endswith("-cor") else np.ones(x.shape[1])
    xc = xc / scale
    delta, u = np.linalg.eigh(xc.T @ xc / len(x))
    delta, u = np.clip(delta[::-1], 0, None), u[:, ::-1]
    w = 1.0 / np.sqrt(delta + lam)
    if method.startswith("ZCA"):
        q = (u * w) @ u.T
    else:
        q = w[:, None] * u.T
        big = q[np.arange(len(q)), np.argmax(np.abs(q), axis=1)]
        q = q * np.sign(big)[:, None]
    return mu, scale, q, delta


def controls(n=200, d=9, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) + np.eye(d)
    return rng.normal(size=(n, d)) @ mix * rng.uniform(0.1, 5, d) + rng.normal(scale=10, size=d)


@pytest.mark.parametrize("method", ["ZCA", "PCA", "ZCA-cor", "PCA-cor"])
@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.5])
def test_matches_numpy_closed_form(method, lam):
    x = controls()
    t = controls(n=30, seed=1)
    sp = phenocore.Sphering.fit(x, lam=lam, method=method)
    mu, scale, q, delta = numpy_sphering(x, lam, method)
    assert (sp.method, sp.lam, sp.regularization, sp.n_features, sp.plates) == (method, lam, "eigenvalue", 9, None)
    np.testing.assert_allclose(sp.mean, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sp.scale, scale, rtol=1e-12)
    np.testing.assert_allclose(sp.eigenvalues, delta, rtol=1e-9, atol=1e-12 * delta[0])
    np.testing.assert_allclose(sp.matrix, q, rtol=1e-8, atol=1e-10 * np.abs(q).max())
    want = ((t - mu) / scale) @ q.T
    got = sp.transform(t)
    assert got.dtype == np.float64 and got.shape == t.shape
    assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()


@pytest.mark.parametrize("method", ["ZCA", "PCA"])
def test_whitened_controls_have_eigenvalues_delta_over_delta_plus_lambda(method):
    x, lam = controls(), 0.3
    sp = phenocore.Sphering.fit(x, lam=lam, method=method)
    y = sp.transform(x)
    cov = np.cov(y, rowvar=False, ddof=0)
    delta = sp.eigenvalues
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(cov))[::-1], delta / (delta + lam), atol=1e-10)
    q = sp.matrix
    if method == "ZCA":
        np.testing.assert_array_equal(q, q.T)
    else:
        np.testing.assert_allclose(q @ q.T, np.diag(1 / (delta + lam)), atol=1e-10 * np.abs(q @ q.T).max())


@pytest.mark.parametrize("case", ["tall", "wide"])
@pytest.mark.parametrize("method", ["ZCA", "PCA", "ZCA-cor", "PCA-cor"])
def test_matches_committed_pycytominer_fixture(case, method):
    f = np.load(FIXTURES / f"sphere_{case}.npz")
    x, t = f["X"], f["T"]
    cols = x.shape[1] if method.startswith("ZCA") else int(f["pca_valid"])
    for eps in (1e-6, 0.5):
        sp = phenocore.Sphering.fit(x, lam=eps, method=method, regularization="pycytominer")
        got, want = sp.transform(t)[:, :cols], f[f"pyc_{method}_{eps:g}"][:, :cols]
        assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max(), (case, method, eps)


def test_save_load_round_trip_and_per_plate(tmp_path):
    x = controls(n=120)
    plates = np.where(np.arange(120) % 2 == 0, "P1", "P2")
    x[plates == "P2"] += 3.0
    sp = phenocore.Sphering.fit(x, lam=1e-2, method="ZCA-cor", plates=plates)
    assert sp.plates == ["P1", "P2"]
    out = sp.transform(x, plates=plates)
    for p in ("P1", "P2"):
        alone = phenocore.Sphering.fit(x[plates == p], lam=1e-2, method="ZCA-cor")
        np.testing.assert_array_equal(out[plates == p], alone.transform(x[plates == p]))
        np.testing.assert_array_equal(sp.parameters(p)["matrix"], alone.matrix)
        assert sp.parameters(p)["n_controls"] == 60
    with pytest.raises(PhenoError) as e:
        sp.transform(x)
    assert e.value.status == Status.INVALID_ARGUMENT
    path = tmp_path / "per_plate.safetensors"
    sp.save(path)
    back = phenocore.Sphering.load(path)
    assert (back.method, back.lam, back.plates) == ("ZCA-cor", 1e-2, ["P1", "P2"])
    np.testing.assert_array_equal(back.transform(x, plates=plates), out)

    pooled = phenocore.Sphering.fit(x, lam=0.25, method="PCA", regularization="pycytominer")
    pooled.save(tmp_path / "pooled.safetensors")
    again = phenocore.Sphering.load(tmp_path / "pooled.safetensors")
    assert repr(again) == repr(pooled)
    np.testing.assert_array_equal(again.transform(x), pooled.transform(x))


def test_bad_input():
    x = controls(n=40, d=5)
    with pytest.raises(PhenoError) as e:
        phenocore.Sphering.fit(x, method="ICA")
    assert e.value.status == Status.INVALID_ARGUMENT
    x_const = x.copy()
    x_const[:, 3] = 2.0
    with pytest.raises(PhenoError) as e:
        phenocore.Sphering.fit(x_const, lam=0.0)
    assert e.value.status == Status.INVALID_ARGUMENT and "singular" in e.value.message
    assert np.isfinite(phenocore.Sphering.fit(x_const, lam=1e-3, method="ZCA-cor").transform(x)).all()
    bad = x.copy()
    bad[7, 2] = np.nan
    sp = phenocore.Sphering.fit(x)
    with pytest.raises(PhenoError) as e:
        sp.transform(bad)
    assert e.value.status == Status.NON_FINITE and "row 7, column 2" in e.value.message
    with pytest.raises(PhenoError) as e:
        sp.transform(x[:, :4])
    assert e.value.status == Status.SHAPE
    sp.close()
    with pytest.raises(PhenoError):
        sp.transform(x)


def numpy_effect(x, plates, treatments, control, fraction=0.2):
    dist = np.zeros(len(x))
    z = np.zeros(len(x))
    for p in np.unique(plates):
        on = plates == p
        med = np.median(x[on & control], axis=0)
        dist[on] = np.linalg.norm(x[on] - med, axis=1)
        cd = dist[on & control]
        z[on] = (dist[on] - cd.mean()) / cd.std(ddof=1)
    names = sorted(set(treatments[~control]))
    effect = np.array([z[(treatments == t) & ~control].mean() for t in names])
    order = sorted(range(len(names)), key=lambda i: (effect[i], names[i]))
    k = int(np.floor(fraction * len(names) + 0.5))
    start = (len(names) - k) // 2
    ranked = [names[i] for i in order]
    return dist, z, names, effect, ranked[:k], ranked[start : start + k], ranked[len(names) - k :]


def test_treatment_effect_matches_numpy():
    rng = np.random.default_rng(5)
    x, plates, treatments = [], [], []
    for p in ("A", "B"):
        for i in range(30):
            t = "DMSO" if i < 6 else f"c{i % 12}"
            x.append(rng.normal(size=4) * (1 + (i % 12) / 3))
            plates.append(p)
            treatments.append(t)
    x, plates, treatments = np.array(x), np.array(plates), np.array(treatments)
    control = treatments == "DMSO"
    fx = phenocore.treatment_effect(x, plates, treatments, controls="DMSO")
    dist, z, names, effect, bottom, middle, top = numpy_effect(x, plates, treatments, control)
    np.testing.assert_allclose(fx.distance, dist, rtol=1e-12)
    np.testing.assert_allclose(fx.z, z, rtol=1e-12, atol=1e-12)
    assert fx.treatments == names
    np.testing.assert_allclose(fx.effect, effect, rtol=1e-12)
    assert (fx.bottom, fx.middle, fx.top) == (bottom, middle, top)
    assert len(top) == 2
    same = phenocore.treatment_effect(x, plates, treatments, controls=control)
    np.testing.assert_array_equal(same.effect, fx.effect)


def test_treatment_effect_fixture_and_errors():
    f = np.load(FIXTURES / "effect.npz")
    fx = phenocore.treatment_effect(f["X"], f["plate"], f["treatment"], controls=f["control"].astype(bool))
    assert fx.treatments == list(f["names"])
    np.testing.assert_allclose(fx.effect, f["effect"], rtol=1e-12)
    tiers = {-1: "", 0: "bottom", 1: "middle", 2: "top"}
    assert fx.tier == [tiers[int(t)] for t in f["tier"]]
    with pytest.raises(PhenoError) as e:
        rows = [0, 1, 6, 7, 8]  # two controls of plate P1 and three treated wells
        phenocore.treatment_effect(f["X"][rows], f["plate"][rows], f["treatment"][rows], controls="DMSO")
    assert e.value.status == Status.INVALID_ARGUMENT and "control wells" in e.value.message
    with pytest.raises(PhenoError):
        phenocore.treatment_effect(f["X"], f["plate"], f["treatment"], controls="DMSO", fraction=0.5)
