/*
 * C link test of the trainer ABI (pheno_trainer_*): compiled against include/phenocore.h, linked with
 * the cdylib, run plain and under valgrind by scripts/test-c.sh.
 *
 *   test_train [--workdir DIR] [--weights FILE]
 *
 * --workdir: where weights and checkpoints are written (default "."). --weights: torchvision-named
 * 5-channel EfficientNet-B0 weights with activations of order 1 (default
 * tests/fixtures/effnet/weights_f16.safetensors, relative to the repository root). Exit status 0 when
 * every check passes. Crops are 32 x 32 to keep the run (and valgrind) short; at that size the last
 * stages are 1 x 1, where BN statistics over a few crops make unclipped steps explode in eval mode
 * (as in torch), so the steps here clip the gradient norm.
 */
#include "phenocore.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

enum { C = 5, K = 2, HW = 32, N = 4, NFIT = 16 };
#define CROP ((size_t)C * HW * HW)

static char workdir[4096] = ".";
static char weights[4096] = "tests/fixtures/effnet/weights_f16.safetensors";

static void path_in_workdir(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", workdir, name); }

/* Crop i: values in [0, 1), brighter for odd labels. */
static void fill(float *x, size_t n, const uint32_t *labels) {
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < CROP; j++)
            x[i * CROP + j] = (float)((i * 131 + j * 7919) % 1000) / 2000.0f + 0.5f * (float)labels[i];
}

static int close_to(float a, float b) { return fabsf(a - b) <= 1e-4f + 1e-4f * fabsf(b); }

struct progress_log {
    int steps;
    int epochs;
    int cancel_at_step; /* 0 = never */
    double last_val_accuracy;
    double last_top5;
};

static int32_t on_progress(const PhenoTrainProgress *p, void *user) {
    struct progress_log *log = (struct progress_log *)user;
    CHECK(p->struct_size == sizeof(PhenoTrainProgress), "progress struct_size %zu", p->struct_size);
    if (p->is_epoch_end) {
        log->epochs++;
        log->last_val_accuracy = p->val_accuracy;
        log->last_top5 = p->val_top5;
        CHECK(isfinite(p->train_loss) && p->train_loss > 0, "train_loss %g", p->train_loss);
        CHECK(p->train_accuracy >= 0 && p->train_accuracy <= 1, "train_accuracy %g", p->train_accuracy);
        return 0;
    }
    log->steps++;
    CHECK(p->step >= 1 && p->step <= p->steps_in_epoch, "step %llu of %llu", (unsigned long long)p->step,
          (unsigned long long)p->steps_in_epoch);
    CHECK(isfinite(p->loss), "step loss %g", p->loss);
    return log->cancel_at_step != 0 && log->steps >= log->cancel_at_step;
}

static void test_options(void) {
    PhenoTrainerOptions o = pheno_trainer_default_options();
    CHECK(o.struct_size == sizeof(PhenoTrainerOptions), "struct_size %zu", o.struct_size);
    CHECK(o.optimizer == PHENO_OPTIMIZER_SGD && o.lr == 0.005 && o.momentum == 0.9 && o.nesterov,
          "REFERENCE §2 defaults");
    CHECK(o.weight_decay == 1e-5 && o.dropout == 0.2 && o.drop_connect_rate == 0.2 && o.batch_size == 32,
          "REFERENCE §2 defaults");
    PhenoTrainer *t = (PhenoTrainer *)&o; /* must be overwritten with NULL on failure */
    o.label_smoothing = 2.0;
    FAILS(pheno_trainer_new(&o, C, K, 1, NULL, &t), PHENO_ERR_INVALID_ARGUMENT, "label_smoothing");
    CHECK(t == NULL, "out_trainer not NULL after failure");
    o = pheno_trainer_default_options();
    o.struct_size = sizeof(PhenoTrainerOptions) + 8;
    FAILS(pheno_trainer_new(&o, C, K, 1, NULL, &t), PHENO_ERR_INVALID_ARGUMENT, "struct_size");
    FAILS(pheno_trainer_new(NULL, 0, K, 1, NULL, &t), PHENO_ERR_INVALID_ARGUMENT, "in_channels");
    FAILS(pheno_trainer_new(NULL, C, K, 1, NULL, NULL), PHENO_ERR_NULL_POINTER, "out_trainer");
    char missing[4200];
    path_in_workdir(missing, sizeof missing, "no-such-weights.safetensors");
    FAILS(pheno_trainer_new_from_weights(NULL, missing, C, K, 1, NULL, &t), PHENO_ERR_IO, "no-such-weights");
    CHECK(t == NULL, "out_trainer not NULL after failure");
    pheno_trainer_free(NULL);
}

