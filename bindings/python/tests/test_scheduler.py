"""phenocore.Scheduler against the committed diffusers fixture (tests/fixtures/scheduler, always) and
against diffusers / MONAI themselves when they are importable (not in CI's venv)."""

from pathlib import Path

import numpy as np
import pytest

import phenocore
from phenocore import PhenoError, Scheduler, Status
from phenocore.scheduler import guide

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "scheduler" / "scheduler.npz"
TOL = 1e-4
CASES = {
    # case: (kind, prediction_type, eta, inference steps)
    "ddpm_v": ("ddpm", "v_prediction", 0.0, 10),
    "ddpm_eps": ("ddpm", "epsilon", 0.0, 10),
    "ddpm_sample": ("ddpm", "sample", 0.0, 10),
    "ddpm_full_v": ("ddpm", "v_prediction", 0.0, 1000),
    "ddim_v_eta0": ("ddim", "v_prediction", 0.0, 10),
    "ddim_eps_eta0": ("ddim", "epsilon", 0.0, 10),
    "ddim_v_eta05": ("ddim", "v_prediction", 0.5, 10),
    "ddim_sample_eta05": ("ddim", "sample", 0.5, 10),
}
SCHEDULES = {
    "linear": dict(schedule="linear_beta", beta_start=1e-4, beta_end=2e-2),
    "scaled_linear": dict(schedule="scaled_linear_beta"),
    "cosine": dict(schedule="cosine"),
}


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    assert np.isfinite(ours).all()
    return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


# ---- committed fixture -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_match_fixture(fx, name):
    s = Scheduler(**SCHEDULES[name])
    assert np.abs(s.betas / fx[f"sched/{name}/betas"] - 1).max() < 1e-6
    assert np.abs(s.alphas_cumprod / fx[f"sched/{name}/alphas_cumprod"] - 1).max() < TOL
    assert np.abs(s.alphas_cumprod / fx[f"sched/{name}/alphas_cumprod_f64"] - 1).max() < 1e-12


def test_add_noise_velocity_match_fixture_and_invert(fx):
    s = Scheduler()
    x0, noise, t = fx["x0"], fx["noise"], fx["t"]
    xt = s.add_noise(x0, noise, t)
    v = s.get_velocity(x0, noise, t)
    assert xt.dtype == np.float32 and xt.shape == x0.shape
    assert rel(xt, fx["add_noise"]) < TOL
    assert rel(v, fx["velocity"]) < TOL
    a = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert rel(np.sqrt(a) * xt - np.sqrt(1 - a) * v, x0) < 1e-6  # x0 = √ᾱ·x_t − √(1−ᾱ)·v
    assert rel(np.sqrt(a) * v + np.sqrt(1 - a) * xt, noise) < 1e-6  # ε = √ᾱ·v + √(1−ᾱ)·x_t
    # One timestep for every sample.
    np.testing.assert_array_equal(s.add_noise(x0, noise, 17), s.add_noise(x0, noise, np.full(4, 17)))


def test_timesteps_match_fixture(fx):
    s = Scheduler(kind="ddim")
    assert s.timesteps.size == 0
    for n in (1, 7, 10, 30, 50, 1000):
        s.set_timesteps(n)
        np.testing.assert_array_equal(s.timesteps, fx[f"timesteps/{n}"])


@pytest.mark.parametrize("case", list(CASES))
def test_steps_match_fixture(fx, case):
    kind, pred, eta, n = CASES[case]
    s = Scheduler(kind=kind, prediction_type=pred, eta=eta, seed=0)
    s.set_timesteps(n)
    g = lambda k: fx[f"step/{case}/{k}"]  # noqa: E731
    for k, t in enumerate(g("t")):
        prev, x0 = s.step(g("model_output")[k], t, g("sample")[k], noise=g("noise")[k])
        assert rel(x0, g("pred_original_sample")[k]) < TOL, (case, t)
        assert rel(prev, g("prev_sample")[k]) < TOL, (case, t)


# ---- behaviour -------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_numpy_generator_works():
    def run(**kw):
        s = Scheduler(kind="ddim", eta=1.0, seed=5)
        s.set_timesteps(5)
        x = s.noise((2, 3))
        for t in s.timesteps:
            x, _ = s.step(0.1 * x, t, x, **kw)
        return x

    np.testing.assert_array_equal(run(), run())
    a = run(generator=np.random.default_rng(1))
    np.testing.assert_array_equal(a, run(generator=np.random.default_rng(1)))
    assert not np.array_equal(a, run())


