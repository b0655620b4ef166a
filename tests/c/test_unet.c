/*
 * C link test of the diffusion U-Net ABI (pheno_unet_*): compiled against include/phenocore.h,
 * linked with the cdylib, run plain and under valgrind by scripts/test-c.sh.
 *
 *   test_unet --fixtures tests/fixtures/unet --workdir DIR
 *
 * Forward on MONAI's fixture (tests/fixtures/unet/cond_weights.safetensors + cond_io.txt, made by
 * tests/fixtures/make_unet_c_fixture.py from MONAI 1.6 DiffusionModelUNet outputs) within 1e-4
 * relative; save / load round trip; config JSON round trip; confounders and null embeddings; every
 * bad input of issue 5 item 9 returns its status and a message naming the culprit.
 * Exit status 0 when every check passes.
 */
#include "phenocore.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* The fixture: cond.json (channels 4/8/12, cross-attention 6, 5 classes), batch 2 of 3 x 8 x 8. */
enum { N = 2, C = 3, H = 8, W = 8, CTX_LEN = 3, CTX_DIM = 6, SIZE = N * C * H * W };

static float x[SIZE], context[N * CTX_LEN * CTX_DIM], out[SIZE], out2[SIZE];
static double timesteps[N], expected[SIZE];
static int64_t labels[N];

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)len + 1);
    if (buf != NULL && fread(buf, 1, (size_t)len, f) == (size_t)len) {
        buf[len] = '\0';
    } else {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

/* One line "name count v0 v1 ..." of cond_io.txt into doubles. */
static int read_array(FILE *f, const char *name, double *dst, size_t count) {
    char got[64];
    size_t n = 0;
    if (fscanf(f, "%63s %zu", got, &n) != 2 || strcmp(got, name) != 0 || n != count) {
        fprintf(stderr, "cond_io.txt: expected %s with %zu values, got %s with %zu\n", name, count, got, n);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        if (fscanf(f, "%lf", &dst[i]) != 1) return 0;
    }
    return 1;
}

static int read_io(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/cond_io.txt", dir);
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "cannot open %s\n", path);
        return 0;
    }
    static double tmp[SIZE];
    int ok = read_array(f, "x", tmp, SIZE);
    for (int i = 0; ok && i < SIZE; i++) x[i] = (float)tmp[i];
    ok = ok && read_array(f, "timesteps", timesteps, N);
    ok = ok && read_array(f, "context", tmp, N * CTX_LEN * CTX_DIM);
    for (int i = 0; ok && i < N * CTX_LEN * CTX_DIM; i++) context[i] = (float)tmp[i];
    ok = ok && read_array(f, "class_labels", tmp, N);
    for (int i = 0; ok && i < N; i++) labels[i] = (int64_t)tmp[i];
    ok = ok && read_array(f, "out", expected, SIZE);
    fclose(f);
    return ok;
}

static double max_rel(const float *got, const double *want, size_t n) {
    double scale = 0, err = 0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(want[i]) > scale) scale = fabs(want[i]);
        double d = fabs((double)got[i] - want[i]);
        if (d > err || d != d) err = d != d ? INFINITY : d;
    }
    return err / (scale > 0 ? scale : 1);
}

static PhenoStatus fwd(const PhenoUNet *u, const float *xs, size_t c, size_t h, size_t w,
                       const uint8_t *null_flags, const int64_t *cls, float *dst, size_t dst_len) {
    return pheno_unet_forward(u, xs, N, c, h, w, timesteps, context, CTX_LEN, null_flags, cls, NULL, dst,
                              dst_len);
}

/* The cond.json text with `"num_class_embeds": 5` replaced by `value` (a JSON fragment). */
static char *with_classes(const char *config, const char *value) {
    const char *key = "\"num_class_embeds\": 5";
    const char *at = strstr(config, key);
    if (at == NULL) return NULL;
    size_t len = strlen(config) + strlen(value) + 64;
    char *s = malloc(len);
    if (s == NULL) return NULL;
    snprintf(s, len, "%.*s\"num_class_embeds\": %s%s", (int)(at - config), config, value, at + strlen(key));
    return s;
}