static void test_step_predict_save(void) {
    PhenoTrainerOptions o = pheno_trainer_default_options();
    o.lr = 0.01;
    o.clip_grad_norm = 1.0;
    o.batch_size = 8;
    o.epochs = 1;
    PhenoTrainer *t = NULL;
    /* 10-class fixture weights: a fresh 2-class classifier is drawn from the seed */
    OK(pheno_trainer_new_from_weights(&o, weights, C, K, 7, NULL, &t));
    if (!t) return;

    uint32_t labels[N] = {0, 1, 1, 0};
    float *x = malloc(N * CROP * sizeof(float));
    fill(x, N, labels);
    double loss = -1;
    OK(pheno_trainer_step(t, x, N, C, HW, HW, labels, &loss));
    CHECK(isfinite(loss) && loss > 0 && loss < 10, "loss %g", loss);
    uint64_t steps = 0, epochs = 9;
    OK(pheno_trainer_steps(t, &steps, &epochs));
    CHECK(steps == 1 && epochs == 0, "steps %llu epochs %llu", (unsigned long long)steps, (unsigned long long)epochs);

    /* bad input: nothing applied */
    uint32_t bad_labels[N] = {0, 1, 2, 0};
    FAILS(pheno_trainer_step(t, x, N, C, HW, HW, bad_labels, &loss), PHENO_ERR_INVALID_ARGUMENT, "crop 2");
    FAILS(pheno_trainer_step(t, x, 1, C + 1, HW, HW, labels, &loss), PHENO_ERR_SHAPE, "channels");
    FAILS(pheno_trainer_step(t, NULL, N, C, HW, HW, labels, &loss), PHENO_ERR_NULL_POINTER, "crops");
    FAILS(pheno_trainer_step(t, x, N, C, HW, HW, NULL, &loss), PHENO_ERR_NULL_POINTER, "labels");
    FAILS(pheno_trainer_step(t, x, N, C, HW, HW, labels, NULL), PHENO_ERR_NULL_POINTER, "out_loss");
    FAILS(pheno_trainer_step(NULL, x, N, C, HW, HW, labels, &loss), PHENO_ERR_NULL_POINTER, "trainer");
    float saved = x[CROP + 5];
    x[CROP + 5] = NAN;
    FAILS(pheno_trainer_step(t, x, N, C, HW, HW, labels, &loss), PHENO_ERR_NON_FINITE, "crop 1");
    x[CROP + 5] = saved;
    OK(pheno_trainer_steps(t, &steps, &epochs));
    CHECK(steps == 1, "a rejected step counted: %llu", (unsigned long long)steps);

    /* predict vs the exported inference model (BN folded), through a saved file and in memory */
    float logits[N * K], from_file[N * K], from_handle[N * K];
    OK(pheno_trainer_predict(t, x, N, C, HW, HW, logits, N * K));
    FAILS(pheno_trainer_predict(t, x, N, C, HW, HW, logits, N * K - 1), PHENO_ERR_SHAPE, "out_len");
    char wpath[4200];
    path_in_workdir(wpath, sizeof wpath, "trained.safetensors");
    OK(pheno_trainer_save_weights(t, wpath));
    PhenoModel *m = NULL;
    OK(pheno_effnet_load(wpath, NULL, &m));
    if (m) {
        size_t in_ch = 0, classes = 0;
        OK(pheno_effnet_info(m, &in_ch, &classes));
        CHECK(in_ch == C && classes == K, "saved model %zu x %zu", in_ch, classes);
        OK(pheno_effnet_logits(m, x, N, C, HW, HW, from_file, N * K));
        pheno_effnet_free(m);
    }
    PhenoModel *m2 = NULL;
    OK(pheno_trainer_to_model(t, &m2));
    if (m2) {
        OK(pheno_effnet_logits(m2, x, N, C, HW, HW, from_handle, N * K));
        float top[N * 1280];
        const char *layers[1] = {"top_activation"};
        float *outs[1] = {top};
        size_t lens[1] = {N * 1280};
        OK(pheno_effnet_features(m2, x, N, C, HW, HW, layers, 1, NULL, outs, lens));
        pheno_effnet_free(m2);
    }
    for (size_t i = 0; i < N * K; i++) {
        CHECK(isfinite(logits[i]) && fabsf(logits[i]) > 1e-3f && fabsf(logits[i]) < 100, "logit %zu is %g", i,
              logits[i]);
        CHECK(close_to(from_file[i], logits[i]), "logit %zu: file %g vs trainer %g", i, from_file[i], logits[i]);
        CHECK(close_to(from_handle[i], logits[i]), "logit %zu: handle %g vs trainer %g", i, from_handle[i],
              logits[i]);
    }

    /* checkpoint: the step after a load is the step the saved run took */
    char ck[4200];
    path_in_workdir(ck, sizeof ck, "trainer.ckpt");
    OK(pheno_trainer_save_checkpoint(t, ck));
    double a = 0, b = 1;
    OK(pheno_trainer_step(t, x, N, C, HW, HW, labels, &a));
    OK(pheno_trainer_load_checkpoint(t, ck));
    OK(pheno_trainer_steps(t, &steps, &epochs));
    CHECK(steps == 1, "steps after load %llu", (unsigned long long)steps);
    OK(pheno_trainer_step(t, x, N, C, HW, HW, labels, &b));
    CHECK(a == b, "resumed step loss %.17g vs %.17g", b, a);
    FAILS(pheno_trainer_load_checkpoint(t, wpath), PHENO_ERR_FORMAT, "checkpoint");

    free(x);
    pheno_trainer_free(t);
}

