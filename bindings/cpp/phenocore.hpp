// phenocore.hpp: header-only C++17 RAII wrapper over the phenocore C API (include/phenocore.h).
//
//   phenocore::Model m = phenocore::Model::load("cpcnn.safetensors");
//   auto crops = phenocore::crop_cells(phenocore::Image(pixels, 5, 1080, 1080), centers, {});
//   auto feats = m.features(crops.data(), n, 5, 128, 128, {"block6a_activation"});
//
// Every failure throws phenocore::Error, which carries the PhenoStatus and the library's message.
// A Model is move-only and immutable: one Model may be used from several threads at once.
#ifndef PHENOCORE_HPP
#define PHENOCORE_HPP

#include "phenocore.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace phenocore {

// A failed call: status() is the C status, what() is "<status text>: <pheno_last_error()>".
class Error : public std::runtime_error {
public:
    Error(PhenoStatus status, const std::string &message) : std::runtime_error(message), status_(status) {}
    PhenoStatus status() const noexcept { return status_; }

private:
    PhenoStatus status_;
};

namespace detail {

inline void check(PhenoStatus status) {
    if (status != PHENO_OK) {
        const char *detail = pheno_last_error();
        throw Error(status, std::string(pheno_status_str(status)) + ": " + (detail ? detail : ""));
    }
}

// Converts a C++ progress function into the C callback; an exception thrown by it cancels the
// call and is rethrown from the wrapper (exceptions must not cross the C boundary).
struct ProgressBridge {
    const std::function<bool(size_t, size_t)> *fn = nullptr;
    std::exception_ptr error;

    static int32_t call(size_t done, size_t total, void *user) noexcept {
        auto *self = static_cast<ProgressBridge *>(user);
        try {
            return (*self->fn)(done, total) ? 0 : 1;
        } catch (...) {
            self->error = std::current_exception();
            return 1;
        }
    }

    void rethrow() const {
        if (error) std::rethrow_exception(error);
    }
};

}  // namespace detail

// Version of the loaded library (MAJOR * 10000 + MINOR * 100 + PATCH).
inline uint32_t version_number() { return pheno_version_number(); }

// Worker threads for later calls (0 = one per core).
inline void set_num_threads(size_t n) { detail::check(pheno_set_num_threads(n)); }

enum class Padding { Symmetric = PHENO_PADDING_SYMMETRIC, TfSame = PHENO_PADDING_TF_SAME };

struct ModelOptions {
    Padding padding = Padding::Symmetric;
    float bn_eps = 1e-5f;  // 1e-3 for Keras weights
    int32_t device = -1;   // -1 = CPU

    PhenoEffnetOptions to_c() const {
        PhenoEffnetOptions o = pheno_effnet_default_options();
        o.padding = static_cast<PhenoPadding>(padding);
        o.bn_eps = bn_eps;
        o.device = device;
        return o;
    }
};

struct FeatureOptions {
    size_t batch_size = 0;  // 0 = library default (64)
    // Called after each batch with (cells done, total); return false to cancel.
    std::function<bool(size_t done, size_t total)> progress;
};

enum class Normalization {
    DeepProfilerLegacy = PHENO_NORM_DEEPPROFILER_LEGACY,
    MinMax = PHENO_NORM_MINMAX,
    None = PHENO_NORM_NONE,
};

struct CropOptions {
    size_t box_size = 128;
    Normalization normalization = Normalization::DeepProfilerLegacy;

    PhenoCropOptions to_c() const {
        PhenoCropOptions o = pheno_crop_default_options();
        o.box_size = box_size;
        o.normalization = static_cast<PhenoNormalization>(normalization);
        return o;
    }
};

// A non-owning view of a planar C x H x W field image.
struct Image {
    PhenoImage view;

    Image(const uint8_t *data, size_t c, size_t h, size_t w) : view{data, PHENO_PIXEL_U8, c, h, w} {}
    Image(const uint16_t *data, size_t c, size_t h, size_t w) : view{data, PHENO_PIXEL_U16, c, h, w} {}
    Image(const float *data, size_t c, size_t h, size_t w) : view{data, PHENO_PIXEL_F32, c, h, w} {}
};

// A row-major rows x cols float matrix (one row per cell).
struct Matrix {
    size_t rows = 0;
    size_t cols = 0;
    std::vector<float> data;

    float operator()(size_t r, size_t c) const { return data[r * cols + c]; }
};

// Crops box x box boxes around n centres (x, y), n x 2 floats: n x C x box x box floats.
inline std::vector<float> crop_cells(const Image &image, const float *centers, size_t n,
                                     const CropOptions &opts = {}) {
    const PhenoCropOptions o = opts.to_c();
    std::vector<float> out(n * image.view.channels * opts.box_size * opts.box_size);
    detail::check(pheno_crop_cells(&image.view, centers, n, &o, out.data(), out.size()));
    return out;
}

inline std::vector<float> crop_cells(const Image &image, const std::vector<float> &centers,
                                     const CropOptions &opts = {}) {
    if (centers.size() % 2 != 0) throw Error(PHENO_ERR_SHAPE, "centers must hold (x, y) pairs");
    return crop_cells(image, centers.data(), centers.size() / 2, opts);
}

// An EfficientNet-B0 handle. Move-only; the moved-from Model is empty (get() == nullptr).
class Model {
public:
    // Loads safetensors weights (torchvision names).
    static Model load(const std::string &path, const ModelOptions &opts = {}) {
        const PhenoEffnetOptions o = opts.to_c();
        PhenoModel *m = nullptr;
        detail::check(pheno_effnet_load(path.c_str(), &o, &m));
        return Model(m);
    }