/* new() zero-initialises MONAI's output layers (the output is 0): save `*u`, add 0.2·sin(i) to
 * every stored float (the file is all f32 after its header), and load it back into `*u`. */
static void perturb(PhenoUNet **u, const char *config, const char *workdir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/unet_perturbed.safetensors", workdir);
    OK(pheno_unet_save(*u, path));
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    if (f == NULL) return;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)len);
    int ok = buf != NULL && fread(buf, 1, (size_t)len, f) == (size_t)len;
    fclose(f);
    uint64_t hlen = 0;
    for (int i = 7; ok && i >= 0; i--) hlen = hlen << 8 | buf[i];
    ok = ok && 8 + hlen <= (uint64_t)len && ((uint64_t)len - 8 - hlen) % 4 == 0;
    CHECK(ok, "safetensors layout of %s", path);
    if (ok) {
        size_t count = ((size_t)len - 8 - (size_t)hlen) / 4;
        for (size_t i = 0; i < count; i++) {
            float v;
            memcpy(&v, buf + 8 + hlen + 4 * i, 4);
            v += (float)(0.2 * sin((double)i));
            memcpy(buf + 8 + hlen + 4 * i, &v, 4);
        }
        f = fopen(path, "wb");
        ok = f != NULL && fwrite(buf, 1, (size_t)len, f) == (size_t)len;
        if (f != NULL) fclose(f);
        PhenoUNet *p = NULL;
        OK(pheno_unet_load(path, config, &p));
        if (p != NULL) {
            pheno_unet_free(*u);
            *u = p;
        }
    }
    free(buf);
    remove(path);
}