static void test_fit_and_cancel(void) {
    PhenoTrainerOptions o = pheno_trainer_default_options();
    o.lr = 0.01;
    o.clip_grad_norm = 1.0;
    o.batch_size = 4;
    o.epochs = 1;
    PhenoTrainer *t = NULL;
    OK(pheno_trainer_new(&o, C, K, 3, NULL, &t));
    if (!t) return;
    uint32_t labels[NFIT], wells[NFIT], plates[NFIT];
    for (size_t i = 0; i < NFIT; i++) {
        labels[i] = (uint32_t)(i % 2);
        wells[i] = (uint32_t)(i % 4);
        plates[i] = (uint32_t)(i / 8);
    }
    float *x = malloc(NFIT * CROP * sizeof(float));
    fill(x, NFIT, labels);
    struct progress_log log = {0, 0, 0, NAN, NAN};
    FAILS(pheno_trainer_fit(t, PHENO_SPLIT_NONE, 0.6, NULL, 0, 0, NULL, NULL, on_progress, &log),
          PHENO_ERR_INVALID_ARGUMENT, "no crops");
    uint32_t bad[NFIT];
    memcpy(bad, labels, sizeof bad);
    bad[5] = K;
    FAILS(pheno_trainer_add_crops(t, x, NFIT, C, HW, HW, bad, wells, plates), PHENO_ERR_INVALID_ARGUMENT, "crop 5");
    OK(pheno_trainer_add_crops(t, x, 8, C, HW, HW, labels, wells, plates));
    FAILS(pheno_trainer_add_crops(t, x, 8, C, HW / 2, HW * 2, labels, wells, plates), PHENO_ERR_SHAPE, "added before");
    OK(pheno_trainer_add_crops(t, x + 8 * CROP, 8, C, HW, HW, labels + 8, wells + 8, plates + 8));
    size_t n = 0;
    OK(pheno_trainer_num_crops(t, &n));
    CHECK(n == NFIT, "num_crops %zu", n);

    /* leave-plates-out: plate 1 validates; 8 training crops → 8 per epoch / batch 4 = 2 steps */
    uint32_t val_plates[1] = {1};
    char ck[4200], best[4200];
    path_in_workdir(ck, sizeof ck, "fit.ckpt");
    path_in_workdir(best, sizeof best, "fit-best.safetensors");
    FAILS(pheno_trainer_fit(t, 7, 0.6, NULL, 0, 0, NULL, NULL, NULL, NULL), PHENO_ERR_INVALID_ARGUMENT, "split");
    OK(pheno_trainer_fit(t, PHENO_SPLIT_PLATES, 0.6, val_plates, 1, 0, ck, best, on_progress, &log));
    CHECK(log.steps == 2 && log.epochs == 1, "fit: %d steps, %d epochs", log.steps, log.epochs);
    CHECK(log.last_val_accuracy >= 0 && log.last_val_accuracy <= 1, "val_accuracy %g", log.last_val_accuracy);
    CHECK(isnan(log.last_top5), "top-5 with 2 classes should be NaN, got %g", log.last_top5);
    uint64_t steps = 0, epochs = 0;
    OK(pheno_trainer_steps(t, &steps, &epochs));
    CHECK(steps == 2 && epochs == 1, "steps %llu epochs %llu", (unsigned long long)steps, (unsigned long long)epochs);

    /* two more epochs (3 in total), leave-cells-out; cancelled at the 3rd step: CANCELLED and the
     * checkpoint of the epoch before stays loadable */
    log = (struct progress_log){0, 0, 3, NAN, NAN};
    FAILS(pheno_trainer_fit(t, PHENO_SPLIT_CELLS, 0.5, NULL, 0, 3, ck, NULL, on_progress, &log), PHENO_ERR_CANCELLED,
          "cancel");
    CHECK(log.epochs == 1, "epochs before cancel %d", log.epochs);
    OK(pheno_trainer_load_checkpoint(t, ck));
    OK(pheno_trainer_steps(t, &steps, &epochs));
    CHECK(epochs == 2, "checkpoint epochs %llu", (unsigned long long)epochs);
    OK(pheno_trainer_clear_crops(t));
    OK(pheno_trainer_num_crops(t, &n));
    CHECK(n == 0, "num_crops after clear %zu", n);
    free(x);
    pheno_trainer_free(t);
}

