// Test of phenocore.hpp: values against the C API and by hand, RAII/move semantics, and errors
// thrown with the library's status and message.
//
//   test_phenocore_cpp [--workdir DIR]
#include "phenocore.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, what)                                                             \
    do {                                                                              \
        checks++;                                                                     \
        if (!(cond)) {                                                                \
            failures++;                                                               \
            std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, std::string(what).c_str()); \
        }                                                                             \
    } while (0)

// `body` must throw phenocore::Error with `status` and a message containing `needle`.
template <class F>
static void expect_error(F body, PhenoStatus status, const char *needle, const char *what) {
    try {
        body();
        CHECK(false, std::string(what) + ": did not throw");
    } catch (const phenocore::Error &e) {
        CHECK(e.status() == status, std::string(what) + ": status " + std::to_string(e.status()) + ", " + e.what());
        CHECK(std::strstr(e.what(), needle) != nullptr, std::string(what) + ": message lacks '" + needle + "': " + e.what());
    }
}

static bool same(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

int main(int argc, char **argv) {
    std::string workdir = ".";
    if (argc == 3 && std::strcmp(argv[1], "--workdir") == 0) workdir = argv[2];
    constexpr size_t C = 5, K = 10, N = 2, HW = 32;

    CHECK(phenocore::version_number() == PHENO_VERSION_NUMBER, "version");
    phenocore::set_num_threads(2);

    // Crops by hand: a 5 x 16 x 16 u16 ramp, 4 x 4 box at (6, 7) -> rows 5..8, cols 4..7.
    std::vector<uint16_t> px(C * 16 * 16);
    for (size_t i = 0; i < px.size(); i++) px[i] = static_cast<uint16_t>(i + 1);
    phenocore::Image img(px.data(), C, 16, 16);
    phenocore::CropOptions raw;
    raw.box_size = 4;
    raw.normalization = phenocore::Normalization::None;
    std::vector<float> crop = phenocore::crop_cells(img, std::vector<float>{6.0f, 7.0f}, raw);
    CHECK(crop.size() == C * 16, "crop size");
    bool exact = true;
    for (size_t c = 0; c < C; c++)
        for (size_t r = 0; r < 4; r++)
            for (size_t q = 0; q < 4; q++)
                exact &= crop[(c * 4 + r) * 4 + q] == static_cast<float>(px[(c * 16 + 5 + r) * 16 + 4 + q]);
    CHECK(exact, "crop pixels");
    expect_error([&] { phenocore::crop_cells(img, std::vector<float>{NAN, 1.0f}, raw); },
                 PHENO_ERR_INVALID_ARGUMENT, "centers[0]", "NaN centre");

    // Model: values equal the C API's on the same handle; save/load round trip is exact.
    phenocore::Model m = phenocore::Model::create(C, K, 7);
    CHECK(m.in_channels() == C && m.num_classes() == K, "info");
    CHECK(m.layer_dim("block6a_activation") == 672 && m.layer_dim("logits") == K, "layer_dim");
    std::vector<float> crops(N * C * HW * HW);
    for (size_t i = 0; i < crops.size(); i++) crops[i] = static_cast<float>((i * 37) % 101) / 101.0f;
    const std::vector<std::string> layers = {"block6a_activation", "top_activation"};
    auto feats = m.features(crops, N, C, HW, HW, layers);
    CHECK(feats.size() == 2 && feats[0].rows == N && feats[0].cols == 672 && feats[1].cols == 1280, "feature shapes");

    std::vector<float> c6(N * 672), ctop(N * 1280);
    float *outs[2] = {c6.data(), ctop.data()};
    size_t lens[2] = {c6.size(), ctop.size()};
    const char *names[2] = {"block6a_activation", "top_activation"};
    CHECK(pheno_effnet_features(m.get(), crops.data(), N, C, HW, HW, names, 2, nullptr, outs, lens) == PHENO_OK,
          "C features");
    CHECK(same(feats[0].data, c6) && same(feats[1].data, ctop), "wrapper features equal the C API's");
    CHECK(feats[0](1, 3) == c6[672 + 3], "Matrix indexing is row-major");
    CHECK(feats[0](0, 0) != feats[0](1, 0), "cells differ");

    phenocore::Matrix lg = m.logits(crops, N, C, HW, HW);
    std::vector<float> clg(N * K);
    CHECK(pheno_effnet_logits(m.get(), crops.data(), N, C, HW, HW, clg.data(), clg.size()) == PHENO_OK, "C logits");
    CHECK(lg.rows == N && lg.cols == K && same(lg.data, clg), "wrapper logits equal the C API's");

    const std::string path = workdir + "/phenocore_cpp_test.safetensors";
    m.save(path);
    phenocore::Model loaded = phenocore::Model::load(path);
    auto again = loaded.features(crops, N, C, HW, HW, layers);
    CHECK(same(again[0].data, feats[0].data) && same(again[1].data, feats[1].data), "loaded model features");
    std::remove(path.c_str());

    // features_from_image equals crop + features; progress counts cells over batches.
    phenocore::CropOptions co;
    co.box_size = HW;
    const std::vector<float> centers = {5.0f, 5.0f, 10.0f, 12.0f};
    auto cropped = phenocore::crop_cells(img, centers, co);
    auto direct = m.features(cropped, N, C, HW, HW, layers);
    size_t calls = 0, last = 0;
    phenocore::FeatureOptions fo;
    fo.batch_size = 1;
    fo.progress = [&](size_t done, size_t total) {
        calls++;
        last = done;
        return total == N;
    };
    auto from_image = m.features_from_image(img, centers.data(), N, layers, co, fo);
    CHECK(same(from_image[0].data, direct[0].data) && same(from_image[1].data, direct[1].data), "from_image");
    CHECK(calls == 2 && last == N, "progress calls " + std::to_string(calls));

    // Cancelling, and an exception from the callback, both stop the call.
    fo.progress = [](size_t, size_t) { return false; };
    expect_error([&] { m.features(crops, N, C, HW, HW, layers, fo); }, PHENO_ERR_CANCELLED, "cancelled", "cancel");
    fo.progress = [](size_t, size_t) -> bool { throw std::logic_error("from the callback"); };
    try {
        m.features(crops, N, C, HW, HW, layers, fo);
        CHECK(false, "callback exception not rethrown");
    } catch (const std::logic_error &e) {
        CHECK(std::string(e.what()) == "from the callback", e.what());
    }

    // Errors carry the status and the library's message.
    expect_error([&] { m.features(crops, N, C, HW, HW, {"block6a_activatoin"}); }, PHENO_ERR_UNKNOWN_LAYER,
                 "block6a_activatoin", "unknown layer");
    expect_error([&] { m.features(crops, N + 1, C, HW, HW, layers); }, PHENO_ERR_SHAPE, "crops vector", "short crops");
    expect_error([&] { phenocore::Model::load(workdir + "/missing.safetensors"); }, PHENO_ERR_IO, "missing.safetensors",
                 "missing file");
    const char garbage[] = "definitely not safetensors";
    expect_error([&] { phenocore::Model::from_memory(garbage, sizeof garbage); }, PHENO_ERR_FORMAT, "safetensors",
                 "garbage bytes");
    phenocore::ModelOptions gpu;
    gpu.device = 0;
    expect_error([&] { phenocore::Model::create(C, K, 1, gpu); }, PHENO_ERR_UNSUPPORTED, "CUDA", "device 0");

    // Move semantics: the moved-from model is empty and reports NULL instead of crashing.
    phenocore::Model moved = std::move(m);
    CHECK(m.get() == nullptr && moved.get() != nullptr, "move leaves the source empty");
    expect_error([&] { m.num_classes(); }, PHENO_ERR_NULL_POINTER, "model", "moved-from model");
    moved = std::move(loaded);
    CHECK(loaded.get() == nullptr && moved.num_classes() == K, "move assignment");

    std::printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
