// CUDA-on-CPU emulation of the subset of CUDA C that kernels/*.cu use, for testing the kernels'
// logic on machines without a GPU (CI). g++ compiles a kernel module with this header forced in
// (-include) and -DPHENO_EMU; every KERNEL(...) entry point then also exports
// `int emu__<entry>(const emu::Cfg*, void** args)`, which runs the kernel over its grid exactly as
// cuLaunchKernel would be asked to (args[i] points at the i-th parameter's value).
//
// Model: blocks run one after another; the threads of a block run concurrently as OS threads, so
// __syncthreads, warp shuffles and shared memory behave as on a GPU for race-free code, and a
// missing barrier tends to show up as wrong results. `__shared__` variables are function statics
// (blocks never overlap, so one copy per kernel suffices); dynamic shared memory is a per-launch
// buffer. Threads that return early leave every barrier, as on sm_70+.
//
// What this does not check: memory-model subtleties beyond barriers, bank conflicts, performance,
// register pressure (the NVRTC check covers spills), and out-of-bounds reads that land in mapped
// memory. It is a logic check; the parity suite on a real GPU is the proof.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
typedef dim3 uint3;
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};

namespace emu {

// Launch geometry, laid out as the Rust harness passes it.
struct Cfg {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_bytes;
};

// A barrier whose participant count drops when a thread leaves (returns from the kernel).
class Barrier {
    std::mutex m_;
    std::condition_variable cv_;
    unsigned live_ = 0, arrived_ = 0;
    unsigned long long generation_ = 0;

    void release_locked() {
        arrived_ = 0;
        ++generation_;
        cv_.notify_all();
    }

  public:
    void reset(unsigned n) {
        std::lock_guard<std::mutex> g(m_);
        live_ = n;
        arrived_ = 0;
    }
    void wait() {
        std::unique_lock<std::mutex> l(m_);
        unsigned long long mine = generation_;
        if (++arrived_ == live_) {
            release_locked();
        } else {
            cv_.wait(l, [&] { return generation_ != mine; });
        }
    }
    void leave() {
        std::lock_guard<std::mutex> g(m_);
        --live_;
        if (live_ > 0 && arrived_ == live_) release_locked();
    }
};

struct Block {
    dim3 grid, block;
    unsigned threads = 0;
    Barrier barrier;
    std::vector<Barrier> warps;
    std::vector<unsigned long long> exchange;
    std::vector<unsigned char> dynamic_shared;
};

inline Block* current = nullptr;
// Launches of one module run one at a time (they share `current` and the geometry globals).
inline std::mutex one_launch_at_a_time;
inline dim3 grid_dim, block_dim;
inline thread_local dim3 thread_idx, block_idx;
inline thread_local unsigned linear_tid = 0;

inline void sync_block() { current->barrier.wait(); }
inline void sync_warp() { current->warps[linear_tid / 32].wait(); }

// Every thread of the warp publishes v; each reads lane `src` of its own warp (own value if !valid).
template <typename T> T exchange(T v, unsigned src, bool valid) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    Block& b = *current;
    unsigned long long slot = 0;
    std::memcpy(&slot, &v, sizeof(T));
    b.exchange[linear_tid] = slot;
    sync_warp();
    T r = v;
    unsigned from = (linear_tid / 32) * 32 + src;
    if (valid && from < b.threads) std::memcpy(&r, &b.exchange[from], sizeof(T));
    sync_warp();
    return r;
}

inline unsigned lane() { return linear_tid % 32; }

// The launch's dynamic shared memory (16-byte aligned), what `extern __shared__` names on a GPU.
inline unsigned char* dynamic_shared() {
    auto p = reinterpret_cast<std::uintptr_t>(current->dynamic_shared.data());
    return reinterpret_cast<unsigned char*>((p + 15) & ~std::uintptr_t(15));
}