/* Domain-adversarial branch and attention-MIL bags (fields appended to PhenoTrainerOptions). */
static void test_domains_and_mil(void) {
    PhenoTrainerOptions o = pheno_trainer_default_options();
    CHECK(o.domain_count == 0 && o.domain_lambda == 1.0 && o.domain_weight == 1.0 && o.mil == 0 &&
              o.mil_bag_size == 16 && o.mil_min_treated == 4 && o.mil_max_treated == 12 && o.mil_attention_dim == 128,
          "domain / MIL defaults");
    o.lr = 0.01;
    o.clip_grad_norm = 1.0;
    o.batch_size = 2;
    o.epochs = 1;
    o.augment = 0;
    size_t hidden[2] = {32, 16};
    o.domain_count = 2;
    o.domain_hidden = hidden;
    o.n_domain_hidden = 2;
    PhenoTrainer *t = NULL;
    OK(pheno_trainer_new_from_weights(&o, weights, C, K, 7, NULL, &t));
    if (!t) return;
    uint32_t labels[N] = {0, 1, 1, 0}, domains[N] = {0, 1, 0, 1}, bad[N] = {0, 1, 2, 1};
    float *x = malloc(NFIT * CROP * sizeof(float));
    fill(x, N, labels);
    double loss = -1;
    FAILS(pheno_trainer_step(t, x, N, C, HW, HW, labels, &loss), PHENO_ERR_INVALID_ARGUMENT, "step_with_domains");
    FAILS(pheno_trainer_step_domains(t, x, N, C, HW, HW, labels, bad, &loss), PHENO_ERR_INVALID_ARGUMENT, "crop 2");
    OK(pheno_trainer_step_domains(t, x, N, C, HW, HW, labels, domains, &loss));
    CHECK(isfinite(loss) && loss > 0, "domain step loss %g", loss);
    /* fit with plates as domains (add_crops without domains) */
    uint32_t plates[N] = {0, 0, 1, 1};
    OK(pheno_trainer_add_crops(t, x, N, C, HW, HW, labels, NULL, plates));
    OK(pheno_trainer_fit(t, PHENO_SPLIT_NONE, 0.6, NULL, 0, 0, NULL, NULL, NULL, NULL));
    OK(pheno_trainer_clear_crops(t));
    uint32_t far[N] = {0, 5, 0, 1};
    OK(pheno_trainer_add_crops_with_domains(t, x, N, C, HW, HW, labels, NULL, plates, far));
    FAILS(pheno_trainer_fit(t, PHENO_SPLIT_NONE, 0.6, NULL, 0, 2, NULL, NULL, NULL, NULL), PHENO_ERR_INVALID_ARGUMENT,
          "crop 1");
    pheno_trainer_free(t);

    /* MIL: bags of 4, class 0 the control */
    PhenoTrainerOptions m = pheno_trainer_default_options();
    m.lr = 0.01;
    m.clip_grad_norm = 1.0;
    m.mil = 1;
    m.mil_bag_size = 4;
    m.mil_min_treated = 1;
    m.mil_max_treated = 3;
    m.mil_attention_dim = 8;
    PhenoTrainer *u = NULL;
    FAILS(pheno_trainer_new(&m, C, K, 3, NULL, &u), PHENO_ERR_INVALID_ARGUMENT, "control_classes");
    uint32_t controls[1] = {0};
    m.mil_control_classes = controls;
    m.n_mil_control_classes = 1;
    OK(pheno_trainer_new_from_weights(&m, weights, C, K, 3, NULL, &u));
    if (!u) {
        free(x);
        return;
    }
    uint32_t bag_labels[2] = {1, 0}, crop_labels[8] = {0, 1, 0, 1, 0, 0, 0, 0};
    fill(x, 8, crop_labels);
    OK(pheno_trainer_step_bags(u, x, 2, C, HW, HW, bag_labels, NULL, &loss));
    CHECK(isfinite(loss) && loss > 0, "bag loss %g", loss);
    FAILS(pheno_trainer_step(u, x, N, C, HW, HW, labels, &loss), PHENO_ERR_INVALID_ARGUMENT, "step_bags");
    pheno_trainer_free(u);
    free(x);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--workdir") == 0 && i + 1 < argc) {
            snprintf(workdir, sizeof workdir, "%s", argv[++i]);
        } else if (strcmp(argv[i], "--weights") == 0 && i + 1 < argc) {
            snprintf(weights, sizeof weights, "%s", argv[++i]);
        } else {
            fprintf(stderr, "usage: %s [--workdir DIR] [--weights FILE]\n", argv[0]);
            return 2;
        }
    }
    test_options();
    test_step_predict_save();
    test_fit_and_cancel();
    test_domains_and_mil();
    printf("test_train: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
