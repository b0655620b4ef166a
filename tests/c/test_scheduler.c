/*
 * C link test of the diffusion scheduler ABI (pheno_scheduler_*, pheno_guidance): compiled against
 * include/phenocore.h, linked with the cdylib, run plain and under valgrind by scripts/test-c.sh.
 * Checks closed forms (REFERENCE §10) and diffusers' ᾱ; the full diffusers/MONAI parity is
 * tests/scheduler.rs. Exit status 0 when every check passes.
 */
#include "phenocore.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "check.h"

enum { T = 1000, N = 2, L = 6 };

int main(void) {
    PhenoSchedulerOptions o = pheno_scheduler_default_options();
    CHECK(o.struct_size == sizeof(PhenoSchedulerOptions), "struct_size");
    CHECK(o.kind == PHENO_SAMPLER_DDPM && o.schedule == PHENO_BETA_SCALED_LINEAR &&
              o.prediction_type == PHENO_PREDICT_V && o.clip_sample == 0 && o.num_train_timesteps == T,
          "defaults");
    o.kind = PHENO_SAMPLER_DDIM;
    PhenoScheduler *s = NULL;
    OK(pheno_scheduler_new(&o, &s));
    if (s == NULL) return 1;

    /* ᾱ: the f64 closed form, and diffusers' float32 value within 1e-6 relative. */
    static double betas[T], abar[T];
    OK(pheno_scheduler_schedule(s, betas, abar, T));
    double acc = 1.0;
    for (int t = 0; t < T; t++) {
        double r = sqrt(0.0015) + (sqrt(0.0205) - sqrt(0.0015)) * t / (T - 1.0);
        CHECK(fabs(betas[t] - r * r) <= 1e-15, "betas[%d] = %g, expected %g", t, betas[t], r * r);
        acc *= 1.0 - r * r;
    }
    CHECK(fabs(abar[T - 1] - acc) <= 1e-15 * acc, "alphas_cumprod[999] %g vs %g", abar[T - 1], acc);
    CHECK(fabs(abar[499] / 0.10857602953910828 - 1.0) < 1e-6, "alphas_cumprod[499] %.9g", abar[499]);

    /* add_noise / get_velocity and the v round trip x0 = √ᾱ·x_t − √(1−ᾱ)·v. */
    float x0[N * L], eps[N * L], xt[N * L], v[N * L];
    for (int i = 0; i < N * L; i++) {
        x0[i] = (float)sin(0.7 * i);
        eps[i] = (float)cos(1.3 * i + 0.2);
    }
    int64_t ts[N] = {500, 20};
    OK(pheno_scheduler_add_noise(s, x0, eps, ts, N, L, xt, N * L));
    OK(pheno_scheduler_get_velocity(s, x0, eps, ts, N, L, v, N * L));
    for (int i = 0; i < N * L; i++) {
        double a = abar[ts[i / L]];
        double back = sqrt(a) * xt[i] - sqrt(1.0 - a) * v[i];
        CHECK(fabs(back - x0[i]) < 1e-5, "v round trip [%d]: %g vs %g", i, back, x0[i]);
    }

    /* Timesteps: count query, then the copy; "leading" spacing. */
    size_t count = 99;
    OK(pheno_scheduler_timesteps(s, NULL, 0, &count));
    CHECK(count == 0, "timesteps before set_timesteps: %zu", count);
    float prev[L], x0_hat[L];
    FAILS(pheno_scheduler_step(s, v, 500, xt, NULL, L, prev, x0_hat), PHENO_ERR_INVALID_ARGUMENT,
          "set_timesteps");
    OK(pheno_scheduler_set_timesteps(s, 50));
    int64_t steps[50];
    OK(pheno_scheduler_timesteps(s, steps, 50, &count));
    CHECK(count == 50 && steps[0] == 980 && steps[1] == 960 && steps[49] == 0, "timesteps %zu %lld %lld",
          count, (long long)steps[0], (long long)steps[49]);

    /* DDIM eta 0 with the true v lands on add_noise(x0, ε, t − 20) and predicts x0. */
    OK(pheno_scheduler_step(s, v, 500, xt, NULL, L, prev, x0_hat));
    int64_t t480 = 480;
    float expect[L];
    OK(pheno_scheduler_add_noise(s, x0, eps, &t480, 1, L, expect, L));
    for (int i = 0; i < L; i++) {
        CHECK(fabs(x0_hat[i] - x0[i]) < 1e-5, "x0_hat[%d] %g vs %g", i, x0_hat[i], x0[i]);
        CHECK(fabs(prev[i] - expect[i]) < 1e-5, "prev[%d] %g vs %g", i, prev[i], expect[i]);
    }

    /* Guidance. */
    float g[L];
    OK(pheno_guidance(x0, eps, L, 7.5, g));
    for (int i = 0; i < L; i++) CHECK(fabs(g[i] - (x0[i] + 7.5f * (eps[i] - x0[i]))) < 1e-5, "guide[%d]", i);

    /* Bad input names the culprit. */
    int64_t bad_t[N] = {0, 1000};
    FAILS(pheno_scheduler_add_noise(s, x0, eps, bad_t, N, L, xt, N * L), PHENO_ERR_INVALID_ARGUMENT,
          "timesteps[1] is 1000");
    FAILS(pheno_scheduler_add_noise(s, x0, eps, ts, N, L, xt, N * L - 1), PHENO_ERR_SHAPE, "out_len");
    float nan_in[L] = {0, 0, NAN, 0, 0, 0};
    FAILS(pheno_scheduler_step(s, nan_in, 500, xt, NULL, L, prev, NULL), PHENO_ERR_NON_FINITE,
          "model_output[2]");
    FAILS(pheno_scheduler_set_timesteps(s, 1001), PHENO_ERR_INVALID_ARGUMENT, "1001");
    FAILS(pheno_scheduler_step(NULL, v, 500, xt, NULL, L, prev, NULL), PHENO_ERR_NULL_POINTER, "scheduler");
    pheno_scheduler_free(s);

    /* DDPM: seeded noise is reproducible; explicit noise adds √var·z. */
    PhenoSchedulerOptions d = pheno_scheduler_default_options();
    d.seed = 7;
    PhenoScheduler *a = NULL, *b = NULL;
    OK(pheno_scheduler_new(&d, &a));
    OK(pheno_scheduler_new(&d, &b));
    if (a == NULL || b == NULL) return 1;
    OK(pheno_scheduler_set_timesteps(a, T));
    OK(pheno_scheduler_set_timesteps(b, T));
    float pa[L], pb[L], z[L], p0[L], zero[L] = {0};
    OK(pheno_scheduler_step(a, v, 600, xt, NULL, L, pa, NULL));
    OK(pheno_scheduler_step(b, v, 600, xt, NULL, L, pb, NULL));
    CHECK(memcmp(pa, pb, sizeof pa) == 0, "same seed, different DDPM noise");
    OK(pheno_scheduler_noise(a, z, L));
    OK(pheno_scheduler_step(a, v, 600, xt, z, L, pa, NULL));
    OK(pheno_scheduler_step(a, v, 600, xt, zero, L, p0, NULL));
    double var = (1.0 - abar[599]) / (1.0 - abar[600]) * betas[600];
    for (int i = 0; i < L; i++)
        CHECK(fabs((pa[i] - p0[i]) - sqrt(var) * z[i]) < 1e-5, "DDPM noise [%d]", i);
    pheno_scheduler_free(a);
    pheno_scheduler_free(b);
    pheno_scheduler_free(NULL);

    o.schedule = (PhenoBetaSchedule)7;
    s = (PhenoScheduler *)&o;
    FAILS(pheno_scheduler_new(&o, &s), PHENO_ERR_INVALID_ARGUMENT, "opts->schedule is 7");
    CHECK(s == NULL, "failed new leaves NULL");

    printf("test_scheduler: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