// Runs `body` once per thread per block. Returns 0, or a non-zero code for an invalid launch.
template <typename F> int run(const Cfg* cfg, F&& body) {
    std::lock_guard<std::mutex> serial(one_launch_at_a_time);
    Block b;
    b.grid = dim3{cfg->grid[0], cfg->grid[1], cfg->grid[2]};
    b.block = dim3{cfg->block[0], cfg->block[1], cfg->block[2]};
    unsigned long long threads = (unsigned long long)b.block.x * b.block.y * b.block.z;
    unsigned long long blocks = (unsigned long long)b.grid.x * b.grid.y * b.grid.z;
    if (threads == 0 || threads > 1024 || b.block.z > 64 || blocks == 0 || b.grid.y > 65535 ||
        b.grid.z > 65535) {
        std::fprintf(stderr, "emu: invalid launch: grid (%u, %u, %u), block (%u, %u, %u)\n", b.grid.x,
                     b.grid.y, b.grid.z, b.block.x, b.block.y, b.block.z);
        return 1;
    }
    if (cfg->shared_bytes > 227u * 1024u) {
        std::fprintf(stderr, "emu: %u bytes of dynamic shared memory exceed the 227 KiB limit\n",
                     cfg->shared_bytes);
        return 2;
    }
    b.threads = (unsigned)threads;
    b.warps = std::vector<Barrier>((b.threads + 31) / 32);
    b.exchange.assign(b.threads, 0);
    // Uninitialised on a GPU; filled with a NaN pattern here so reads before writes show.
    b.dynamic_shared.assign(cfg->shared_bytes + 16, 0xff);
    current = &b;
    grid_dim = b.grid;
    block_dim = b.block;

    std::mutex gate_m;
    std::condition_variable gate_cv;
    unsigned long long started_block = ~0ull;  // block index the workers should run now
    unsigned done = 0;
    std::exception_ptr failure;

    auto worker = [&](unsigned t) {
        linear_tid = t;
        thread_idx = dim3{t % b.block.x, (t / b.block.x) % b.block.y, t / (b.block.x * b.block.y)};
        for (unsigned long long blk = 0; blk < blocks; ++blk) {
            {
                std::unique_lock<std::mutex> l(gate_m);
                gate_cv.wait(l, [&] { return started_block == blk; });
            }
            block_idx = dim3{(unsigned)(blk % b.grid.x), (unsigned)((blk / b.grid.x) % b.grid.y),
                             (unsigned)(blk / ((unsigned long long)b.grid.x * b.grid.y))};
            try {
                body();
            } catch (...) {
                std::lock_guard<std::mutex> g(gate_m);
                if (!failure) failure = std::current_exception();
            }
            b.barrier.leave();
            b.warps[t / 32].leave();
            {
                std::lock_guard<std::mutex> g(gate_m);
                ++done;
            }
            gate_cv.notify_all();
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(b.threads);
    for (unsigned t = 0; t < b.threads; ++t) pool.emplace_back(worker, t);
    for (unsigned long long blk = 0; blk < blocks; ++blk) {
        std::unique_lock<std::mutex> l(gate_m);
        b.barrier.reset(b.threads);
        for (unsigned w = 0; w < b.warps.size(); ++w)
            b.warps[w].reset(std::min(32u, b.threads - 32 * w));
        done = 0;
        started_block = blk;
        gate_cv.notify_all();
        gate_cv.wait(l, [&] { return done == b.threads; });
    }
    for (auto& th : pool) th.join();
    current = nullptr;
    if (failure) {
        try {
            std::rethrow_exception(failure);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "emu: kernel threw: %s\n", e.what());
        } catch (...) {
            std::fprintf(stderr, "emu: kernel threw\n");
        }
        return 3;
    }
    return 0;
}

template <typename... A, std::size_t... I>
void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A> int launch(void (*f)(A...), const Cfg* cfg, void** args) {
    return run(cfg, [&] { call(f, args, std::index_sequence_for<A...>{}); });
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define warpSize 32
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __syncthreads() emu::sync_block()
#define __syncwarp(...) emu::sync_warp()
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)

template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    unsigned base = (emu::lane() / width) * width;
    return emu::exchange(v, base + ((unsigned)src % width), true);
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    unsigned l = emu::lane(), base = (l / width) * width, src = l ^ (unsigned)mask;
    return emu::exchange(v, src, src >= base && src < base + width);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    unsigned l = emu::lane(), base = (l / width) * width, src = l + delta;
    return emu::exchange(v, src, src < base + width);
}
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    unsigned l = emu::lane(), base = (l / width) * width;
    return emu::exchange(v, l - delta, l >= base + delta);
}

template <typename T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
using std::exp;
using std::log;
using std::sqrt;
