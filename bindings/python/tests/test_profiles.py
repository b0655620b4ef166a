"""phenocore.aggregate / aggregate_npz / read_profiles / write_profiles against numpy references and the
pandas-written parquet fixture of tests/fixtures/make_aggregate_fixture.py."""

import os
from pathlib import Path

import numpy as np
import pytest

import phenocore
from phenocore import PhenoError, Status

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "aggregate"


def cells(seed=0, d=5):
    """3 plates x 2 wells x 3 sites; 1..30 cells per site; ~10 % of cells hold a NaN; site P0/W1/2
    holds only NaN cells."""
    rng = np.random.default_rng(seed)
    rows, xs = [], []
    for p in range(3):
        for w in range(2):
            for s in range(3):
                n = int(rng.integers(1, 31))
                x = rng.normal(size=(n, d)) * 3 + rng.normal(size=d)
                bad = rng.random(n) < 0.1
                if (p, w, s) == (0, 1, 2):
                    bad[:] = True
                x[bad, rng.integers(0, d)] = np.nan
                xs.append(x)
                rows += [(f"P{p}", f"W{w}", str(s + 1), f"T{(p + w) % 3}", "ctl" if (p + w) % 3 == 0 else "trt")] * n
    meta = {
        k: [r[i] for r in rows]
        for i, k in enumerate(["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Treatment", "Metadata_Kind"])
    }
    return np.concatenate(xs), meta


def reference(x, meta, ops=("median", "mean", "mean")):
    """numpy: cells → site (NaN rows dropped) → well → treatment, groups in key order."""
    red = {"median": np.median, "mean": np.mean}
    keys = list(zip(meta["Metadata_Plate"], meta["Metadata_Well"], meta["Metadata_Site"]))
    ok = ~np.isnan(x).any(axis=1)
    sites = {}
    for k in sorted(set(keys), key=lambda k: (k[0], k[1], int(k[2]))):
        idx = [i for i, kk in enumerate(keys) if kk == k and ok[i]]
        if idx:
            sites[k] = red[ops[0]](x[idx], axis=0)
    wells = {}
    for k in sorted({k[:2] for k in sites}):
        wells[k] = red[ops[1]](np.array([v for s, v in sites.items() if s[:2] == k]), axis=0)
    treat_of = {(p, w): t for p, w, t in zip(meta["Metadata_Plate"], meta["Metadata_Well"], meta["Metadata_Treatment"])}
    treats = {}
    for t in sorted(set(treat_of[k] for k in wells)):
        treats[t] = red[ops[2]](np.array([v for k, v in wells.items() if treat_of[k] == t]), axis=0)
    return sites, wells, treats


@pytest.mark.parametrize("preset,ops", [("paper", ("median", "mean", "mean")), ("mean", ("mean",) * 3),
                                        ("median", ("median",) * 3)])
def test_chain_matches_numpy(preset, ops):
    x, meta = cells()
    sites, wells, treats = reference(x, meta, ops)
    for level, want in [("site", sites), ("well", wells), ("treatment", treats)]:
        p = phenocore.aggregate(x, meta, level=level, preset=preset)
        assert p.features.dtype == np.float64
        np.testing.assert_allclose(p.features, np.array(list(want.values())), rtol=1e-12, atol=1e-12)
        if level == "treatment":
            assert p.metadata["Metadata_Treatment"] == list(want)
            assert p.metadata["Metadata_Kind"] == ["ctl", "trt", "trt"]
            assert sum(map(int, p.metadata["Metadata_Object_Count"])) == int((~np.isnan(x).any(axis=1)).sum())
        elif level == "well":
            assert list(zip(p.metadata["Metadata_Plate"], p.metadata["Metadata_Well"])) == list(want)
            assert "Metadata_Site" not in p.metadata
        else:
            assert p.metadata["Metadata_Site"] == [k[2] for k in want]
    assert p.empty and p.empty[0].startswith("site Metadata_Plate=P0, Metadata_Well=W1, Metadata_Site=3")


def test_float32_cells_and_feature_names():
    x, meta = cells(1)
    x32 = x.astype(np.float32)
    p = phenocore.aggregate(x32, meta, feature_names=[f"f{j}" for j in range(5)], counts=False)
    _, _, treats = reference(x32.astype(np.float64), meta)
    np.testing.assert_allclose(p.features, np.array(list(treats.values())), rtol=1e-12)
    assert p.feature_names == [f"f{j}" for j in range(5)]
    assert "Metadata_Object_Count" not in p.metadata


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_without_treatment_column_stops_at_wells_and_per_feature_nan():
    x, meta = cells(2)
    del meta["Metadata_Treatment"]
    p = phenocore.aggregate(x, meta)  # no treatment column: well profiles
    assert len(p) == 6 - 0 and "Metadata_Well" in p.metadata
    # nan="per_feature": pandas' skipna, so the all-NaN-row site still gets a profile.
    q = phenocore.aggregate(x, meta, level="site", nan="per_feature", site_op="median")
    keys = list(zip(meta["Metadata_Plate"], meta["Metadata_Well"], meta["Metadata_Site"]))
    first = [i for i, k in enumerate(keys) if k == ("P0", "W1", "3")]
    row = q.metadata["Metadata_Site"].index("3", 3)
    np.testing.assert_allclose(q.features[row], np.nanmedian(x[first], axis=0), rtol=1e-12)
    assert not q.empty