static void confounder_model(const char *workdir) {
    /* Two confounders, null embeddings: one model with, one without. */
    const char *with_null =
        "{\"in_channels\": 2, \"out_channels\": 2, \"channels\": [4, 8], \"attention_levels\": [false, true],"
        " \"num_res_blocks\": 1, \"num_head_channels\": 4, \"norm_num_groups\": 2, \"with_conditioning\": true,"
        " \"cross_attention_dim\": 3, \"confounders\": {\"source\": 3, \"batch\": 2}, \"null_embeddings\": true}";
    const char *without_null =
        "{\"in_channels\": 2, \"out_channels\": 2, \"channels\": [4, 8], \"attention_levels\": [false, true],"
        " \"num_res_blocks\": 1, \"num_head_channels\": 4, \"norm_num_groups\": 2, \"with_conditioning\": true,"
        " \"cross_attention_dim\": 3, \"confounders\": [[\"source\", 3], [\"batch\", 2]]}";
    PhenoUNet *u = NULL, *v = NULL;
    OK(pheno_unet_new(with_null, 7, &u));
    OK(pheno_unet_new(without_null, 7, &v));
    if (u == NULL || v == NULL) {
        pheno_unet_free(u);
        pheno_unet_free(v);
        return;
    }
    perturb(&u, with_null, workdir);
    perturb(&v, without_null, workdir);
    enum { M = 2 * 2 * 4 * 4 };
    float xs[M], ctx[2 * 1 * 3], a[M], b[M], c2[M];
    for (int i = 0; i < M; i++) xs[i] = (float)sin(0.37 * i);
    for (int i = 0; i < 6; i++) ctx[i] = (float)cos(0.9 * i);
    double ts[2] = {10.0, 500.5};
    int64_t conf[4] = {2, 1, 0, -1};
    OK(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, ctx, 1, NULL, NULL, conf, a, M));
    /* The confounder changes the output; the same index gives the same output. */
    int64_t conf2[4] = {1, 1, 0, -1};
    OK(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, ctx, 1, NULL, NULL, conf2, b, M));
    int differ0 = 0, same1 = 1;
    for (int i = 0; i < M / 2; i++) differ0 |= a[i] != b[i];
    for (int i = M / 2; i < M; i++) same1 &= a[i] == b[i];
    CHECK(differ0 && same1, "confounder index changes only its sample (differ %d, same %d)", differ0, same1);

    /* Guidance: with every sample's context null, the context's values do not matter. */
    uint8_t all_null[2] = {1, 1};
    float other_ctx[6] = {9, -9, 9, -9, 9, -9};
    OK(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, ctx, 1, all_null, NULL, conf, b, M));
    OK(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, other_ctx, 1, all_null, NULL, conf, c2, M));
    CHECK(memcmp(b, c2, sizeof b) == 0, "null context ignores the context");
    OK(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, NULL, 0, all_null, NULL, conf, c2, M));
    CHECK(memcmp(b, c2, sizeof b) == 0, "null context without a context");
    int differ = 0;
    for (int i = 0; i < M; i++) differ |= a[i] != b[i];
    CHECK(differ, "null context differs from the compound context");

    /* Confounder out of range, negative index, null without null embeddings, missing confounders. */
    int64_t too_big[4] = {0, 0, 3, 1};
    FAILS(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, ctx, 1, NULL, NULL, too_big, a, M), PHENO_ERR_INVALID_ARGUMENT,
          "\"source\" index 3 of sample 1 is out of range");
    int64_t batch_big[4] = {0, 2, 0, 0};
    FAILS(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, ctx, 1, NULL, NULL, batch_big, a, M), PHENO_ERR_INVALID_ARGUMENT,
          "\"batch\" index 2 of sample 0");
    int64_t negative[4] = {0, 0, -2, 0};
    FAILS(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, ctx, 1, NULL, NULL, negative, a, M), PHENO_ERR_INVALID_ARGUMENT,
          "confounders[2]");
    FAILS(pheno_unet_forward(v, xs, 2, 2, 4, 4, ts, ctx, 1, NULL, NULL, conf, a, M), PHENO_ERR_INVALID_ARGUMENT,
          "null embeddings");
    FAILS(pheno_unet_forward(v, xs, 2, 2, 4, 4, ts, ctx, 1, all_null, NULL, conf2, a, M), PHENO_ERR_INVALID_ARGUMENT,
          "null embeddings");
    FAILS(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, ctx, 1, NULL, NULL, NULL, a, M), PHENO_ERR_INVALID_ARGUMENT,
          "source, batch");
    /* NaN latents. */
    float bad = xs[5];
    xs[5] = NAN;
    FAILS(pheno_unet_forward(u, xs, 2, 2, 4, 4, ts, ctx, 1, NULL, NULL, conf, a, M), PHENO_ERR_NON_FINITE,
          "input value 5");
    xs[5] = bad;
    double bad_ts[2] = {1.0, NAN};
    FAILS(pheno_unet_forward(u, xs, 2, 2, 4, 4, bad_ts, ctx, 1, NULL, NULL, conf, a, M), PHENO_ERR_NON_FINITE,
          "timestep");
    /* Config text comes back with the confounders in order. */
    size_t need = 0;
    OK(pheno_unet_config_json(u, NULL, 0, &need));
    char *text = malloc(need);
    if (text != NULL) {
        FAILS(pheno_unet_config_json(u, text, need - 1, NULL), PHENO_ERR_SHAPE, "buf_len");
        OK(pheno_unet_config_json(u, text, need, NULL));
        CHECK(strlen(text) + 1 == need, "config length");
        CHECK(strstr(text, "[[\"source\",3],[\"batch\",2]]") != NULL, "confounders in order: %s", text);
        CHECK(strstr(text, "\"null_embeddings\":true") != NULL, "null_embeddings: %s", text);
        free(text);
    }
    pheno_unet_free(u);
    pheno_unet_free(v);
}

/* Diffusion training through the C ABI: steps on a synthetic batch whose latents depend on the
 * "source" confounder, a checkpoint resumed bit for bit, EMA / trained U-Net handles, sampling
 * (seeded, guided) and bad input. */
