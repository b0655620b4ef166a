// One DDPM / DDIM sampler step with classifier-free guidance, elementwise, in f64 like the CPU
// scheduler (diffusion::scheduler::Scheduler::step_into): with m the model output (guided:
// (1 − s)·uncond + s·cond),
//   x0 = p·m + q·x (clamped to ±clip when clip > 0),
//   x_prev = u·x0 + w·(eps ? r·m + s_x·x : x) + std·z.
// The coefficients are computed on the host in f64 for the step's timesteps.
#include "common.cuh"

struct StepCoef {
    double p, q, r, s_x, u, w, std, clip, guidance;
    int eps_term, guided, noisy, pad;
};

// x, x_prev, x0, z: n f32. y: the model output, n (unguided) or 2n f32 ([cond; uncond]).
KERNEL(sampler_step_f32, const float* __restrict__ x, const float* __restrict__ y,
       const float* __restrict__ z, float* __restrict__ x_prev, float* __restrict__ x0_out, u64 n,
       StepCoef c) {
    GRID_STRIDE_LOOP(i, n) {
        double m = (double)y[i];
        if (c.guided) {
            const double uncond = (double)y[n + i];
            // Rounded to f32, as the host's guide() stores it.
            m = (double)(float)((1.0 - c.guidance) * uncond + c.guidance * m);
        }
        const double xv = (double)x[i];
        double x0 = c.p * m + c.q * xv;
        if (c.clip > 0.0) x0 = fmin(fmax(x0, -c.clip), c.clip);
        const double second = c.eps_term ? c.r * m + c.s_x * xv : xv;
        double xp = c.u * x0 + c.w * second;
        if (c.noisy) xp += c.std * (double)z[i];
        x0_out[i] = (float)x0;
        x_prev[i] = (float)xp;
    }
}