    // Loads safetensors weights from memory (the bytes are not kept).
    static Model from_memory(const void *bytes, size_t len, const ModelOptions &opts = {}) {
        const PhenoEffnetOptions o = opts.to_c();
        PhenoModel *m = nullptr;
        detail::check(pheno_effnet_load_from_memory(static_cast<const uint8_t *>(bytes), len, &o, &m));
        return Model(m);
    }

    // A freshly initialised model, deterministic in `seed` (pheno_effnet_new; `new` is a C++ keyword).
    static Model create(size_t in_channels, size_t num_classes, uint64_t seed, const ModelOptions &opts = {}) {
        const PhenoEffnetOptions o = opts.to_c();
        PhenoModel *m = nullptr;
        detail::check(pheno_effnet_new(in_channels, num_classes, seed, &o, &m));
        return Model(m);
    }

    Model(Model &&other) noexcept : m_(std::exchange(other.m_, nullptr)) {}
    Model &operator=(Model &&other) noexcept {
        if (this != &other) {
            pheno_effnet_free(m_);
            m_ = std::exchange(other.m_, nullptr);
        }
        return *this;
    }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    ~Model() { pheno_effnet_free(m_); }

    // The C handle (still owned by this Model).
    const PhenoModel *get() const noexcept { return m_; }

    // Writes the weights as safetensors, atomically.
    void save(const std::string &path) const { detail::check(pheno_effnet_save(m_, path.c_str())); }

    size_t in_channels() const { return info().first; }
    size_t num_classes() const { return info().second; }

    size_t layer_dim(const std::string &layer) const {
        size_t d = 0;
        detail::check(pheno_effnet_layer_dim(m_, layer.c_str(), &d));
        return d;
    }

    // Mean-pooled features of each layer for n crops (n x c x h x w floats): one n x dim matrix each.
    std::vector<Matrix> features(const float *crops, size_t n, size_t c, size_t h, size_t w,
                                 const std::vector<std::string> &layers, const FeatureOptions &opts = {}) const {
        return run_layers(layers, n, opts, [&](const char *const *names, const PhenoFeatureOptions *o,
                                               float *const *out, const size_t *lens) {
            return pheno_effnet_features(m_, crops, n, c, h, w, names, layers.size(), o, out, lens);
        });
    }

    std::vector<Matrix> features(const std::vector<float> &crops, size_t n, size_t c, size_t h, size_t w,
                                 const std::vector<std::string> &layers, const FeatureOptions &opts = {}) const {
        check_len(crops.size(), n, c, h, w);
        return features(crops.data(), n, c, h, w, layers, opts);
    }

    // Features of the cells at `centers` (n x 2 floats) of a field image, cropped in batches.
    std::vector<Matrix> features_from_image(const Image &image, const float *centers, size_t n,
                                            const std::vector<std::string> &layers, const CropOptions &crop = {},
                                            const FeatureOptions &opts = {}) const {
        const PhenoCropOptions co = crop.to_c();
        return run_layers(layers, n, opts, [&](const char *const *names, const PhenoFeatureOptions *o,
                                               float *const *out, const size_t *lens) {
            return pheno_effnet_features_from_image(m_, &image.view, centers, n, &co, names, layers.size(), o,
                                                    out, lens);
        });
    }

    // Class logits: an n x num_classes matrix.
    Matrix logits(const float *crops, size_t n, size_t c, size_t h, size_t w) const {
        Matrix m{n, num_classes(), {}};
        m.data.resize(m.rows * m.cols);
        detail::check(pheno_effnet_logits(m_, crops, n, c, h, w, m.data.data(), m.data.size()));
        return m;
    }

    Matrix logits(const std::vector<float> &crops, size_t n, size_t c, size_t h, size_t w) const {
        check_len(crops.size(), n, c, h, w);
        return logits(crops.data(), n, c, h, w);
    }

private:
    explicit Model(PhenoModel *m) : m_(m) {}

    std::pair<size_t, size_t> info() const {
        size_t c = 0, k = 0;
        detail::check(pheno_effnet_info(m_, &c, &k));
        return {c, k};
    }

    static void check_len(size_t have, size_t n, size_t c, size_t h, size_t w) {
        size_t need = n;
        for (size_t d : {c, h, w}) {
            if (d != 0 && need > SIZE_MAX / d) throw Error(PHENO_ERR_SHAPE, "n x c x h x w overflows size_t");
            need *= d;
        }
        if (have < need)
            throw Error(PHENO_ERR_SHAPE, "crops vector holds " + std::to_string(have) + " floats; n x c x h x w = " +
                                             std::to_string(need));
    }

    template <class Call>
    std::vector<Matrix> run_layers(const std::vector<std::string> &layers, size_t n, const FeatureOptions &opts,
                                   Call call) const {
        std::vector<const char *> names;
        std::vector<Matrix> result;
        std::vector<float *> outs;
        std::vector<size_t> lens;
        for (const auto &l : layers) {
            names.push_back(l.c_str());
            Matrix m{n, layer_dim(l), {}};
            m.data.resize(m.rows * m.cols);
            result.push_back(std::move(m));
        }
        for (auto &m : result) {
            outs.push_back(m.data.data());
            lens.push_back(m.data.size());
        }
        PhenoFeatureOptions o = pheno_feature_default_options();
        o.batch_size = opts.batch_size;
        detail::ProgressBridge bridge;
        if (opts.progress) {
            bridge.fn = &opts.progress;
            o.progress = &detail::ProgressBridge::call;
            o.user_data = &bridge;
        }
        const PhenoStatus st = call(names.data(), &o, outs.data(), lens.data());
        bridge.rethrow();
        detail::check(st);
        return result;
    }

    PhenoModel *m_ = nullptr;
};

}  // namespace phenocore

#endif  // PHENOCORE_HPP