def test_errors_name_the_culprit():
    x, meta = cells()
    with pytest.raises(PhenoError) as e:
        phenocore.aggregate(x, meta, on_empty="error")
    assert e.value.status == Status.INVALID_ARGUMENT and "Metadata_Site=3" in e.value.message
    bad = dict(meta)
    bad["Metadata_Well"] = list(meta["Metadata_Well"])
    bad["Metadata_Well"][4] = None
    with pytest.raises(PhenoError) as e:
        phenocore.aggregate(x, bad)
    assert "Metadata_Well" in e.value.message and "row 4" in e.value.message
    with pytest.raises(PhenoError) as e:
        phenocore.aggregate(x[:-1], meta)
    assert e.value.status == Status.SHAPE
    with pytest.raises(PhenoError) as e:
        phenocore.aggregate(x, {k: v for k, v in meta.items() if k != "Metadata_Site"})
    assert "Metadata_Site" in e.value.message
    with pytest.raises(PhenoError):
        phenocore.aggregate(x, meta, preset="max")
    with pytest.raises(PhenoError):
        phenocore.aggregate(x, meta, level="plate")


def test_read_write_round_trip(tmp_path):
    x, meta = cells()
    p = phenocore.aggregate(x, meta, level="well")
    p.features[0, 0] = np.nan
    p.metadata["Metadata_Note"] = ["a,b", 'q"', "µ", "", "x", "y"][: len(p)]
    for name in ["w.csv", "w.tsv", "w.csv.gz", "w.parquet"]:
        phenocore.write_profiles(tmp_path / name, p)
        q = phenocore.read_profiles(tmp_path / name)
        assert q.metadata == p.metadata and q.feature_names == p.feature_names
        np.testing.assert_array_equal(q.features, p.features)
    phenocore.write_profiles(tmp_path / "w.npy", p, npy_float32=True, npy_metadata=tmp_path / "w_meta.csv")
    arr = np.load(tmp_path / "w.npy")
    assert arr.dtype == np.float32 and arr.shape == p.features.shape
    q = phenocore.read_profiles(tmp_path / "w.npy", npy_metadata=tmp_path / "w_meta.csv")
    assert q.metadata == p.metadata
    np.testing.assert_array_equal(q.features, p.features.astype(np.float32).astype(np.float64))
    # Explicit metadata columns: then a text column left out of them is an error naming it.
    q = phenocore.read_profiles(tmp_path / "w.csv", metadata_columns=list(p.metadata))
    assert q.metadata == p.metadata
    with pytest.raises(PhenoError) as e:
        phenocore.read_profiles(tmp_path / "w.csv", metadata_columns=["Metadata_Plate", "Metadata_Well"])
    assert e.value.status == Status.FORMAT and "Metadata_Treatment" in e.value.message
    with pytest.raises(PhenoError) as e:
        phenocore.read_profiles(tmp_path / "w.xlsx")
    assert "w.xlsx" in e.value.message


def test_reads_the_pandas_parquet_fixture():
    p = phenocore.read_profiles(FIXTURES / "pandas_types.parquet")
    assert p.metadata["Metadata_Cat"] == ["ctrl", "trt", "trt", "ctrl", "trt"]
    assert p.metadata["Metadata_Opt"] == ["a", "", "µé", "", "z"]
    assert p.feature_names == ["f_int32", "f_uint8", "f_float32", "f_float64", "f_nullable"]
    np.testing.assert_array_equal(p.features[:, 1], [0, 255, 7, 1, 2])
    assert np.isnan(p.features[1, 3]) and np.isnan(p.features[3, 4])


def test_pandas_reads_what_we_write(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    x, meta = cells()
    p = phenocore.aggregate(x, meta)
    phenocore.write_profiles(tmp_path / "t.parquet", p)
    df = pd.read_parquet(tmp_path / "t.parquet")
    assert list(df.columns) == list(p.metadata) + p.feature_names
    np.testing.assert_array_equal(df[p.feature_names].to_numpy(), p.features)
    assert df["Metadata_Treatment"].tolist() == p.metadata["Metadata_Treatment"]
    # A DataFrame goes in as it is (Metadata_* columns are metadata).
    back = phenocore.aggregate(pd.concat([pd.DataFrame(meta), pd.DataFrame(x, columns=list("abcde"))], axis=1))
    np.testing.assert_array_equal(back.features, p.features)
    pd.testing.assert_frame_equal(p.to_pandas(), df)


def write_site(path, x, meta):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        features=x.astype(np.float32),
        locations=np.zeros((len(x), 2), np.float32),
        metadata=np.array([f"{k}={v}" for k, v in meta.items()]),
    )


def test_aggregate_npz_streams_site_files(tmp_path):
    x, meta = cells(3)
    x = x.astype(np.float32)
    keys = list(zip(meta["Metadata_Plate"], meta["Metadata_Well"], meta["Metadata_Site"]))
    for k in sorted(set(keys)):
        idx = [i for i, kk in enumerate(keys) if kk == k]
        write_site(tmp_path / k[0] / f"{k[1]}_{k[2]}.npz", x[idx], {c: meta[c][idx[0]] for c in meta})
    seen = []
    p = phenocore.aggregate_npz(tmp_path, progress=lambda d, t: seen.append((d, t)))
    q = phenocore.aggregate(x, meta)
    np.testing.assert_array_equal(p.features, q.features)
    assert p.metadata == q.metadata and p.empty == q.empty
    assert seen[0] == (0, 18) and seen[-1] == (18, 18)
    with pytest.raises(PhenoError) as e:
        phenocore.aggregate_npz(tmp_path, progress=lambda d, t: False)
    assert e.value.status == Status.CANCELLED

    def boom(d, t):
        raise KeyError("from the callback")

    with pytest.raises(KeyError):
        phenocore.aggregate_npz(tmp_path, progress=boom)
