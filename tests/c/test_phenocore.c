/*
 * C link test of the phenocore ABI: compiled against include/phenocore.h, linked with the cdylib.
 *
 *   test_phenocore [--expected FILE] [--workdir DIR]
 *
 * --expected: features and logits written by the Rust API (tests/c_abi.rs) for the same model
 * and crops; the C results must match them. --workdir: where model files are written (default ".").
 * Exit status 0 when every check passes.
 */
#include "phenocore.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        checks++;                                                          \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
        }                                                                  \
    } while (0)

/* The call must succeed. */
#define OK(call)                                                                               \
    do {                                                                                       \
        PhenoStatus st_ = (call);                                                              \
        CHECK(st_ == PHENO_OK, "%s -> %d (%s): %s", #call, (int)st_, pheno_status_str(st_),     \
              pheno_last_error());                                                             \
    } while (0)

/* The call must fail with `want`, and pheno_last_error() must contain `needle`. */
#define FAILS(call, want, needle)                                                              \
    do {                                                                                       \
        PhenoStatus st_ = (call);                                                              \
        const char *msg_ = pheno_last_error();                                                 \
        CHECK(st_ == (want), "%s -> %d (%s), expected %d (%s); last error: %s", #call, (int)st_, \
              pheno_status_str(st_), (int)(want), pheno_status_str(want), msg_);               \
        CHECK(msg_ != NULL && msg_[0] != '\0', "%s: empty last error", #call);                 \
        CHECK(msg_ != NULL && strstr(msg_, (needle)) != NULL, "%s: last error %s lacks \"%s\"", \
              #call, msg_, (needle));                                                          \
    } while (0)

/* Shared with tests/c_abi.rs: model new(5, 10, SEED), symmetric padding, and crops whose value i
 * is ((i * 7919) % 1000) / 1000. */
enum { C = 5, CLASSES = 10, N = 3, HW = 36 };
static const uint64_t SEED = 42;
#define CROP_LEN ((size_t)N * C * HW * HW)
#define D6A 672
#define DTOP 1280

static void fill_crops(float *x, size_t len) {
    for (size_t i = 0; i < len; i++) x[i] = (float)((i * 7919u) % 1000u) / 1000.0f;
}

static int close_to(float a, float b) { return fabsf(a - b) <= 1e-5f + 1e-4f * fabsf(b); }

/* Largest |a - b| over len floats, and whether all are close. */
static int all_close(const float *a, const float *b, size_t len, double *max_diff) {
    int ok = 1;
    *max_diff = 0.0;
    for (size_t i = 0; i < len; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > *max_diff) *max_diff = d;
        if (!close_to(a[i], b[i])) ok = 0;
    }
    return ok;
}

static int bit_equal(const float *a, const float *b, size_t len) { return memcmp(a, b, len * sizeof(float)) == 0; }

static char workdir[4096] = ".";

static void path_in_workdir(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", workdir, name); }

/* ---------------------------------------------------------------- version, status, threads */

static void test_basics(void) {
    CHECK(pheno_version_number() == PHENO_VERSION_NUMBER, "library version %u, header %d", pheno_version_number(),
          PHENO_VERSION_NUMBER);
    CHECK(strcmp(pheno_status_str(PHENO_OK), "success") == 0, "status_str(OK) = %s", pheno_status_str(PHENO_OK));
    CHECK(strcmp(pheno_status_str(PHENO_ERR_CANCELLED), "cancelled by the progress callback") == 0, "cancelled text");
    CHECK(strcmp(pheno_status_str((PhenoStatus)99), "unknown status code") == 0, "out-of-range status");
    for (int s = 0; s <= 15; s++) CHECK(strcmp(pheno_status_str((PhenoStatus)s), "unknown status code") != 0, "code %d", s);
    OK(pheno_set_num_threads(2));
    FAILS(pheno_set_num_threads((size_t)1 << 40), PHENO_ERR_INVALID_ARGUMENT, "pheno_set_num_threads");
    pheno_effnet_free(NULL);
}

/* ---------------------------------------------------------------- crops */

static uint16_t pixel(size_t c, size_t y, size_t x) { return (uint16_t)(c * 1000 + y * 80 + x + 1); }

enum { IC = 5, IH = 64, IW = 80 };
static uint16_t field[IC * IH * IW];

static PhenoImage field_image(void) {
    for (size_t c = 0; c < IC; c++)
        for (size_t y = 0; y < IH; y++)
            for (size_t x = 0; x < IW; x++) field[(c * IH + y) * IW + x] = pixel(c, y, x);
    PhenoImage img = {field, PHENO_PIXEL_U16, IC, IH, IW};
    return img;
}

static void test_crops(void) {
    PhenoImage img = field_image();
    PhenoCropOptions co = pheno_crop_default_options();
    CHECK(co.struct_size == sizeof(PhenoCropOptions) && co.box_size == 128 &&
              co.normalization == PHENO_NORM_DEEPPROFILER_LEGACY,
          "crop defaults");
    co.box_size = 4;
    co.normalization = PHENO_NORM_NONE;
    /* (10.4, 9.6) rounds to (10, 10): box columns 8..11, rows 8..11. (0, 0): rows/cols -2..1. */
    const float centers[4] = {10.4f, 9.6f, 0.0f, 0.0f};
    float out[2 * IC * 16];
    OK(pheno_crop_cells(&img, centers, 2, &co, out, sizeof out / sizeof out[0]));
    int exact = 1;
    for (size_t c = 0; c < IC; c++)
        for (size_t r = 0; r < 4; r++)
            for (size_t q = 0; q < 4; q++)
                if (out[(c * 4 + r) * 4 + q] != (float)pixel(c, 8 + r, 8 + q)) exact = 0;
    CHECK(exact, "interior crop copies pixels (got %g, want %g)", out[0], (float)pixel(0, 8, 8));
    const float *corner = out + IC * 16;
    CHECK(corner[0] == 0.0f && corner[5] == 0.0f && corner[4 * 2 + 1] == 0.0f, "outside the image is 0");
    CHECK(corner[4 * 2 + 2] == (float)pixel(0, 0, 0) && corner[4 * 3 + 3] == (float)pixel(0, 1, 1),
          "corner crop pixels: %g %g", corner[10], corner[15]);

    /* Legacy normalisation: (x - min) / max over the box, zero padding included. */
    co.normalization = PHENO_NORM_DEEPPROFILER_LEGACY;
    float norm[2 * IC * 16];
    OK(pheno_crop_cells(&img, centers, 2, &co, norm, sizeof norm / sizeof norm[0]));
    float lo = (float)pixel(1, 8, 8), hi = (float)pixel(1, 11, 11);
    CHECK(close_to(norm[16 + 5], ((float)pixel(1, 9, 9) - lo) / hi), "legacy interior: %g", norm[16 + 5]);
    CHECK(close_to(norm[IC * 16 + 15], (float)pixel(0, 1, 1) / (float)pixel(0, 1, 1)) && norm[IC * 16] == 0.0f,
          "legacy corner (min is the zero padding)");
    co.normalization = PHENO_NORM_MINMAX;
    OK(pheno_crop_cells(&img, centers, 1, &co, norm, IC * 16));
    CHECK(close_to(norm[0], 0.0f) && close_to(norm[15], (hi - lo) / (hi - lo + 1e-6f)), "minmax: %g", norm[15]);

    /* u8 and f32 images take the same path. */
    uint8_t px8[2 * 3 * 3] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40, 50, 60, 70, 80, 90};
    PhenoImage img8 = {px8, PHENO_PIXEL_U8, 2, 3, 3};
    float c8[2 * 9];
    float mid[2] = {1.0f, 1.0f};
    PhenoCropOptions c3 = pheno_crop_default_options();
    c3.box_size = 3;
    c3.normalization = PHENO_NORM_NONE;
    OK(pheno_crop_cells(&img8, mid, 1, &c3, c8, 18));
    CHECK(c8[0] == 1.0f && c8[8] == 9.0f && c8[9] == 10.0f && c8[17] == 90.0f, "u8 crop");

    /* Bad inputs. */
    FAILS(pheno_crop_cells(NULL, centers, 1, &co, out, 80), PHENO_ERR_NULL_POINTER, "image");
    PhenoImage no_data = img;
    no_data.data = NULL;
    FAILS(pheno_crop_cells(&no_data, centers, 1, &co, out, 80), PHENO_ERR_NULL_POINTER, "image->data");
    PhenoImage bad_type = img;
    bad_type.pixel_type = (PhenoPixelType)9;
    FAILS(pheno_crop_cells(&bad_type, centers, 1, &co, out, 80), PHENO_ERR_INVALID_ARGUMENT, "pixel_type is 9");
    PhenoImage zero = img;
    zero.height = 0;
    FAILS(pheno_crop_cells(&zero, centers, 1, &co, out, 80), PHENO_ERR_SHAPE, "zero dimension");
    PhenoImage huge = img;
    huge.channels = huge.height = huge.width = SIZE_MAX / 2;
    FAILS(pheno_crop_cells(&huge, centers, 1, &co, out, 80), PHENO_ERR_SHAPE, "overflow");
    FAILS(pheno_crop_cells(&img, NULL, 1, &co, out, 80), PHENO_ERR_NULL_POINTER, "centers");
    FAILS(pheno_crop_cells(&img, centers, 1, &co, NULL, 80), PHENO_ERR_NULL_POINTER, "out");
    FAILS(pheno_crop_cells(&img, centers, 2, &co, out, 2 * IC * 16 - 1), PHENO_ERR_SHAPE, "out_len is 159");
    FAILS(pheno_crop_cells(&img, centers, SIZE_MAX / 4, &co, out, 80), PHENO_ERR_SHAPE, "overflow");
    const float nan_center[2] = {NAN, 3.0f};
    FAILS(pheno_crop_cells(&img, nan_center, 1, &co, out, 80), PHENO_ERR_INVALID_ARGUMENT, "centers[0]");
    float fpx[2 * 2 * 2] = {0, 1, 2, 3, 4, NAN, 6, 7};
    PhenoImage fimg = {fpx, PHENO_PIXEL_F32, 2, 2, 2};
    FAILS(pheno_crop_cells(&fimg, centers, 1, &co, out, 80), PHENO_ERR_NON_FINITE, "channel 1");
    PhenoCropOptions bad = co;
    bad.box_size = 0;
    FAILS(pheno_crop_cells(&img, centers, 1, &bad, out, 80), PHENO_ERR_INVALID_ARGUMENT, "box size 0");
    bad = co;
    bad.struct_size = 0;
    FAILS(pheno_crop_cells(&img, centers, 1, &bad, out, 80), PHENO_ERR_INVALID_ARGUMENT, "struct_size");
    bad.struct_size = sizeof(PhenoCropOptions) + 8;
    FAILS(pheno_crop_cells(&img, centers, 1, &bad, out, 80), PHENO_ERR_INVALID_ARGUMENT, "struct_size");
    bad = co;
    bad.normalization = (PhenoNormalization)5;
    FAILS(pheno_crop_cells(&img, centers, 1, &bad, out, 80), PHENO_ERR_INVALID_ARGUMENT, "normalization is 5");

    /* An older caller whose struct ends before `normalization` gets the default (legacy). */
    PhenoCropOptions old = pheno_crop_default_options();
    old.box_size = 4;
    old.normalization = PHENO_NORM_NONE;
    old.struct_size = offsetof(PhenoCropOptions, normalization);
    float legacy[IC * 16];
    OK(pheno_crop_cells(&img, centers, 1, &old, legacy, IC * 16));
    CHECK(close_to(legacy[16 + 5], ((float)pixel(1, 9, 9) - lo) / hi) && legacy[16 + 5] < 1.0f,
          "prefix struct reads the default normalisation: %g", legacy[16 + 5]);

    /* Zero cells: valid, nothing written, NULL centres and output allowed. */
    out[0] = -7.0f;
    OK(pheno_crop_cells(&img, NULL, 0, &co, NULL, 0));
    OK(pheno_crop_cells(&img, centers, 0, NULL, out, 0));
    CHECK(out[0] == -7.0f, "n == 0 wrote into out");
}

/* ---------------------------------------------------------------- model */

typedef struct {
    size_t calls, last_done, last_total, cancel_after;
} Progress;

static int32_t on_progress(size_t done, size_t total, void *user) {
    Progress *p = (Progress *)user;
    p->calls++;
    p->last_done = done;
    p->last_total = total;
    return p->calls >= p->cancel_after ? 1 : 0;
}

static const char *const LAYERS[2] = {"block6a_activation", "top_activation"};

static void features_of(const PhenoModel *m, const float *crops, size_t n, float *f6a, float *ftop,
                        const PhenoFeatureOptions *opts) {
    float *outs[2] = {f6a, ftop};
    size_t lens[2] = {n * D6A, n * DTOP};
    OK(pheno_effnet_features(m, crops, n, C, HW, HW, LAYERS, 2, opts, outs, lens));
}

/* Expected numbers from the Rust API: lines "name count" followed by `count` floats. */
static float *read_expected(FILE *f, const char *name, size_t count) {
    char got[64];
    size_t len = 0;
    if (fscanf(f, "%63s %zu", got, &len) != 2 || strcmp(got, name) != 0 || len != count) {
        CHECK(0, "expected file: wanted section %s with %zu values, got %s %zu", name, count, got, len);
        return NULL;
    }
    float *v = malloc(count * sizeof(float));
    for (size_t i = 0; i < count; i++) {
        if (fscanf(f, "%f", &v[i]) != 1) {
            CHECK(0, "expected file: section %s ends at value %zu", name, i);
            free(v);
            return NULL;
        }
    }
    return v;
}

static void compare_with_rust(const char *path, const float *f6a, const float *ftop, const float *logits) {
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "cannot open expected file %s", path);
    if (!f) return;
    const float *mine[3] = {f6a, ftop, logits};
    const char *names[3] = {"block6a_activation", "top_activation", "logits"};
    size_t counts[3] = {N * D6A, N * DTOP, N * CLASSES};
    for (int k = 0; k < 3; k++) {
        float *want = read_expected(f, names[k], counts[k]);
        if (!want) break;
        double md;
        int ok = all_close(mine[k], want, counts[k], &md);
        CHECK(ok, "%s differs from the Rust API: max |diff| %g", names[k], md);
        double norm = 0;
        for (size_t i = 0; i < counts[k]; i++) norm += fabs(want[i]);
        CHECK(norm > 0, "%s: the Rust features are all zero", names[k]);
        printf("  %s: C ABI vs Rust API max |diff| = %g over %zu values\n", names[k], md, counts[k]);
        free(want);
    }
    fclose(f);
}