def test_guide():
    u, c = np.array([1.0, -2.0], np.float32), np.array([2.0, 0.0], np.float32)
    np.testing.assert_allclose(guide(u, c, 7.5), u + 7.5 * (c - u), rtol=1e-6)


def test_bad_input_names_the_culprit():
    s = Scheduler()
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(PhenoError, match="set_timesteps") as e:
        s.step(x, 10, x)
    assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(PhenoError, match="1001"):
        s.set_timesteps(1001)
    s.set_timesteps(10)
    with pytest.raises(PhenoError, match="timestep is 1000"):
        s.step(x, 1000, x)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(PhenoError, match=r"model_output\[5\] is NaN") as e:
        s.step(bad, 900, x)
    assert e.value.status == Status.NON_FINITE
    with pytest.raises(PhenoError, match=r"timesteps\[1\] is 1000"):
        s.add_noise(x, x, [0, 1000])
    with pytest.raises(PhenoError, match=r"timesteps\[0\] is -1"):
        s.get_velocity(x, x, [-1, 3])
    with pytest.raises(PhenoError, match="3 timesteps for 2 samples") as e:
        s.add_noise(x, x, [0, 1, 2])
    assert e.value.status == Status.SHAPE
    with pytest.raises(PhenoError, match="noise has shape"):
        s.add_noise(x, np.zeros((2, 4)), [0, 1])
    with pytest.raises(PhenoError, match="kind"):
        Scheduler(kind="euler")
    with pytest.raises(PhenoError, match="schedule"):
        Scheduler(schedule="quadratic")
    with pytest.raises(PhenoError, match="eta is 2"):
        Scheduler(kind="ddim", eta=2.0)
    with pytest.raises(PhenoError, match="beta_start"):
        Scheduler(beta_start=0.0)
    s.close()
    with pytest.raises(PhenoError, match="closed"):
        s.set_timesteps(5)


# ---- the peers themselves (skipped without torch + diffusers) ----------------------------------------


def test_full_sampling_loops_match_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    common = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0205,
                  clip_sample=False, prediction_type="v_prediction")
    for kind, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)):
        if kind == "ddpm":
            ref = diffusers.DDPMScheduler(**common)
        else:
            ref = diffusers.DDIMScheduler(set_alpha_to_one=True, **common)
        ours = Scheduler(kind=kind, eta=eta, seed=0)
        ref.set_timesteps(25)
        ours.set_timesteps(25)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
        xr, xo = x.clone(), x.numpy().copy()
        gr, go = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)

        def model(z, t):  # a smooth stand-in for a denoiser
            return 0.3 * z + 0.01 * (t / 1000.0)

        for t in ref.timesteps:
            kw = {"eta": eta} if kind == "ddim" else {}
            xr = ref.step(model(xr, int(t)), t, xr, generator=gr, **kw).prev_sample
            xo, _ = ours.step(model(xo, int(t)), int(t), xo, generator=go)
        err = rel(xo, xr.numpy())
        assert err < TOL, (kind, eta, err)


def test_forward_process_matches_monai():
    torch = pytest.importorskip("torch")
    schedulers = pytest.importorskip("monai.networks.schedulers")
    for name, kw in SCHEDULES.items():
        margs = {k: v for k, v in kw.items() if k != "schedule"} if name != "scaled_linear" else \
            dict(beta_start=0.0015, beta_end=0.0205)
        m = schedulers.DDPMScheduler(num_train_timesteps=1000, schedule=kw["schedule"], **margs)
        s = Scheduler(**kw)
        x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
        t = torch.tensor([5, 400, 990])
        # MONAI's float32 cosine β₀ loses ~1e-3 to cancellation; the rest agree to float32 rounding.
        tol = 5e-3 if name == "cosine" else TOL
        assert rel(s.add_noise(x0, noise, t), m.add_noise(x0, noise, t).numpy()) < tol
        assert rel(s.get_velocity(x0, noise, t), m.get_velocity(x0, noise, t).numpy()) < tol