static void trainer_test(const char *workdir) {
    const char *cfg =
        "{\"in_channels\": 2, \"out_channels\": 2, \"channels\": [4, 8], \"attention_levels\": [false, true],"
        " \"num_res_blocks\": 1, \"num_head_channels\": 4, \"norm_num_groups\": 2,"
        " \"confounders\": {\"source\": 2}, \"null_embeddings\": true}";
    PhenoUNet *u = NULL;
    OK(pheno_unet_new(cfg, 1, &u));
    if (u == NULL) return;
    PhenoDiffusionTrainOptions o = pheno_diffusion_trainer_default_options();
    CHECK(o.struct_size == sizeof o && o.lr == 1e-4 && o.num_train_timesteps == 1000 && o.prediction_type == 1 &&
              o.cond_dropout == 0.1 && o.clip_grad_norm == 1.0,
          "training defaults");
    o.lr = 1e-2;
    o.seed = 5;
    PhenoDiffusionTrainer *t = NULL, *t2 = NULL;
    OK(pheno_diffusion_trainer_new(u, &o, &t));
    OK(pheno_diffusion_trainer_new(u, &o, &t2));
    if (t == NULL || t2 == NULL) {
        pheno_diffusion_trainer_free(t);
        pheno_diffusion_trainer_free(t2);
        pheno_unet_free(u);
        return;
    }
    enum { B = 4, M = B * 2 * 4 * 4 };
    float lat[M];
    int64_t src[B] = {0, 1, 0, 1};
    for (int i = 0; i < M; i++) {
        int b = i / (M / B);
        lat[i] = (src[b] ? 1.0f : -1.0f) + 0.1f * (float)sin(1.3 * i);
    }
    float loss[6], loss2[3];
    for (int k = 0; k < 3; k++) OK(pheno_diffusion_trainer_step(t, lat, B, 2, 4, 4, NULL, 0, NULL, NULL, src, &loss[k]));
    char ckpt[4096];
    snprintf(ckpt, sizeof ckpt, "%s/diffusion_ckpt.safetensors", workdir);
    OK(pheno_diffusion_trainer_save_checkpoint(t, ckpt));
    for (int k = 3; k < 6; k++) OK(pheno_diffusion_trainer_step(t, lat, B, 2, 4, 4, NULL, 0, NULL, NULL, src, &loss[k]));
    uint64_t steps = 0;
    OK(pheno_diffusion_trainer_steps(t, &steps));
    CHECK(steps == 6, "steps %llu", (unsigned long long)steps);
    int finite = 1;
    for (int k = 0; k < 6; k++) finite &= isfinite(loss[k]) && loss[k] > 0;
    CHECK(finite, "losses finite and positive");
    /* Resume in the second trainer: the next losses are the same bit for bit. */
    OK(pheno_diffusion_trainer_load_checkpoint(t2, ckpt));
    OK(pheno_diffusion_trainer_steps(t2, &steps));
    CHECK(steps == 3, "steps after resume %llu", (unsigned long long)steps);
    for (int k = 0; k < 3; k++) OK(pheno_diffusion_trainer_step(t2, lat, B, 2, 4, 4, NULL, 0, NULL, NULL, src, &loss2[k]));
    CHECK(memcmp(loss + 3, loss2, sizeof loss2) == 0, "resumed losses %g %g %g vs %g %g %g", loss2[0], loss2[1],
          loss2[2], loss[3], loss[4], loss[5]);
    remove(ckpt);

    /* Trained and EMA U-Nets; sampling is seeded, its shape checked, guidance allowed. */
    PhenoUNet *trained = NULL, *ema = NULL;
    OK(pheno_diffusion_trainer_unet(t, 0, &trained));
    OK(pheno_diffusion_trainer_unet(t, 1, &ema));
    PhenoDiffusionSampleOptions so = pheno_diffusion_sample_default_options();
    CHECK(so.struct_size == sizeof so && so.kind == 1 && so.steps == 50 && so.guidance_scale == 1.0, "sample defaults");
    so.steps = 4;
    so.guidance_scale = 2.0;
    so.seed = 9;
    float s1[M], s2[M], s3[M];
    if (trained != NULL && ema != NULL) {
        OK(pheno_diffusion_sample(trained, &so, B, 4, 4, NULL, 0, NULL, NULL, src, s1, M));
        OK(pheno_diffusion_sample(trained, &so, B, 4, 4, NULL, 0, NULL, NULL, src, s2, M));
        so.seed = 10;
        OK(pheno_diffusion_sample(trained, &so, B, 4, 4, NULL, 0, NULL, NULL, src, s3, M));
        CHECK(memcmp(s1, s2, sizeof s1) == 0 && memcmp(s1, s3, sizeof s1) != 0, "sampling is seeded");
        int fin = 1;
        for (int i = 0; i < M; i++) fin &= isfinite(s1[i]);
        CHECK(fin, "samples finite");
        OK(pheno_diffusion_sample(ema, NULL, 1, 4, 4, NULL, 0, NULL, NULL, src, s1, M / B));
        FAILS(pheno_diffusion_sample(trained, &so, B, 4, 4, NULL, 0, NULL, NULL, src, s1, M - 1), PHENO_ERR_SHAPE,
              "out holds");
        int64_t bad_src[B] = {0, 2, 0, 0};
        FAILS(pheno_diffusion_sample(trained, &so, B, 4, 4, NULL, 0, NULL, NULL, bad_src, s1, M),
              PHENO_ERR_INVALID_ARGUMENT, "\"source\" index 2");
        so.kind = 7;
        FAILS(pheno_diffusion_sample(trained, &so, B, 4, 4, NULL, 0, NULL, NULL, src, s1, M),
              PHENO_ERR_INVALID_ARGUMENT, "opts->kind");
    }
    pheno_unet_free(trained);
    pheno_unet_free(ema);

    /* Bad steps change nothing; bad options are named. */
    int64_t bad_src[B] = {0, 1, 5, 1};
    FAILS(pheno_diffusion_trainer_step(t, lat, B, 2, 4, 4, NULL, 0, NULL, NULL, bad_src, NULL),
          PHENO_ERR_INVALID_ARGUMENT, "\"source\" index 5 of sample 2");
    FAILS(pheno_diffusion_trainer_step(t, lat, B / 2, 4, 4, 4, NULL, 0, NULL, NULL, src, NULL), PHENO_ERR_SHAPE,
          "in_channels = 2");
    float keep = lat[3];
    lat[3] = NAN;
    FAILS(pheno_diffusion_trainer_step(t, lat, B, 2, 4, 4, NULL, 0, NULL, NULL, src, NULL), PHENO_ERR_NON_FINITE,
          "latent value 3 (sample 0) is NaN");
    lat[3] = keep;
    OK(pheno_diffusion_trainer_steps(t, &steps));
    CHECK(steps == 6, "failed steps are not counted (%llu)", (unsigned long long)steps);
    FAILS(pheno_diffusion_trainer_load_checkpoint(t, "/nonexistent/ckpt.safetensors"), PHENO_ERR_IO, "/nonexistent");
    PhenoDiffusionTrainOptions bad = pheno_diffusion_trainer_default_options();
    bad.cond_dropout = 1.5;
    PhenoDiffusionTrainer *none = NULL;
    FAILS(pheno_diffusion_trainer_new(u, &bad, &none), PHENO_ERR_INVALID_ARGUMENT, "cond_dropout");
    bad = pheno_diffusion_trainer_default_options();
    bad.schedule = 9;
    FAILS(pheno_diffusion_trainer_new(u, &bad, &none), PHENO_ERR_INVALID_ARGUMENT, "opts->schedule");
    FAILS(pheno_diffusion_trainer_new(NULL, NULL, &none), PHENO_ERR_NULL_POINTER, "unet");
    CHECK(none == NULL, "failed trainer_new leaves NULL");
    FAILS(pheno_diffusion_trainer_step(NULL, lat, B, 2, 4, 4, NULL, 0, NULL, NULL, src, NULL), PHENO_ERR_NULL_POINTER,
          "trainer");
    pheno_diffusion_trainer_free(NULL);
    pheno_diffusion_trainer_free(t);
    pheno_diffusion_trainer_free(t2);
    pheno_unet_free(u);
}