typedef struct {
    const PhenoModel *model;
    const float *crops;
    float f6a[N * D6A], ftop[N * DTOP];
    PhenoStatus status;
    char bad_msg[256];
} Worker;

static void *worker_main(void *arg) {
    Worker *w = (Worker *)arg;
    float *outs[2] = {w->f6a, w->ftop};
    size_t lens[2] = {N * D6A, N * DTOP};
    w->status = pheno_effnet_features(w->model, w->crops, N, C, HW, HW, LAYERS, 2, NULL, outs, lens);
    /* Each thread has its own last error. */
    size_t short_len[2] = {1, 1};
    pheno_effnet_features(w->model, w->crops, N, C, HW, HW, LAYERS, 2, NULL, outs, short_len);
    snprintf(w->bad_msg, sizeof w->bad_msg, "%s", pheno_last_error());
    return NULL;
}

static void test_model(const char *expected_path) {
    PhenoModel *m = NULL, *loaded = NULL;
    PhenoEffnetOptions eo = pheno_effnet_default_options();
    CHECK(eo.struct_size == sizeof eo && eo.padding == PHENO_PADDING_SYMMETRIC && eo.bn_eps == 1e-5f &&
              eo.device == -1,
          "effnet defaults");
    OK(pheno_effnet_new(C, CLASSES, SEED, NULL, &m));
    CHECK(m != NULL, "new gave NULL");
    if (!m) return;

    size_t cin = 0, classes = 0, dim = 0;
    OK(pheno_effnet_info(m, &cin, &classes));
    CHECK(cin == C && classes == CLASSES, "info: %zu %zu", cin, classes);
    OK(pheno_effnet_layer_dim(m, "block6a_activation", &dim));
    CHECK(dim == D6A, "block6a dim %zu", dim);
    OK(pheno_effnet_layer_dim(m, "features.6.0.block.1", &dim));
    CHECK(dim == D6A, "torchvision path dim %zu", dim);
    OK(pheno_effnet_layer_dim(m, "top_activation", &dim));
    CHECK(dim == DTOP, "top dim %zu", dim);
    OK(pheno_effnet_layer_dim(m, "logits", &dim));
    CHECK(dim == CLASSES, "logits dim %zu", dim);
    FAILS(pheno_effnet_layer_dim(m, "block9z_activation", &dim), PHENO_ERR_UNKNOWN_LAYER, "block9z_activation");
    FAILS(pheno_effnet_layer_dim(m, NULL, &dim), PHENO_ERR_NULL_POINTER, "layer");
    FAILS(pheno_effnet_layer_dim(m, "top_activation", NULL), PHENO_ERR_NULL_POINTER, "out_dim");
    FAILS(pheno_effnet_info(NULL, &cin, &classes), PHENO_ERR_NULL_POINTER, "model");
    FAILS(pheno_effnet_info(m, NULL, &classes), PHENO_ERR_NULL_POINTER, "out_in_channels");

    /* Save, load from file and from memory. */
    char path[4200];
    path_in_workdir(path, sizeof path, "phenocore_c_test.safetensors");
    OK(pheno_effnet_save(m, path));
    OK(pheno_effnet_load(path, NULL, &loaded));
    CHECK(loaded != NULL, "load gave NULL");
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "saved file missing");
    uint8_t *bytes = NULL;
    long nbytes = 0;
    if (f) {
        fseek(f, 0, SEEK_END);
        nbytes = ftell(f);
        fseek(f, 0, SEEK_SET);
        bytes = malloc((size_t)nbytes);
        CHECK(fread(bytes, 1, (size_t)nbytes, f) == (size_t)nbytes, "read back");
        fclose(f);
    }
    PhenoModel *from_mem = NULL;
    OK(pheno_effnet_load_from_memory(bytes, (size_t)nbytes, &eo, &from_mem));

    float *crops = malloc(CROP_LEN * sizeof(float));
    fill_crops(crops, CROP_LEN);
    static float a6[N * D6A], atop[N * DTOP], b6[N * D6A], btop[N * DTOP], c6[N * D6A], ctop[N * DTOP];
    features_of(m, crops, N, a6, atop, NULL);
    if (loaded) features_of(loaded, crops, N, b6, btop, NULL);
    if (from_mem) features_of(from_mem, crops, N, c6, ctop, NULL);
    CHECK(bit_equal(a6, b6, N * D6A) && bit_equal(atop, btop, N * DTOP), "loaded model gives other features");
    CHECK(bit_equal(a6, c6, N * D6A) && bit_equal(atop, ctop, N * DTOP), "model from memory gives other features");
    int varies = 0;
    for (size_t i = 1; i < D6A; i++) varies |= a6[i] != a6[0];
    CHECK(varies, "block6a features are constant");
    CHECK(a6[0] != a6[D6A], "cells 0 and 1 have identical features");

    float logits[N * CLASSES];
    OK(pheno_effnet_logits(m, crops, N, C, HW, HW, logits, N * CLASSES));
    if (expected_path) compare_with_rust(expected_path, a6, atop, logits);

    /* Batches: results do not depend on the batch size; progress counts cells over batches. */
    PhenoFeatureOptions fo = pheno_feature_default_options();
    CHECK(fo.struct_size == sizeof fo && fo.batch_size == 64 && fo.progress == NULL, "feature defaults");
    Progress prog = {0, 0, 0, 1000};
    fo.batch_size = 2;
    fo.progress = on_progress;
    fo.user_data = &prog;
    features_of(m, crops, N, b6, btop, &fo);
    double md;
    CHECK(all_close(a6, b6, N * D6A, &md) && all_close(atop, btop, N * DTOP, &md), "batch 2 differs: %g", md);
    CHECK(prog.calls == 2 && prog.last_done == N && prog.last_total == N, "progress: %zu calls, last %zu/%zu",
          prog.calls, prog.last_done, prog.last_total);

    /* Cancel from the callback. */
    Progress cancel = {0, 0, 0, 1};
    fo.user_data = &cancel;
    {
        float *outs[2] = {b6, btop};
        size_t lens[2] = {N * D6A, N * DTOP};
        FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, &fo, outs, lens), PHENO_ERR_CANCELLED,
              "cancelled");
        CHECK(cancel.calls == 1 && cancel.last_done == 2, "cancel: %zu calls, done %zu", cancel.calls,
              cancel.last_done);
    }

    /* Field image -> features equals crop + features. */
    PhenoImage img = field_image();
    PhenoCropOptions co = pheno_crop_default_options();
    co.box_size = HW;
    const float centers[2 * N] = {20.0f, 18.0f, 60.5f, 40.2f, 3.0f, 62.0f};
    float *cropped = malloc(CROP_LEN * sizeof(float));
    OK(pheno_crop_cells(&img, centers, N, &co, cropped, CROP_LEN));
    features_of(m, cropped, N, b6, btop, NULL);
    {
        float *outs[2] = {c6, ctop};
        size_t lens[2] = {N * D6A, N * DTOP};
        Progress p2 = {0, 0, 0, 1000};
        fo.user_data = &p2;
        OK(pheno_effnet_features_from_image(m, &img, centers, N, &co, LAYERS, 2, &fo, outs, lens));
        CHECK(all_close(b6, c6, N * D6A, &md) && all_close(btop, ctop, N * DTOP, &md),
              "features_from_image differs from crop + features: %g", md);
        CHECK(p2.calls == 2 && p2.last_done == N, "from_image progress: %zu calls", p2.calls);
        Progress p3 = {0, 0, 0, 1};
        fo.user_data = &p3;
        FAILS(pheno_effnet_features_from_image(m, &img, centers, N, &co, LAYERS, 2, &fo, outs, lens),
              PHENO_ERR_CANCELLED, "cancelled");
        size_t short_lens[2] = {N * D6A - 1, N * DTOP};
        FAILS(pheno_effnet_features_from_image(m, &img, centers, N, &co, LAYERS, 2, NULL, outs, short_lens),
              PHENO_ERR_SHAPE, "out_lens[0]");
        const float far[2] = {NAN, 1.0f};
        FAILS(pheno_effnet_features_from_image(m, &img, far, 1, &co, LAYERS, 2, NULL, outs, lens),
              PHENO_ERR_INVALID_ARGUMENT, "centers[0]");
        PhenoImage four = img;
        four.channels = 4;
        FAILS(pheno_effnet_features_from_image(m, &four, centers, N, &co, LAYERS, 2, NULL, outs, lens),
              PHENO_ERR_SHAPE, "4 channels");
        FAILS(pheno_effnet_features_from_image(NULL, &img, centers, N, &co, LAYERS, 2, NULL, outs, lens),
              PHENO_ERR_NULL_POINTER, "model");
        c6[0] = -7.0f;
        OK(pheno_effnet_features_from_image(m, &img, NULL, 0, &co, LAYERS, 2, NULL, outs, lens));
        CHECK(c6[0] == -7.0f, "n == 0 wrote features");
    }

    /* Concurrent calls on one model from two threads give the single-threaded result. */
    {
        static Worker w[2];
        pthread_t t[2];
        for (int k = 0; k < 2; k++) {
            w[k].model = m;
            w[k].crops = crops;
            CHECK(pthread_create(&t[k], NULL, worker_main, &w[k]) == 0, "pthread_create");
        }
        for (int k = 0; k < 2; k++) {
            pthread_join(t[k], NULL);
            CHECK(w[k].status == PHENO_OK, "thread %d: status %d", k, (int)w[k].status);
            CHECK(all_close(w[k].f6a, a6, N * D6A, &md) && all_close(w[k].ftop, atop, N * DTOP, &md),
                  "thread %d features differ: %g", k, md);
            CHECK(strstr(w[k].bad_msg, "out_lens[0]") != NULL, "thread %d last error: %s", k, w[k].bad_msg);
        }
    }

    /* Bad inputs. */
    float *outs[2] = {b6, btop};
    size_t lens[2] = {N * D6A, N * DTOP};
    FAILS(pheno_effnet_features(NULL, crops, N, C, HW, HW, LAYERS, 2, NULL, outs, lens), PHENO_ERR_NULL_POINTER,
          "model");
    FAILS(pheno_effnet_features(m, NULL, N, C, HW, HW, LAYERS, 2, NULL, outs, lens), PHENO_ERR_NULL_POINTER,
          "crops");
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, NULL, 2, NULL, outs, lens), PHENO_ERR_NULL_POINTER,
          "layers");
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, NULL, NULL, lens), PHENO_ERR_NULL_POINTER,
          "out");
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, NULL, outs, NULL), PHENO_ERR_NULL_POINTER,
          "out_lens");
    float *null_out[2] = {b6, NULL};
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, NULL, null_out, lens), PHENO_ERR_NULL_POINTER,
          "out[1]");
    const char *null_layer[2] = {"block6a_activation", NULL};
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, null_layer, 2, NULL, outs, lens), PHENO_ERR_NULL_POINTER,
          "layers[1]");
    size_t short_lens[2] = {N * D6A, N * DTOP - 1};
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, NULL, outs, short_lens), PHENO_ERR_SHAPE,
          "out_lens[1]");
    const char *unknown[1] = {"block6a_activatoin"};
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, unknown, 1, NULL, outs, lens), PHENO_ERR_UNKNOWN_LAYER,
          "block6a_activatoin");
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 0, NULL, outs, lens), PHENO_ERR_INVALID_ARGUMENT,
          "n_layers");
    FAILS(pheno_effnet_features(m, crops, 1, 4, HW, HW * C / 4, LAYERS, 2, NULL, outs, lens), PHENO_ERR_SHAPE,
          "4 channels");
    FAILS(pheno_effnet_features(m, crops, SIZE_MAX / 2, C, HW, HW, LAYERS, 2, NULL, outs, lens), PHENO_ERR_SHAPE,
          "overflow");
    FAILS(pheno_effnet_features(m, crops, 1, C, SIZE_MAX / 8, SIZE_MAX / 8, LAYERS, 2, NULL, outs, lens),
          PHENO_ERR_SHAPE, "overflow");
    crops[C * HW * HW + 17] = NAN;
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, NULL, outs, lens), PHENO_ERR_NON_FINITE,
          "cell 1");
    crops[C * HW * HW + 17] = INFINITY;
    FAILS(pheno_effnet_logits(m, crops, N, C, HW, HW, logits, N * CLASSES), PHENO_ERR_NON_FINITE, "inf");
    for (size_t i = 0; i < CROP_LEN; i++) crops[i] = 3.4e38f;
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, NULL, outs, lens), PHENO_ERR_NON_FINITE,
          "overflow float32");
    fill_crops(crops, CROP_LEN);
    FAILS(pheno_effnet_logits(m, crops, N, C, HW, HW, logits, N * CLASSES - 1), PHENO_ERR_SHAPE, "out_len");
    FAILS(pheno_effnet_logits(m, crops, N, C, HW, HW, NULL, N * CLASSES), PHENO_ERR_NULL_POINTER, "out");
    PhenoFeatureOptions bad_fo = pheno_feature_default_options();
    bad_fo.struct_size = sizeof bad_fo + 8;
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, &bad_fo, outs, lens),
          PHENO_ERR_INVALID_ARGUMENT, "struct_size");
    bad_fo.struct_size = 0;
    FAILS(pheno_effnet_features(m, crops, N, C, HW, HW, LAYERS, 2, &bad_fo, outs, lens),
          PHENO_ERR_INVALID_ARGUMENT, "pheno_feature_default_options");

    /* Zero cells: valid, nothing written, NULL crops allowed. */
    b6[0] = -7.0f;
    OK(pheno_effnet_features(m, NULL, 0, C, HW, HW, LAYERS, 2, NULL, outs, lens));
    CHECK(b6[0] == -7.0f, "n == 0 wrote features");
    OK(pheno_effnet_logits(m, NULL, 0, C, HW, HW, NULL, 0));

    /* Model creation and loading failures leave *out_model NULL. */
    PhenoModel *bad = (PhenoModel *)(uintptr_t)0x1;
    FAILS(pheno_effnet_new(0, CLASSES, SEED, NULL, &bad), PHENO_ERR_INVALID_ARGUMENT, "in_channels");
    CHECK(bad == NULL, "failed new left a handle");
    FAILS(pheno_effnet_new(C, 0, SEED, NULL, &bad), PHENO_ERR_INVALID_ARGUMENT, "num_classes");
    FAILS(pheno_effnet_new(C, CLASSES, SEED, NULL, NULL), PHENO_ERR_NULL_POINTER, "out_model");
    PhenoEffnetOptions bad_eo = pheno_effnet_default_options();
    bad_eo.struct_size = sizeof bad_eo + 4;
    FAILS(pheno_effnet_new(C, CLASSES, SEED, &bad_eo, &bad), PHENO_ERR_INVALID_ARGUMENT, "struct_size");
    bad_eo.struct_size = 0;
    FAILS(pheno_effnet_new(C, CLASSES, SEED, &bad_eo, &bad), PHENO_ERR_INVALID_ARGUMENT, "struct_size is 0");
    bad_eo = pheno_effnet_default_options();
    bad_eo.device = 0;
    FAILS(pheno_effnet_new(C, CLASSES, SEED, &bad_eo, &bad), PHENO_ERR_UNSUPPORTED, "CUDA");
    bad_eo = pheno_effnet_default_options();
    bad_eo.padding = (PhenoPadding)7;
    FAILS(pheno_effnet_new(C, CLASSES, SEED, &bad_eo, &bad), PHENO_ERR_INVALID_ARGUMENT, "padding is 7");
    bad_eo = pheno_effnet_default_options();
    bad_eo.bn_eps = NAN;
    FAILS(pheno_effnet_load(path, &bad_eo, &bad), PHENO_ERR_INVALID_ARGUMENT, "bn_eps");
    FAILS(pheno_effnet_load(NULL, NULL, &bad), PHENO_ERR_NULL_POINTER, "path");
    char missing[4300];
    path_in_workdir(missing, sizeof missing, "no_such_dir/none.safetensors");
    FAILS(pheno_effnet_load(missing, NULL, &bad), PHENO_ERR_IO, "none.safetensors");
    CHECK(bad == NULL, "failed load left a handle");
    FAILS(pheno_effnet_save(m, missing), PHENO_ERR_IO, "no_such_dir");
    FAILS(pheno_effnet_save(NULL, path), PHENO_ERR_NULL_POINTER, "model");
    const uint8_t garbage[16] = {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 'g', 'a', 'r', 'b', 'a', 'g', 'e', '!'};
    FAILS(pheno_effnet_load_from_memory(garbage, sizeof garbage, NULL, &bad), PHENO_ERR_FORMAT, "safetensors");
    FAILS(pheno_effnet_load_from_memory(NULL, 10, NULL, &bad), PHENO_ERR_NULL_POINTER, "bytes");
    if (bytes) {
        /* A truncated file. */
        FAILS(pheno_effnet_load_from_memory(bytes, (size_t)nbytes / 2, NULL, &bad), PHENO_ERR_FORMAT, "safetensors");
    }
    CHECK(bad == NULL, "failed load_from_memory left a handle");

    free(cropped);
    free(crops);
    free(bytes);
    remove(path);
    pheno_effnet_free(from_mem);
    pheno_effnet_free(loaded);
    pheno_effnet_free(m);
}


