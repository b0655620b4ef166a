/* Shared by the C link tests: CHECK counts checks and failures; OK expects PHENO_OK; FAILS expects a
 * status and a last-error message containing a needle. Each test prints the counts and exits
 * non-zero on any failure. */
#ifndef PHENOCORE_TEST_CHECK_H
#define PHENOCORE_TEST_CHECK_H

#include "phenocore.h"

#include <stdio.h>
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

#define OK(call)                                                                               \
    do {                                                                                       \
        PhenoStatus st_ = (call);                                                              \
        CHECK(st_ == PHENO_OK, "%s -> %d (%s): %s", #call, (int)st_, pheno_status_str(st_),     \
              pheno_last_error());                                                             \
    } while (0)

#define FAILS(call, want, needle)                                                              \
    do {                                                                                       \
        PhenoStatus st_ = (call);                                                              \
        const char *msg_ = pheno_last_error();                                                 \
        CHECK(st_ == (want), "%s -> %d (%s), expected %d (%s); last error: %s", #call, (int)st_, \
              pheno_status_str(st_), (int)(want), pheno_status_str(want), msg_);               \
        CHECK(msg_ != NULL && strstr(msg_, (needle)) != NULL, "%s: last error \"%s\" lacks \"%s\"", \
              #call, msg_, (needle));                                                          \
    } while (0)

#endif
