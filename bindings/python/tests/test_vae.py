"""phenocore.AutoencoderKL against diffusers' AutoencoderKL outputs in tests/fixtures/vae (made by
tests/fixtures/make_vae_fixture.py; diffusers itself is not needed)."""

import json
from pathlib import Path

import numpy as np
import pytest

import phenocore
from safetensors_np import read as read_safetensors

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "vae"


@pytest.fixture(scope="module")
def config():
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def vae(config):
    return phenocore.AutoencoderKL.load(FIXTURE / "weights.safetensors", config=config)


@pytest.fixture(scope="module")
def io():
    return read_safetensors(FIXTURE / "io.safetensors")


def rel_err(got, want):
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_encode_decode_match_diffusers(vae, io):
    assert (vae.in_channels, vae.latent_channels, vae.downscale) == (3, 4, 4)
    assert vae.scaling_factor == pytest.approx(0.13025)
    mean, logvar = vae.encode_moments(io["x"])
    assert rel_err(mean, io["mean"]) <= 1e-4
    assert rel_err(logvar, io["logvar"]) <= 1e-4
    assert np.array_equal(vae.encode(io["x"]), mean)
    assert rel_err(vae.decode(io["z"]), io["decoded"]) <= 1e-4


def test_sampling_is_seeded(vae, io):
    a = vae.encode(io["x"], sample=True, seed=5)
    b = vae.encode(io["x"], sample=True, seed=5)
    c = vae.encode(io["x"], sample=True, seed=6)
    mean, logvar = vae.encode_moments(io["x"])
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    eps = (a - mean) / np.exp(0.5 * logvar)
    assert abs(eps.mean()) < 4 / np.sqrt(eps.size) and abs(eps.var() - 1) < 0.25


def test_five_channel_scheme(vae, io):
    lat = vae.encode5(io["x5"])
    assert lat.shape == (1, 8, 8, 8)
    assert rel_err(lat, io["latents5"]) <= 1e-4
    rec = vae.decode5(lat)
    assert rec.shape == (1, 5, 32, 32)
    assert rel_err(rec, io["recon5"]) <= 1e-4
    # Configurable groups: the first group alone reproduces the first half of the latents.
    lat0 = vae.encode5(io["x5"][:, :3], groups=[[0, 1, 2]])
    np.testing.assert_array_equal(lat0, lat[:, :4])


def test_bad_input_and_weights(vae, io, config, tmp_path):
    with pytest.raises(phenocore.PhenoError) as e:
        vae.encode(np.zeros((1, 4, 32, 32), np.float32))
    assert e.value.status == phenocore.Status.SHAPE
    with pytest.raises(phenocore.PhenoError):
        vae.encode(np.zeros((1, 3, 30, 32), np.float32))
    x = io["x"].copy()
    x[0, 1, 2, 3] = np.nan
    with pytest.raises(phenocore.PhenoError) as e:
        vae.encode(x)
    assert e.value.status == phenocore.Status.NON_FINITE
    with pytest.raises(phenocore.PhenoError):
        vae.encode5(io["x5"], groups=[[0, 1, 2], [2, 3, 5]])
    # Weights for another config (the SDXL default): the first mismatching key is named.
    with pytest.raises(phenocore.PhenoError) as e:
        phenocore.AutoencoderKL.load(FIXTURE / "weights.safetensors")
    assert "encoder.conv_in.weight" in str(e.value) and "[128, 3, 3, 3]" in str(e.value)
    with pytest.raises(phenocore.PhenoError):
        phenocore.AutoencoderKL.load(FIXTURE / "weights.safetensors", config={**config, "layers_per_blok": 2})
    # Save / load round trip.
    path = tmp_path / "vae.safetensors"
    vae.save(path)
    back = phenocore.AutoencoderKL.load(path, config=config)
    np.testing.assert_array_equal(back.decode(io["z"]), vae.decode(io["z"]))