int main(int argc, char **argv) {
    const char *fixtures = "tests/fixtures/unet", *workdir = ".";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--fixtures") == 0) fixtures = argv[i + 1];
        if (strcmp(argv[i], "--workdir") == 0) workdir = argv[i + 1];
    }
    char path[4096], saved[4096];
    snprintf(path, sizeof path, "%s/cond.json", fixtures);
    char *config = read_text(path);
    CHECK(config != NULL, "cannot read %s", path);
    if (config == NULL || !read_io(fixtures)) return 1;
    snprintf(path, sizeof path, "%s/cond_weights.safetensors", fixtures);

    /* MONAI parity. */
    PhenoUNet *u = NULL;
    OK(pheno_unet_load(path, config, &u));
    if (u == NULL) return 1;
    OK(fwd(u, x, C, H, W, NULL, labels, out, SIZE));
    double err = max_rel(out, expected, SIZE);
    CHECK(err <= 1e-4, "forward vs MONAI: max relative error %g", err);
    printf("U-Net forward vs MONAI DiffusionModelUNet: max relative error %.3g\n", err);

    size_t count = 0, count2 = 0;
    OK(pheno_unet_num_parameters(u, &count));
    CHECK(count > 10000, "parameter count %zu", count);

    /* Save / load round trip gives the same output bit for bit. */
    snprintf(saved, sizeof saved, "%s/unet_roundtrip.safetensors", workdir);
    OK(pheno_unet_save(u, saved));
    PhenoUNet *r = NULL;
    OK(pheno_unet_load(saved, config, &r));
    if (r != NULL) {
        OK(fwd(r, x, C, H, W, NULL, labels, out2, SIZE));
        CHECK(memcmp(out, out2, sizeof out) == 0, "reloaded U-Net gives the same output");
        OK(pheno_unet_num_parameters(r, &count2));
        CHECK(count == count2, "parameter count after reload %zu vs %zu", count2, count);
        pheno_unet_free(r);
    }
    remove(saved);

    /* The config the handle reports builds a U-Net of the same size; new() is seeded. */
    size_t need = 0;
    OK(pheno_unet_config_json(u, NULL, 0, &need));
    char *text = need ? malloc(need) : NULL;
    if (text != NULL) {
        OK(pheno_unet_config_json(u, text, need, &need));
        PhenoUNet *a = NULL, *b = NULL;
        OK(pheno_unet_new(text, 3, &a));
        OK(pheno_unet_new(config, 3, &b));
        if (a != NULL && b != NULL) {
            OK(pheno_unet_num_parameters(a, &count2));
            CHECK(count2 == count, "new() from the reported config: %zu parameters vs %zu", count2, count);
            /* Same seed, same weights (compared as files: new() zeroes MONAI's output layers). */
            char pa[4096], pb[4096];
            snprintf(pa, sizeof pa, "%s/unet_seed_a.safetensors", workdir);
            snprintf(pb, sizeof pb, "%s/unet_seed_b.safetensors", workdir);
            OK(pheno_unet_save(a, pa));
            OK(pheno_unet_save(b, pb));
            FILE *f1 = fopen(pa, "rb"), *f2 = fopen(pb, "rb");
            int same = f1 != NULL && f2 != NULL, c1 = 0;
            size_t bytes = 0;
            while (same && (c1 = fgetc(f1)) != EOF) {
                same = c1 == fgetc(f2);
                bytes++;
            }
            same = same && fgetc(f2) == EOF;
            CHECK(same && bytes > 4 * count, "same seed, same weights (%zu bytes)", bytes);
            if (f1 != NULL) fclose(f1);
            if (f2 != NULL) fclose(f2);
            remove(pa);
            remove(pb);
        }
        pheno_unet_free(a);
        pheno_unet_free(b);
        free(text);
    }

    /* Bad input: wrong latent shape, labels out of range, guidance without null embeddings, NaN. */
    static float big[N * 4 * H * W];
    FAILS(fwd(u, big, 4, H, W, NULL, labels, out, SIZE), PHENO_ERR_SHAPE, "in_channels = 3");
    FAILS(fwd(u, x, C, 6, W, NULL, labels, out, N * C * 6 * W), PHENO_ERR_SHAPE, "multiples of 4");
    FAILS(fwd(u, x, C, H, W, NULL, labels, out, SIZE - 1), PHENO_ERR_SHAPE, "out holds");
    int64_t bad_labels[N] = {0, 5};
    FAILS(fwd(u, x, C, H, W, NULL, bad_labels, out, SIZE), PHENO_ERR_INVALID_ARGUMENT,
          "class label 5 of sample 1 is out of range");
    int64_t neg_labels[N] = {-1, 0};
    FAILS(fwd(u, x, C, H, W, NULL, neg_labels, out, SIZE), PHENO_ERR_INVALID_ARGUMENT, "class_labels[0]");
    FAILS(fwd(u, x, C, H, W, NULL, NULL, out, SIZE), PHENO_ERR_INVALID_ARGUMENT, "class_labels must be given");
    uint8_t flags[N] = {0, 1};
    FAILS(fwd(u, x, C, H, W, flags, labels, out, SIZE), PHENO_ERR_INVALID_ARGUMENT, "null embeddings");
    int64_t conf[N] = {0, 0};
    FAILS(pheno_unet_forward(u, x, N, C, H, W, timesteps, context, CTX_LEN, NULL, labels, conf, out, SIZE),
          PHENO_ERR_INVALID_ARGUMENT, "confounders given but the model has none");
    float keep = x[70];
    x[70] = NAN;
    FAILS(fwd(u, x, C, H, W, NULL, labels, out, SIZE), PHENO_ERR_NON_FINITE, "input value 70 (sample 0)");
    x[70] = INFINITY;
    FAILS(fwd(u, x, C, H, W, NULL, labels, out, SIZE), PHENO_ERR_NON_FINITE, "not finite");
    x[70] = keep;
    FAILS(pheno_unet_forward(u, x, N, C, H, W, timesteps, context, 0, NULL, labels, NULL, out, SIZE),
          PHENO_ERR_SHAPE, "context_len");
    FAILS(pheno_unet_forward(u, NULL, N, C, H, W, timesteps, context, CTX_LEN, NULL, labels, NULL, out, SIZE),
          PHENO_ERR_NULL_POINTER, "x is NULL");
    FAILS(pheno_unet_forward(u, x, N, C, H, W, NULL, context, CTX_LEN, NULL, labels, NULL, out, SIZE),
          PHENO_ERR_NULL_POINTER, "timesteps is NULL");
    FAILS(pheno_unet_forward(NULL, x, N, C, H, W, timesteps, context, CTX_LEN, NULL, labels, NULL, out, SIZE),
          PHENO_ERR_NULL_POINTER, "unet is NULL");
    FAILS(pheno_unet_num_parameters(u, NULL), PHENO_ERR_NULL_POINTER, "out_count");

    /* Weights for another config: the first mismatching key is named. */
    char *six = with_classes(config, "6");
    PhenoUNet *other = (PhenoUNet *)&count; /* must be reset to NULL on failure */
    if (six != NULL) {
        FAILS(pheno_unet_load(path, six, &other), PHENO_ERR_SHAPE, "\"class_embedding.weight\"");
        CHECK(other == NULL, "failed load leaves NULL");
        free(six);
    }
    char *none = with_classes(config, "null");
    if (none != NULL) {
        FAILS(pheno_unet_load(path, none, &other), PHENO_ERR_SHAPE, "class_embedding.weight");
        free(none);
    }
    FAILS(pheno_unet_load("/nonexistent/unet.safetensors", config, &other), PHENO_ERR_IO, "/nonexistent");
    FAILS(pheno_unet_load(path, NULL, &other), PHENO_ERR_NULL_POINTER, "config_json");
    FAILS(pheno_unet_new("{\"in_channels\": 1, \"out_channels\": 1, \"chanels\": [4]}", 0, &other),
          PHENO_ERR_INVALID_ARGUMENT, "chanels");
    FAILS(pheno_unet_new("{\"spatial_dims\": 3, \"in_channels\": 1, \"out_channels\": 1}", 0, &other),
          PHENO_ERR_UNSUPPORTED, "spatial_dims");
    FAILS(pheno_unet_new("{\"in_channels\": 1,", 0, &other), PHENO_ERR_FORMAT, "JSON");
    FAILS(pheno_unet_new(config, 0, NULL), PHENO_ERR_NULL_POINTER, "out_unet");
    pheno_unet_free(NULL);
    pheno_unet_free(u);

    confounder_model(workdir);
    trainer_test(workdir);
    free(config);

    printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
