// CUDA-on-CPU emulation of the subset of CUDA C that kernels/*.cu use, for testing the kernels'
// logic on machines without a GPU (CI). g++ compiles a kernel module with this header forced in
// (-include) and -DPHENO_EMU; every KERNEL(...) entry point then also exports
// `int emu__<entry>(const emu::Cfg*, void** args)`, which runs the kernel over its grid exactly as
// cuLaunchKernel would be asked to (args[i] points at the i-th parameter's value).
//
// Model: blocks run one after another; the threads of a block are fibers run one at a time up to
// their next barrier (__syncthreads, __syncwarp, or a shuffle's exchange), alternately in thread
// order and in reverse, so results are deterministic and code that reads another thread's shared
// memory without a barrier between write and read usually computes a wrong value. `__shared__`
// variables are function statics (blocks never overlap, so one copy per kernel suffices); dynamic
// shared memory is a per-block buffer filled with 0xff. Threads that return early leave every
// barrier, as on sm_70+; threads waiting at different barriers are reported as a deadlock.
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
#include <ucontext.h>
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

// Each CUDA thread of a block is a fiber (ucontext) with its own stack; one OS thread runs them
// one at a time, each until it reaches a barrier or returns, in thread order for even blocks and
// in reverse order for odd ones. Deterministic, and a missing __syncthreads usually shows: the
// first thread to run reads shared memory the others have not written yet.
enum class State : unsigned char { Ready, AtBlock, AtWarp, Exited };

struct Fiber {
    ucontext_t ctx;
    State state;
};

struct Block {
    dim3 grid, block;
    unsigned threads = 0;
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    std::vector<unsigned long long> exchange;
    std::vector<unsigned char> dynamic_shared;
    void (*body)(void*) = nullptr;
    void* body_ctx = nullptr;
    std::exception_ptr failure;
};

inline Block* current = nullptr;
// Launches of one module run one at a time (they share `current` and the geometry globals).
inline std::mutex one_launch_at_a_time;
inline dim3 grid_dim, block_dim, thread_idx, block_idx;
inline unsigned linear_tid = 0;
constexpr std::size_t FIBER_STACK = 256 * 1024;

inline void park(State s) {
    Block& b = *current;
    Fiber& f = b.fibers[linear_tid];
    f.state = s;
    swapcontext(&f.ctx, &b.scheduler);
}

inline void sync_block() { park(State::AtBlock); }
inline void sync_warp() { park(State::AtWarp); }

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

inline void fiber_main() {
    Block& b = *current;
    try {
        b.body(b.body_ctx);
    } catch (...) {
        if (!b.failure) b.failure = std::current_exception();
    }
    park(State::Exited);  // never resumed
}

inline void set_thread(const Block& b, unsigned t) {
    linear_tid = t;
    thread_idx = dim3{t % b.block.x, (t / b.block.x) % b.block.y, t / (b.block.x * b.block.y)};
}

// Runs the fibers of the current block until all have returned; false on a barrier deadlock
// (threads waiting at different barriers: divergent __syncthreads / __syncwarp).
inline bool run_block(Block& b, bool reverse) {
    for (;;) {
        for (unsigned i = 0; i < b.threads; ++i) {
            unsigned t = reverse ? b.threads - 1 - i : i;
            if (b.fibers[t].state != State::Ready) continue;
            set_thread(b, t);
            swapcontext(&b.scheduler, &b.fibers[t].ctx);
        }
        bool live = false, released = false;
        for (unsigned w = 0; w * 32 < b.threads; ++w) {
            unsigned end = std::min(b.threads, 32 * w + 32);
            bool all = true, any = false;
            for (unsigned t = 32 * w; t < end; ++t) {
                State st = b.fibers[t].state;
                if (st == State::Exited) continue;
                any = true;
                all = all && st == State::AtWarp;
            }
            live = live || any;
            if (any && all) {
                for (unsigned t = 32 * w; t < end; ++t)
                    if (b.fibers[t].state == State::AtWarp) b.fibers[t].state = State::Ready;
                released = true;
            }
        }
        if (!live) return true;
        if (released) continue;
        bool all_at_block = true;
        for (auto& f : b.fibers) all_at_block = all_at_block && (f.state == State::Exited || f.state == State::AtBlock);
        if (!all_at_block) return false;
        for (auto& f : b.fibers)
            if (f.state == State::AtBlock) f.state = State::Ready;
    }
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
    b.fibers.resize(b.threads);
    b.exchange.assign(b.threads, 0);
    b.body = [](void* p) { (*static_cast<std::remove_reference_t<F>*>(p))(); };
    b.body_ctx = &body;
    static std::vector<char> stacks;  // reused by later launches of this module
    if (stacks.size() < b.threads * FIBER_STACK) stacks.resize(b.threads * FIBER_STACK);
    current = &b;
    grid_dim = b.grid;
    block_dim = b.block;
    int rc = 0;
    for (unsigned long long blk = 0; blk < blocks && rc == 0; ++blk) {
        block_idx = dim3{(unsigned)(blk % b.grid.x), (unsigned)((blk / b.grid.x) % b.grid.y),
                         (unsigned)(blk / ((unsigned long long)b.grid.x * b.grid.y))};
        // Uninitialised on a GPU; 0xff bytes (NaN in every float type) here, so reads before writes show.
        b.dynamic_shared.assign(cfg->shared_bytes + 16, 0xff);
        for (unsigned t = 0; t < b.threads; ++t) {
            Fiber& f = b.fibers[t];
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = stacks.data() + t * FIBER_STACK;
            f.ctx.uc_stack.ss_size = FIBER_STACK;
            f.ctx.uc_link = &b.scheduler;
            makecontext(&f.ctx, fiber_main, 0);
            f.state = State::Ready;
        }
        if (!run_block(b, blk % 2 == 1)) {
            std::fprintf(stderr, "emu: block %llu deadlocked: threads wait at different barriers\n", blk);
            rc = 4;
        }
        if (b.failure) rc = 3;
    }
    current = nullptr;
    if (b.failure) {
        try {
            std::rethrow_exception(b.failure);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "emu: kernel threw: %s\n", e.what());
        } catch (...) {
            std::fprintf(stderr, "emu: kernel threw\n");
        }
    }
    return rc;
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
// IEEE round-to-nearest arithmetic that the compiler may not contract into FMAs (optim, crop).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