/* ---- profile math: aggregate -> sphere -> mAP, each checked against a computation done here ---- */

#define PC_PLATES 3
#define PC_WELLS 4   /* per plate: DMSO, DMSO, T1, T2 */
#define PC_SITES 2
#define PC_CELLS 3   /* per site */
#define PC_D 3
#define PC_N (PC_PLATES * PC_WELLS * PC_SITES * PC_CELLS)
#define PC_NW (PC_PLATES * PC_WELLS)

static double cell_value(size_t p, size_t w, size_t s, size_t c, size_t j) {
    /* Deterministic, irregular values; treatments shift features 0 / 1. */
    double v = sin(1.7 * (double)(p * 97 + w * 31 + s * 7 + c * 3 + j) + 0.3 * (double)j);
    if (w == 2) v += j == 0 ? 2.0 : 0.0;
    if (w == 3) v += j == 1 ? 2.0 : 0.0;
    return v + 0.25 * (double)p;
}

static double median3(double a, double b, double c) {
    double lo = a < b ? a : b, hi = a < b ? b : a;
    return c < lo ? lo : (c > hi ? hi : c);
}

static void test_profile_chain(void) {
    static float x[PC_N * PC_D];
    static char names[4][PC_N][16];
    static const char *values[4 * PC_N];
    const char *meta_names[4] = {"Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Treatment"};
    size_t r = 0;
    for (size_t p = 0; p < PC_PLATES; p++)
        for (size_t w = 0; w < PC_WELLS; w++)
            for (size_t s = 0; s < PC_SITES; s++)
                for (size_t c = 0; c < PC_CELLS; c++, r++) {
                    for (size_t j = 0; j < PC_D; j++) x[r * PC_D + j] = (float)cell_value(p, w, s, c, j);
                    snprintf(names[0][r], 16, "P%zu", p);
                    snprintf(names[1][r], 16, "W%zu", w);
                    snprintf(names[2][r], 16, "%zu", s);
                    snprintf(names[3][r], 16, "%s", w < 2 ? "DMSO" : (w == 2 ? "T1" : "T2"));
                    for (size_t m = 0; m < 4; m++) values[m * PC_N + r] = names[m][r];
                }

    PhenoAggregateOptions ao = pheno_aggregate_default_options();
    ao.level = PHENO_LEVEL_WELL;
    ao.counts = 0;
    PhenoProfiles *wells = NULL;
    PhenoStatus st = pheno_aggregate(x, PC_N, PC_D, NULL, meta_names, 4, values, &ao, &wells);
    CHECK(st == PHENO_OK && wells != NULL, "pheno_aggregate: %d %s", st, pheno_last_error());
    if (!wells) return;
    size_t nr = 0, nf = 0, nm = 0;
    CHECK(pheno_profiles_info(wells, &nr, &nf, &nm) == PHENO_OK && nr == PC_NW && nf == PC_D,
          "wells: %zu x %zu", nr, nf);
    static double wd[PC_NW * PC_D];
    CHECK(pheno_profiles_data(wells, wd, PC_NW * PC_D) == PHENO_OK, "profiles data: %s", pheno_last_error());
    /* Site median of the float cells, then well mean of the sites (groups come sorted by key). */
    double max_diff = 0;
    for (size_t p = 0; p < PC_PLATES; p++)
        for (size_t w = 0; w < PC_WELLS; w++)
            for (size_t j = 0; j < PC_D; j++) {
                double acc = 0;
                for (size_t s = 0; s < PC_SITES; s++) {
                    double v[PC_CELLS];
                    for (size_t c = 0; c < PC_CELLS; c++) v[c] = (double)(float)cell_value(p, w, s, c, j);
                    acc += median3(v[0], v[1], v[2]);
                }
                double want = acc / PC_SITES, got = wd[(p * PC_WELLS + w) * PC_D + j];
                if (fabs(got - want) > max_diff) max_diff = fabs(got - want);
            }
    CHECK(max_diff <= 1e-12, "aggregate vs C reference: max diff %g", max_diff);
    size_t needed = 0;
    char buf[32];
    CHECK(pheno_profiles_meta_index(wells, "Metadata_Treatment", &nm) == PHENO_OK, "meta index: %s", pheno_last_error());
    CHECK(pheno_profiles_meta_value(wells, nm, 2, buf, sizeof buf, &needed) == PHENO_OK && strcmp(buf, "T1") == 0,
          "treatment of well 2: %s", buf);
    pheno_profiles_free(wells);

    /* Sphering with lambda = 0 on the 6 DMSO wells (6 > 3 features): whitened controls have
       identity covariance (divisor n) and zero mean. */
    static double ctrl[6 * PC_D], white[6 * PC_D], all_white[PC_NW * PC_D];
    size_t k = 0;
    for (size_t i = 0; i < PC_NW; i++)
        if (i % PC_WELLS < 2) memcpy(&ctrl[PC_D * k++], &wd[i * PC_D], PC_D * sizeof(double));
    PhenoSphereOptions so = pheno_sphere_default_options();
    so.lambda = 0.0;
    PhenoSphering *sph = NULL;
    st = pheno_sphering_fit(ctrl, 6, PC_D, NULL, &so, &sph);
    CHECK(st == PHENO_OK && sph, "sphering fit: %d %s", st, pheno_last_error());
    if (!sph) return;
    CHECK(pheno_sphering_transform(sph, ctrl, 6, PC_D, NULL, white, 6 * PC_D) == PHENO_OK, "transform: %s", pheno_last_error());
    double worst = 0;
    for (size_t a = 0; a < PC_D; a++)
        for (size_t b = 0; b < PC_D; b++) {
            double ma = 0, mb = 0, cov = 0;
            for (size_t i = 0; i < 6; i++) ma += white[i * PC_D + a] / 6, mb += white[i * PC_D + b] / 6;
            for (size_t i = 0; i < 6; i++) cov += (white[i * PC_D + a] - ma) * (white[i * PC_D + b] - mb) / 6;
            double e = fabs(cov - (a == b ? 1.0 : 0.0));
            if (e > worst) worst = e;
            if (fabs(ma) > worst) worst = fabs(ma);
        }
    CHECK(worst < 1e-9, "whitened controls: |cov - I|, |mean| up to %g", worst);
    CHECK(pheno_sphering_transform(sph, wd, PC_NW, PC_D, NULL, all_white, 3) == PHENO_ERR_SHAPE,
          "short output buffer must be a shape error");
    CHECK(pheno_sphering_transform(sph, wd, PC_NW, PC_D, NULL, all_white, PC_NW * PC_D) == PHENO_OK, "transform all");
    pheno_sphering_free(sph);

    /* copairs mAP of the treated wells (DMSO unlabelled: library only) vs a naive AP here. */
    const char *labels[PC_NW];
    for (size_t i = 0; i < PC_NW; i++) labels[i] = i % PC_WELLS < 2 ? "" : (i % PC_WELLS == 2 ? "T1" : "T2");
    PhenoRetrievalOptions ro = pheno_retrieval_default_options();
    ro.method = PHENO_MAP_COPAIRS;
    double ap[PC_NW], mean = -1;
    st = pheno_mean_average_precision(all_white, PC_NW, PC_D, labels, PC_NW, &ro, ap, PC_NW, NULL, 0, NULL, 0,
                                      NULL, 0, NULL, 0, NULL, &mean);
    CHECK(st == PHENO_OK, "mAP: %d %s", st, pheno_last_error());
    double want_sum = 0, ap_diff = 0;
    size_t queries = 0;
    for (size_t i = 0; i < PC_NW; i++) {
        if (labels[i][0] == 0) {
            CHECK(isnan(ap[i]), "unlabelled well %zu must have AP NaN", i);
            continue;
        }
        double sims[PC_NW];
        int pos[PC_NW];
        size_t m = 0, npos = 0;
        double ni = 0;
        for (size_t j = 0; j < PC_D; j++) ni += all_white[i * PC_D + j] * all_white[i * PC_D + j];
        for (size_t o = 0; o < PC_NW; o++) {
            if (o == i) continue;
            double dot = 0, no = 0;
            for (size_t j = 0; j < PC_D; j++) {
                dot += all_white[i * PC_D + j] * all_white[o * PC_D + j];
                no += all_white[o * PC_D + j] * all_white[o * PC_D + j];
            }
            sims[m] = dot / sqrt(ni * no);
            pos[m] = strcmp(labels[o], labels[i]) == 0;
            npos += (size_t)pos[m];
            m++;
        }
        double a = 0;
        for (size_t t = 0; t < m; t++) {
            if (!pos[t]) continue;
            size_t rank = 1, hits = 1; /* ties counted in favour of positives */
            for (size_t u = 0; u < m; u++) {
                if (u == t) continue;
                if (sims[u] > sims[t] || (sims[u] == sims[t] && pos[u])) rank++, hits += (size_t)pos[u];
            }
            a += (double)hits / (double)rank;
        }
        a /= (double)npos;
        want_sum += a;
        queries++;
        if (fabs(a - ap[i]) > ap_diff) ap_diff = fabs(a - ap[i]);
    }
    CHECK(queries == 6 && ap_diff <= 1e-12 && fabs(mean - want_sum / (double)queries) <= 1e-12,
          "mAP %g vs naive %g (max per-query diff %g)", mean, want_sum / (double)queries, ap_diff);
    CHECK(pheno_mean_average_precision(all_white, PC_NW, PC_D, labels, PC_NW - 1, &ro, ap, PC_NW, NULL, 0, NULL, 0,
                                       NULL, 0, NULL, 0, NULL, &mean) == PHENO_ERR_SHAPE,
          "label count mismatch must be a shape error");
    CHECK(strstr(pheno_last_error(), "label") != NULL, "error names the labels: %s", pheno_last_error());
}

int main(int argc, char **argv) {
    const char *expected = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--expected") == 0) expected = argv[i + 1];
        else if (strcmp(argv[i], "--workdir") == 0) snprintf(workdir, sizeof workdir, "%s", argv[i + 1]);
        else {
            fprintf(stderr, "usage: %s [--expected FILE] [--workdir DIR]\n", argv[0]);
            return 2;
        }
    }
    test_basics();
    test_crops();
    test_profile_chain();
    test_model(expected);
    printf("%d checks, %d failures%s\n", checks, failures, expected ? "" : " (no --expected: Rust comparison skipped)");
    return failures == 0 ? 0 : 1;
}
