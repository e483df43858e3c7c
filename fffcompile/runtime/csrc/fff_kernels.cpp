// CPU kernels of torch.ops.fffcompile.leaf_mlp_tree (form A) and neuron_tree (form B).
//
// Math (FORMS.md): with a_n = x . W_n + b_n, form A descends n = 2n + 1 + [a_n >= 0] (tie "ge")
// or [a_n > 0] (tie "gt") D times and runs the reached leaf's MLP; form B sums act(a_{p,n}) V_{p,n}
// over the D + 1 neurons on each tree's path, plus out_bias. No intermediate tensors. The body
// (fff_body.h) is compiled three times, for AVX-512F, AVX2+FMA and baseline x86-64 / any other
// CPU, each in its own namespace under `#pragma GCC target`; the instruction set is picked once at
// run time (__builtin_cpu_supports). float32 and float64 run in their own type; bfloat16 and
// float16 are widened to float32 on load (vectorised: shift / F16C), accumulated in float32 and
// rounded once on store (reference.py's rule). One mixed pair: float32 x / out with bfloat16 weights
// (the optional reduced-precision weight copy, `Prepared(..., bf16=True)`, halving the weight traffic
// that bounds the kernel): the weights are widened on load as above, x is read and out written in
// float32, so it computes reference.hard of the spec whose weights are rounded to bfloat16. The
// AVX-512 path is compiled wherever the compiler knows the target and runs where the CPU reports
// avx512f. The development machine (AMD Zen 3) has none: there the kernel tests run that path
// through a second build on SIMDe's portable AVX-512 (-DFFF_EMULATE_AVX512, avx512_emulated.h;
// tests/kernel_builds.py). It has never run, or been timed, on AVX-512 hardware.
//
// Two paths take the same decisions (the tie rule on the same a_n; only the summation order of
// the dot products differs, so they agree to rounding, and exactly on ties at a_n = 0):
//
// - per row (neuron_rows, leaf_route): the whole descent of one row, four rows interleaved, then
//   its output in one pass over its path's V rows. Form B below g_group_min_b = 2048 rows, form
//   A's routing below g_group_min_a = 128 rows (batch 1 always).
// - subtree-blocked (neuron_top/neuron_subtree, leaf_top/leaf_subtree), from those batch sizes:
//   the top `split` levels per row as above, `split` chosen so that about g_bucket_rows = 32 rows
//   reach each node of level `split`; the rows are bucketed by that node (counting sort) and each
//   bucket descends its subtree level by level, every node's W row (and V row) loaded once for all
//   of its rows, four rows per pass, the subtree's nodes in increasing address order, the bucket's
//   x and y rows staying in L2.
//
// Form A then groups rows by leaf (counting sort) and runs each leaf's MLP over its rows four at a
// time, so a leaf's weights stream once per four rows.
//
// Threads (parallel_chunks): rows, sorted rows or buckets in chunks of at least ~2^17
// multiply-accumulates, handed out from a shared counter so that a thread the OS leaves waiting
// on a shared machine delays one chunk, not half the work; a single chunk (batch 1) never wakes a
// second thread.
//
// Measured on the development machine (AMD EPYC Zen 3, AVX2, 2 cores, 512 KB L2, 32 MB L3),
// shared with other jobs (load average 4-5 on the 2 cores during these runs: every figure is
// noisy, +-15% between identical variants). `PYTHONPATH=. python benchmarks/kernel_micro.py --paths
// --cpu-time --threads 1 --rounds 11` (thread CPU time, median of rounds in a random order per
// round; "per row" = the subtree path off and static thread chunks, i.e. the kernel before them),
// us per row, default vs per row:
//   UltraFastBERT 1x11 shape (d 768, depth 11): b1 7.1 vs 6.6, b128 3.5 vs 3.0 (same code: noise
//   at one thread), b1024 3.08 vs 3.05 (same code), b4096 2.67 vs 2.95 (subtree path: -10%);
//   form A (d 768, depth 8, leaf width 16): b1 11.2 vs 11.3, b128 6.4 vs 7.2, b1024 3.60 vs 3.72,
//   b4096 2.31 vs 2.54 (subtree routing: -3 to -11%).
// An earlier run (fixed order, load 3.5) agreed: UFB b4096 2.9 vs 3.3, form A b128-1024 9-18%
// faster, UFB b128-1024 within noise; hence the thresholds (form B 2048 rows, form A 128).
// A sweep of the knobs (same CPU-time method, UFB shape, load 4.2-4.7; _tune_grouped): b1024 per
// row 3.57, buckets of 16 / 32 / 64 / 128 rows 3.54 / 3.66 / 3.73 / 4.07; b2048 per row 3.49, 32 rows
// 3.04; b4096 per row 3.50, 16 / 32 / 64 / 128 rows 2.86 / 2.87 / 3.04 / 4.06 us per row; the
// prefetch modes 0 / 1 / 2 within noise of each other.
// Why no more: with d = 768 an x row is as large as a weight row (3 KB), and L2 holds about a
// hundred rows' x and y next to the weights streaming through, so a node is shared by several
// of a bucket's rows only in the subtree's first levels; below them each row still pulls its own
// W and V rows from L3. The kernel stays bound by L3 / memory traffic, not by arithmetic.
// `fffcompile bench --batches 1 128 1024 4096 --threads 1 2 --no-compile --rounds 5 --budget 3`
// (same machine, load average 3.9-5.4) measured fffcompile at UFB 56 us / 567 us / 4.1 ms / 15.0
// ms and form A 16 us / 1.24 ms / 6.0 ms / 18.1 ms at batch 1 / 128 / 1024 / 4096, one thread.
// Two threads: at::parallel_for is inline OpenMP in ATen's headers, so the extension is compiled
// with -fopenmp (cpu_kernel.CFLAGS); built without it, as before 2026-11-23, every parallel_for
// ran on one thread (process CPU time equal to wall time at two threads). With it, quiet machine
// (load ~1), nn eval layers, wall / process CPU time per call, 1 -> 2 threads: UFB b128 ~500 ->
// ~270 us (CPU ~530 us), b1024 3.6 -> 1.95 ms, b4096 11 -> 5.8 ms; form A b128 ~1.1 ms -> ~0.6 ms,
// b1024 3.3 -> 1.8 ms, b4096 10 -> 6.2 ms; batch 1 stays on one thread (CPU time = wall time).
// bfloat16 weight copy (float32 x / out), same machine, load average 2.6-2.9, two runs of
// `fffcompile bench --shapes ufb leaf --batches 1 128 1024 4096 --threads 1 --methods dense --rounds 11
// --budget 8 --plot none` (noisy, +-10-20% per point), float32 vs bf16 weights, one thread:
// UFB 10.9 / 396 / 3640 / 12440 us vs 8.1 / 276 / 2880 / 11230 us; form A 12.7 / 1120 / 4190 / 11270 us
// vs 10.4 / 626 / 2920 / 9940 us at batch 1 / 128 / 1024 / 4096: 1.1-1.8x, most where the weight
// rows stream once per row (form A's leaf MLPs at batch 128), least on the subtree path at 4096.

#include <torch/extension.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#ifdef FFF_EMULATE_AVX512
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#endif
#define FFF_X86 1
#else
#define FFF_X86 0
#endif

namespace fff {

enum Activation { ACT_RELU = 0, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_SIGMOID, ACT_TANH, ACT_RELU2, ACT_IDENTITY };

// activations.py, formula for formula.
template <class A>
inline A activation(int act, A t) {
  switch (act) {
    case ACT_RELU: return t > A(0) ? t : A(0);
    case ACT_GELU: return A(0.5) * t * (A(1) + std::erf(t * A(0.70710678118654752440)));
    case ACT_GELU_TANH: {
      const A inner = A(0.79788456080286535588) * (t + A(0.044715) * t * t * t);
      return A(0.5) * t * (A(1) + std::tanh(inner));
    }
    case ACT_SILU: return t / (A(1) + std::exp(-t));
    case ACT_SIGMOID: return A(1) / (A(1) + std::exp(-t));
    case ACT_TANH: return std::tanh(t);
    case ACT_RELU2: { const A r = t > A(0) ? t : A(0); return r * r; }
    default: return t;
  }
}

struct LeafArgs {
  const void* x; void* out;
  const void *node_weight, *node_bias, *leaf_w1, *leaf_b1, *leaf_w2, *leaf_b2;
  int64_t rows, d_in, width, d_out; int depth; int act; bool tie_ge;
  int child_mode;
};

struct NeuronArgs {
  const void* x; void* out;
  const void *node_weight, *node_bias, *out_weight, *out_bias;
  int64_t rows, d_in, d_out, trees, nodes; int depth; int act; bool tie_ge;
  int64_t w_stride, v_stride;  // row strides of node_weight and out_weight (d_in and d_out unless packed)
  int child_mode;              // 2: prefetch both children a level ahead; 1: only their first 4 lines; 0: none
};

// Tuning knobs (the defaults are the measured best; `_tune` changes them for experiments only).
// child_mode 2 prefetches both children's rows a level ahead. On the Zen 3 development machine
// it made form B slower (UltraFastBERT shape, batch 1: 5.1 vs 4.2 us per token; batch 256: 3.6
// vs 2.6 us per row) than leaving the streams to the hardware prefetcher, and form A no slower.
// child_mode 1 prefetches only the first 256 bytes of both children's W rows (the next row is
// one of them; touching its start early lets the hardware stream the rest sooner): form B,
// UltraFastBERT shape, batch 1, one thread, interleaved medians on the shared machine, 3-5%
// faster than 0 (19.1 vs 19.7-19.9 us median, 8.0-8.2 vs 8.8-9.3 us p10, load average 6 on
// 2 cores; benchmarks/child_prefetch.py), so it is form B's default.
static int g_child_mode = 1;
static int g_child_mode_a = 2;
// Subtree-blocked path (fff_body.h): used from g_group_min_b rows up for form B and from
// g_group_min_a rows up for form A's routing, the split level chosen so that a bucket holds about
// g_bucket_rows rows (measured: see the header); the next run's weight rows are prefetched
// (g_subtree_prefetch: 0 not, 1 their first 256 bytes, 2 whole).
static int64_t g_group_min_b = 2048, g_group_min_a = 128, g_bucket_rows = 32;
static int g_subtree_prefetch = 1;
// 1: threads take chunks from a shared counter (parallel_chunks); 0: at::parallel_for's static split.
static int g_dynamic = 1;

// The rows of one call on the subtree-blocked path: x and y rows in the accumulation type
// (the tensors' own rows for float32/64, converted copies for 16-bit types), each row's node.
struct GroupCtx {
  const void* const* xr; void* const* yr; int64_t* node;
  int64_t tree; int split; int64_t rows;
};

// Scalar "vector" of one lane: the portable path, and the 16-bit types' path on every ISA.
template <class Storage>
struct ScalarVec {
  using S = Storage;
  using A = typename std::conditional<std::is_same<S, double>::value, double, float>::type;
  using R = A;
  static constexpr int W = 1;
  static inline R zero() { return A(0); }
  static inline R set1(A a) { return a; }
  static inline R load(const S* p) { return static_cast<A>(*p); }
  static inline R loadA(const A* p) { return *p; }
  static inline void storeA(A* p, R v) { *p = v; }
  static inline R fma(R a, R b, R c) { return a * b + c; }
  static inline R add(R a, R b) { return a + b; }
  static inline A hsum(R v) { return v; }
};

namespace scalar_isa {
template <class S> struct VecFor { using type = ScalarVec<S>; };
#include "fff_body.h"
}  // namespace scalar_isa

#if FFF_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2_isa {
struct F32 {
  using S = float; using A = float; using R = __m256; static constexpr int W = 8;
  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R set1(A a) { return _mm256_set1_ps(a); }
  static inline R load(const S* p) { return _mm256_loadu_ps(p); }
  static inline R loadA(const A* p) { return _mm256_loadu_ps(p); }
  static inline void storeA(A* p, R v) { _mm256_storeu_ps(p, v); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  static inline A hsum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
struct F64 {
  using S = double; using A = double; using R = __m256d; static constexpr int W = 4;
  static inline R zero() { return _mm256_setzero_pd(); }
  static inline R set1(A a) { return _mm256_set1_pd(a); }
  static inline R load(const S* p) { return _mm256_loadu_pd(p); }
  static inline R loadA(const A* p) { return _mm256_loadu_pd(p); }
  static inline void storeA(A* p, R v) { _mm256_storeu_pd(p, v); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static inline R add(R a, R b) { return _mm256_add_pd(a, b); }
  static inline A hsum(R v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};
// 16-bit storage, float32 arithmetic: 8 lanes widened on load (bfloat16: shift into the high half;
// float16: F16C's vcvtph2ps, present on every AVX2 CPU).
struct BF16 : F32 {
  using S = c10::BFloat16;
  static inline R load(const S* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};
struct F16 : F32 {
  using S = c10::Half;
  static inline R load(const S* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
};
template <class S> struct VecFor { using type = ScalarVec<S>; };
template <> struct VecFor<float> { using type = F32; };
template <> struct VecFor<double> { using type = F64; };
template <> struct VecFor<c10::BFloat16> { using type = BF16; };
template <> struct VecFor<c10::Half> { using type = F16; };
#include "fff_body.h"
}  // namespace avx2_isa
#pragma GCC pop_options

// AVX-512F: compiled wherever the compiler supports the target, chosen only on CPUs that report it.
// With -DFFF_EMULATE_AVX512 (tests only: cpu_kernel.load_emulated_avx512) the same code runs on
// SIMDe's portable AVX-512 (avx512_emulated.h) on any AVX2 CPU, and is the path always chosen.
#pragma GCC push_options
#ifdef FFF_EMULATE_AVX512
#pragma GCC target("avx2,fma,f16c")
#else
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif
namespace avx512_isa {
#ifdef FFF_EMULATE_AVX512
#include "avx512_emulated.h"
#endif
struct F32 {
  using S = float; using A = float; using R = __m512; static constexpr int W = 16;
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R set1(A a) { return _mm512_set1_ps(a); }
  static inline R load(const S* p) { return _mm512_loadu_ps(p); }
  static inline R loadA(const A* p) { return _mm512_loadu_ps(p); }
  static inline void storeA(A* p, R v) { _mm512_storeu_ps(p, v); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  static inline A hsum(R v) { return _mm512_reduce_add_ps(v); }
};
struct F64 {
  using S = double; using A = double; using R = __m512d; static constexpr int W = 8;
  static inline R zero() { return _mm512_setzero_pd(); }
  static inline R set1(A a) { return _mm512_set1_pd(a); }
  static inline R load(const S* p) { return _mm512_loadu_pd(p); }
  static inline R loadA(const A* p) { return _mm512_loadu_pd(p); }
  static inline void storeA(A* p, R v) { _mm512_storeu_pd(p, v); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static inline R add(R a, R b) { return _mm512_add_pd(a, b); }
  static inline A hsum(R v) { return _mm512_reduce_add_pd(v); }
};
struct BF16 : F32 {
  using S = c10::BFloat16;
  static inline R load(const S* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};
struct F16 : F32 {
  using S = c10::Half;
  static inline R load(const S* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
};
template <class S> struct VecFor { using type = ScalarVec<S>; };
template <> struct VecFor<float> { using type = F32; };
template <> struct VecFor<double> { using type = F64; };
template <> struct VecFor<c10::BFloat16> { using type = BF16; };
template <> struct VecFor<c10::Half> { using type = F16; };
#include "fff_body.h"
}  // namespace avx512_isa
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------------------------------- dispatch

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

int detected_isa() {
#ifdef FFF_EMULATE_AVX512
  return ISA_AVX512;
#endif
#if FFF_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return ISA_AVX2;
#endif
  return ISA_SCALAR;
}

static int g_isa = detected_isa();

const char* isa_name(int isa) {
  return isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "scalar";
}

template <class S, class XS>
struct Kernels {
  void (*route)(const LeafArgs&, int64_t, int64_t, int64_t*);
  void (*apply)(const LeafArgs&, int64_t, const int64_t*, int64_t);
  void (*neuron)(const NeuronArgs&, int64_t, int64_t);
  void (*leaf_top)(const LeafArgs&, const GroupCtx&, int64_t, int64_t);
  void (*leaf_subtree)(const LeafArgs&, const GroupCtx&, int64_t, const int32_t*, int32_t, int64_t*);
  void (*neuron_top)(const NeuronArgs&, const GroupCtx&, int64_t, int64_t);
  void (*neuron_subtree)(const NeuronArgs&, const GroupCtx&, int64_t, const int32_t*, int32_t);
};

template <class S, class XS>
Kernels<S, XS> kernels_for(int isa) {
#if FFF_X86
  if (isa == ISA_AVX512) return {avx512_isa::leaf_route<S, XS>, avx512_isa::leaf_apply<S, XS>, avx512_isa::neuron_rows<S, XS>, 
          avx512_isa::leaf_top<S>, avx512_isa::leaf_subtree<S>, avx512_isa::neuron_top<S>, avx512_isa::neuron_subtree<S>};
  if (isa == ISA_AVX2) return {avx2_isa::leaf_route<S, XS>, avx2_isa::leaf_apply<S, XS>, avx2_isa::neuron_rows<S, XS>, 
          avx2_isa::leaf_top<S>, avx2_isa::leaf_subtree<S>, avx2_isa::neuron_top<S>, avx2_isa::neuron_subtree<S>};
#endif
  return {scalar_isa::leaf_route<S, XS>, scalar_isa::leaf_apply<S, XS>, scalar_isa::neuron_rows<S, XS>, 
          scalar_isa::leaf_top<S>, scalar_isa::leaf_subtree<S>, scalar_isa::neuron_top<S>, scalar_isa::neuron_subtree<S>};
}

// Rows per parallel task so that a task does at least ~kMinTaskMacs multiply-accumulates: below
// that, waking a second thread costs more than it saves.
constexpr int64_t kMinTaskMacs = 1 << 17;

int64_t grain_for(int64_t macs_per_row) {
  return std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(1, macs_per_row));
}

// ------------------------------------------------------------------------ subtree-blocked driver

// The subtree-blocked path numbers a call's rows with int32 (its sort keys): larger calls run per row.
constexpr int64_t kMaxGroupRows = int64_t(1) << 31;

// The level whose nodes root the buckets: about g_bucket_rows rows per bucket, at most max_split.
int split_level(int64_t rows, int max_split) {
  int s = 0;
  while (s < max_split && (rows >> (s + 1)) >= g_bucket_rows) ++s;
  return s;
}

// body(b, e) over [0, n) in chunks of `chunk` elements. One thread when there is a single chunk or
// one thread is set; otherwise the chunks are handed out one at a time from a shared counter to
// at most at::get_num_threads() threads, so that a thread the OS leaves waiting (a machine shared
// with other jobs) delays only its current chunk, not a fixed share of the work, and the calling
// thread keeps taking chunks meanwhile. g_dynamic = 0: at::parallel_for's static split instead.
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, const F& body) {
  chunk = std::max<int64_t>(1, chunk);
  const int64_t tasks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    body(0, n);
    return;
  }
  if (!g_dynamic) {   // static split over whole chunks: boundaries stay multiples of `chunk` (the row blocks)
    at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) { body(b * chunk, std::min(n, e * chunk)); });
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < tasks;)
      body(i * chunk, std::min(n, (i + 1) * chunk));
  });
}

// Rows per task for per-row work of `macs` multiply-accumulates a row: a multiple of 4 (the row blocks).
int64_t row_chunk(int64_t macs) { return (std::max<int64_t>(4, grain_for(macs)) + 3) / 4 * 4; }

template <class S>
struct GroupRows {
  using A = typename std::conditional<std::is_same<S, double>::value, double, float>::type;
  static constexpr bool same = std::is_same<S, A>::value;
  std::vector<A> xbuf, ybuf;
  std::vector<const void*> xr;
  std::vector<void*> yr;
  std::vector<int64_t> node;
  std::vector<int32_t> order;
  std::vector<int64_t> start;

  GroupRows(const void* x, void* out, int64_t rows, int64_t d, int64_t m)
      : xbuf(same ? 0 : rows * d), ybuf(same || !out ? 0 : rows * m), xr(rows), yr(out ? rows : 0), node(rows), order(rows) {
    const S* X = static_cast<const S*>(x);
    if constexpr (same) {
      for (int64_t r = 0; r < rows; ++r) {
        xr[r] = X + r * d;
        if (out) yr[r] = static_cast<S*>(out) + r * m;
      }
    } else {  // 16-bit rows widened once here (in parallel: 3 M elements at batch 4096, d 768)
      parallel_chunks(rows, 64, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          A* row = xbuf.data() + r * d;
          for (int64_t j = 0; j < d; ++j) row[j] = static_cast<A>(X[r * d + j]);
          xr[r] = row;
          if (out) yr[r] = ybuf.data() + r * m;
        }
      });
    }
  }

  // 16-bit types: y rows rounded once into the output.
  void store(void* out, int64_t m) {
    if constexpr (!same) {
      S* Y = static_cast<S*>(out);
      const int64_t rows = static_cast<int64_t>(node.size());
      parallel_chunks(rows, 64, [&](int64_t b, int64_t e) {
        for (int64_t i = b * m; i < e * m; ++i) Y[i] = static_cast<S>(ybuf[i]);
      });
    }
  }

  // Counting sort of the rows by their node at level `split` into order / start.
  void bucket(int split) {
    const int64_t first = (int64_t(1) << split) - 1, n = int64_t(1) << split, rows = static_cast<int64_t>(node.size());
    start.assign(n + 1, 0);
    for (int64_t r = 0; r < rows; ++r) ++start[node[r] - first + 1];
    for (int64_t q = 0; q < n; ++q) start[q + 1] += start[q];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < rows; ++r) order[fill[node[r] - first]++] = static_cast<int32_t>(r);
  }
};

template <class S, class XS>
void neuron_subtrees(const NeuronArgs& p, const Kernels<S, XS>& k) {
  const int64_t rows = p.rows, m = p.d_out;
  GroupRows<XS> g(p.x, p.out, rows, p.d_in, m);
  const int split = split_level(rows, p.depth);
  const int64_t first = (int64_t(1) << split) - 1, buckets = int64_t(1) << split;
  for (int64_t t = 0; t < p.trees; ++t) {
    const GroupCtx c{g.xr.data(), g.yr.data(), g.node.data(), t, split, rows};
    parallel_chunks(rows, std::max<int64_t>(32, row_chunk(split * (p.d_in + m))), [&](int64_t b, int64_t e) { k.neuron_top(p, c, b, e); });
    g.bucket(split);
    parallel_chunks(buckets, 1, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q)
        if (g.start[q + 1] > g.start[q])
          k.neuron_subtree(p, c, first + q, g.order.data() + g.start[q], static_cast<int32_t>(g.start[q + 1] - g.start[q]));
    });
  }
  g.store(p.out, m);
}

// Form A's routing on the subtree-blocked path: leaf[row] for every row.
template <class S, class XS>
void route_subtrees(const LeafArgs& p, const Kernels<S, XS>& k, int64_t* leaf) {
  const int64_t rows = p.rows;
  GroupRows<XS> g(p.x, nullptr, rows, p.d_in, 0);
  const int split = split_level(rows, p.depth - 1);
  const int64_t first = (int64_t(1) << split) - 1, buckets = int64_t(1) << split;
  const GroupCtx c{g.xr.data(), nullptr, g.node.data(), 0, split, rows};
  parallel_chunks(rows, std::max<int64_t>(32, row_chunk(split * p.d_in)), [&](int64_t b, int64_t e) { k.leaf_top(p, c, b, e); });
  g.bucket(split);
  parallel_chunks(buckets, 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q)
      if (g.start[q + 1] > g.start[q])
        k.leaf_subtree(p, c, first + q, g.order.data() + g.start[q], static_cast<int32_t>(g.start[q + 1] - g.start[q]), leaf);
  });
}

template <class S, class XS = S>
void run_leaf(const LeafArgs& p, int isa) {
  const Kernels<S, XS> k = kernels_for<S, XS>(isa);
  const int64_t rows = p.rows;
  const int64_t n_leaves = int64_t(1) << p.depth;
  if (rows <= 4) {  // a few rows: route and run each leaf directly, no sort
    int64_t leaf[4], row[4] = {0, 1, 2, 3};
    k.route(p, 0, rows, leaf);
    for (int64_t r = 0; r < rows; ++r) k.apply(p, leaf[r], row + r, 1);
    return;
  }
  std::vector<int64_t> leaf(rows);
  const int64_t route_macs = std::max<int64_t>(1, p.depth * p.d_in);
  if (rows >= g_group_min_a && rows < kMaxGroupRows && p.depth >= 1)
    route_subtrees<S, XS>(p, k, leaf.data());
  else
    parallel_chunks(rows, row_chunk(route_macs), [&](int64_t b, int64_t e) { k.route(p, b, e, leaf.data() + b); });
  // Counting sort of rows by leaf.
  std::vector<int64_t> start(n_leaves + 1, 0), order(rows);
  for (int64_t r = 0; r < rows; ++r) ++start[leaf[r] + 1];
  for (int64_t j = 0; j < n_leaves; ++j) start[j + 1] += start[j];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < rows; ++r) order[fill[leaf[r]]++] = r;
  }
  const int64_t leaf_macs = p.width * (p.d_in + (p.leaf_w2 ? p.d_out : 0));
  if (rows * leaf_macs < 2 * kMinTaskMacs || at::get_num_threads() == 1) {
    for (int64_t j = 0; j < n_leaves; ++j)
      if (start[j + 1] > start[j]) k.apply(p, j, order.data() + start[j], start[j + 1] - start[j]);
    return;
  }
  // Split the sorted rows into equal chunks; a chunk may cut a leaf's group in two.
  parallel_chunks(rows, row_chunk(leaf_macs), [&](int64_t b, int64_t e) {
    int64_t i = b;
    while (i < e) {
      const int64_t j = leaf[order[i]];
      const int64_t stop = std::min(e, start[j + 1]);
      k.apply(p, j, order.data() + i, stop - i);
      i = stop;
    }
  });
}

template <class S, class XS = S>
void run_neuron(const NeuronArgs& p, int isa) {
  const Kernels<S, XS> k = kernels_for<S, XS>(isa);
  if (p.rows >= g_group_min_b && p.rows < kMaxGroupRows) {
    neuron_subtrees<S, XS>(p, k);
    return;
  }
  const int64_t macs = std::max<int64_t>(1, p.trees * (p.depth + 1) * (p.d_in + p.d_out));
  parallel_chunks(p.rows, row_chunk(macs), [&](int64_t b, int64_t e) { k.neuron(p, b, e); });
}

void check_float(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

// x's dtype against the weights': the same, or float32 x with bfloat16 weights (the reduced-precision
// weight copy: x, the accumulation and the output stay float32). One error for every other pair.
void check_x(const at::Tensor& x, at::ScalarType weights) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == weights || (x.scalar_type() == at::kFloat && weights == at::kBFloat16),
              "x has dtype ", x.scalar_type(), " and the weights ", weights,
              ": x must have the weights' dtype, or be float32 with bfloat16 weights");
}

int resolve_isa(int64_t isa) { return isa < 0 ? g_isa : std::min<int>(static_cast<int>(isa), g_isa); }

// x (..., d_in) -> (..., d_out); every weight of one dtype (float32/64, bfloat16, float16), x of that
// dtype too, or float32 with bfloat16 weights (out float32: the reduced-precision weight copy).
at::Tensor leaf_mlp_tree(const at::Tensor& x, const at::Tensor& node_weight, const at::Tensor& node_bias,
                         const at::Tensor& leaf_w1, const at::Tensor& leaf_b1, const c10::optional<at::Tensor>& leaf_w2,
                         const c10::optional<at::Tensor>& leaf_b2, int64_t act, bool tie_ge, int64_t isa) {
  const auto dtype = node_weight.scalar_type();
  TORCH_CHECK(node_weight.dim() == 2 && node_weight.size(1) >= 1, "node_weight must be (2^D - 1, d_in) with d_in >= 1");
  const int64_t d_in = node_weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d_in, "input has last dim ", x.dim() ? x.size(-1) : 0, ", the FFF expects d_in = ", d_in);
  const bool mlp = leaf_w2.has_value() && leaf_w2->defined();
  at::Tensor w2, b2;
  TORCH_CHECK(!mlp || (leaf_b2.has_value() && leaf_b2->defined()), "leaf_b2 is required with leaf_w2");
  TORCH_CHECK(mlp || !(leaf_b2.has_value() && leaf_b2->defined()), "leaf_b2 must be None without leaf_w2");
  if (mlp) { w2 = leaf_w2->contiguous(); b2 = leaf_b2->contiguous(); check_float(w2, dtype, "leaf_w2"); check_float(b2, dtype, "leaf_b2"); }
  check_x(x, dtype);
  check_float(node_bias, dtype, "node_bias");
  check_float(leaf_w1, dtype, "leaf_w1");
  check_float(leaf_b1, dtype, "leaf_b1");
  {  // shapes (FFFSpec's rules): a mismatch must be an error, never an out-of-bounds read
    const int64_t N = node_weight.size(0), L = N + 1;
    TORCH_CHECK((L & (L - 1)) == 0, "node_weight has ", N, " rows; 2^D - 1 expected");
    TORCH_CHECK(node_bias.dim() == 1 && node_bias.size(0) == N, "node_bias must be (", N, ",)");
    TORCH_CHECK(leaf_w1.dim() == 3 && leaf_w1.size(0) == L && leaf_w1.size(1) == d_in, "leaf_w1 must be (", L, ", ", d_in, ", l)");
    const int64_t l = leaf_w1.size(2);
    TORCH_CHECK(leaf_b1.dim() == 2 && leaf_b1.size(0) == L && leaf_b1.size(1) == l, "leaf_b1 must be (", L, ", ", l, ")");
    if (mlp) {
      TORCH_CHECK(w2.dim() == 3 && w2.size(0) == L && w2.size(1) == l, "leaf_w2 must be (", L, ", ", l, ", d_out)");
      TORCH_CHECK(b2.dim() == 2 && b2.size(0) == L && b2.size(1) == w2.size(2), "leaf_b2 must be (", L, ", ", w2.size(2), ")");
    }
  }
  const at::Tensor X = x.contiguous();
  at::Tensor nw = node_weight.contiguous(), nb = node_bias.contiguous(), w1 = leaf_w1.contiguous(), b1 = leaf_b1.contiguous();
  const int64_t width = w1.size(2), d_out = mlp ? w2.size(2) : width;
  c10::SmallVector<int64_t, 4> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d_out;
  at::Tensor out(at::detail::empty_cpu(out_shape, x.scalar_type()));  // no dispatcher round trip
  LeafArgs p{X.data_ptr(), out.data_ptr(), nw.data_ptr(), nb.data_ptr(), w1.data_ptr(), b1.data_ptr(),
             mlp ? w2.data_ptr() : nullptr, mlp ? b2.data_ptr() : nullptr,
             X.numel() / d_in, d_in, width, d_out, static_cast<int>(64 - __builtin_clzll(uint64_t(nw.size(0) + 1)) - 1),
             static_cast<int>(act), tie_ge, g_child_mode_a};
  if (p.rows > 0) {
    const int chosen = resolve_isa(isa);
    switch (dtype) {
      case at::kFloat: run_leaf<float>(p, chosen); break;
      case at::kDouble: run_leaf<double>(p, chosen); break;
      case at::kBFloat16:
        if (x.scalar_type() == at::kFloat) run_leaf<c10::BFloat16, float>(p, chosen);
        else run_leaf<c10::BFloat16>(p, chosen);
        break;
      case at::kHalf: run_leaf<c10::Half>(p, chosen); break;
      default: TORCH_CHECK(false, "unsupported dtype ", dtype);
    }
  }
  return out;
}

at::Tensor neuron_tree(const at::Tensor& x, const at::Tensor& node_weight, const at::Tensor& node_bias,
                       const at::Tensor& out_weight, const at::Tensor& out_bias, int64_t act, bool tie_ge, int64_t isa,
                       const c10::optional<at::Tensor>& packed = c10::nullopt) {
  const auto dtype = node_weight.scalar_type();
  TORCH_CHECK(node_weight.dim() == 3 && node_weight.size(2) >= 1, "node_weight must be (P, 2^(D+1) - 1, d_in) with d_in >= 1");
  const int64_t d_in = node_weight.size(2);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d_in, "input has last dim ", x.dim() ? x.size(-1) : 0, ", the FFF expects d_in = ", d_in);
  check_x(x, dtype);
  check_float(node_bias, dtype, "node_bias");
  check_float(out_weight, dtype, "out_weight");
  check_float(out_bias, dtype, "out_bias");
  {  // shapes (FFFSpec's rules): a mismatch must be an error, never an out-of-bounds read
    const int64_t P = node_weight.size(0), n = node_weight.size(1);
    TORCH_CHECK(P >= 1 && ((n + 1) & n) == 0 && n >= 1, "node_weight must be (P, 2^(D+1) - 1, d_in), got ", n, " neurons");
    TORCH_CHECK(node_bias.dim() == 2 && node_bias.size(0) == P && node_bias.size(1) == n, "node_bias must be (", P, ", ", n, ")");
    TORCH_CHECK(out_weight.dim() == 3 && out_weight.size(0) == P && out_weight.size(1) == n, "out_weight must be (", P, ", ", n, ", d_out)");
    TORCH_CHECK(out_bias.dim() == 1 && out_bias.size(0) == out_weight.size(2), "out_bias must be (", out_weight.size(2), ",)");
  }
  const at::Tensor X = x.contiguous();
  // With the packed copy the kernel reads W and V from it: no per-call copy of a strided node_weight / out_weight.
  at::Tensor nw = packed.has_value() ? node_weight : node_weight.contiguous(), nb = node_bias.contiguous(),
             ow = packed.has_value() ? out_weight : out_weight.contiguous(), ob = out_bias.contiguous();
  const int64_t d_out = ow.size(2), nodes = nw.size(1);
  c10::SmallVector<int64_t, 4> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d_out;
  at::Tensor out(at::detail::empty_cpu(out_shape, x.scalar_type()));  // no dispatcher round trip
  NeuronArgs p{X.data_ptr(), out.data_ptr(), nw.data_ptr(), nb.data_ptr(), ow.data_ptr(), ob.data_ptr(),
               X.numel() / d_in, d_in, d_out, nw.size(0), nodes,
               static_cast<int>(64 - __builtin_clzll(uint64_t(nodes + 1)) - 2), static_cast<int>(act), tie_ge,
               d_in, d_out, g_child_mode};
  if (packed.has_value()) {  // [W | V] per node: (P, n, d_in + d_out)
    const at::Tensor& pk = *packed;
    TORCH_CHECK(pk.is_contiguous() && pk.scalar_type() == dtype && pk.dim() == 3 && pk.size(0) == nw.size(0) &&
                pk.size(1) == nodes && pk.size(2) == d_in + d_out, "packed weights do not match the layer");
    p.node_weight = pk.data_ptr();
    p.out_weight = static_cast<const char*>(pk.data_ptr()) + d_in * pk.element_size();
    p.w_stride = p.v_stride = d_in + d_out;
  }
  if (p.rows > 0) {
    const int chosen = resolve_isa(isa);
    switch (dtype) {
      case at::kFloat: run_neuron<float>(p, chosen); break;
      case at::kDouble: run_neuron<double>(p, chosen); break;
      case at::kBFloat16:
        if (x.scalar_type() == at::kFloat) run_neuron<c10::BFloat16, float>(p, chosen);
        else run_neuron<c10::BFloat16>(p, chosen);
        break;
      case at::kHalf: run_neuron<c10::Half>(p, chosen); break;
      default: TORCH_CHECK(false, "unsupported dtype ", dtype);
    }
  }
  return out;
}

// A layer's weights held once (the very tensors: in-place updates and `.data =` are seen), so that a
// call passes one tensor through pybind instead of seven.
//
// Form B also keeps a packed copy [W_n | V_n] per node (one contiguous stream per visited neuron
// instead of two: measured ~10% faster at large batch), rebuilt whenever either source tensor's
// version counter, storage or dtype changes, so in-place updates are never missed.
struct Prepared {
  bool leaf;
  at::Tensor nw, nb, a, b;            // form A: leaf_w1, leaf_b1; form B: out_weight, out_bias
  c10::optional<at::Tensor> w2, b2;   // form A only
  int64_t act;
  bool tie_ge;
  bool bf16 = false;                  // run on a bfloat16 copy of the weights (x, sums and out stay float32)
  at::Tensor packed;
  int64_t packed_versions[2] = {-1, -1};
  const void* packed_ptrs[2] = {nullptr, nullptr};
  // The tensors the kernel reads when they cannot be the weights themselves: bf16, the weights rounded
  // once; or a strided weight (a transposed Linear weight read as out_weight, say), a contiguous copy,
  // which the kernel would otherwise make on every call (the whole layer, ~16 ms at UltraFastBERT's
  // shape). Rebuilt when a source changes (version counter, storage, shape), never per call.
  at::Tensor copies[6];
  int64_t copy_versions[6] = {-1, -1, -1, -1, -1, -1};
  const void* copy_ptrs[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

  bool strided() const {
    return !(nw.is_contiguous() && nb.is_contiguous() && a.is_contiguous() && b.is_contiguous() &&
             (!w2 || !w2->defined() || w2->is_contiguous()) && (!b2 || !b2->defined() || b2->is_contiguous()));
  }

  void refresh_copies() {
    const at::Tensor* src[6] = {&nw, &nb, &a, &b, w2 && w2->defined() ? &*w2 : nullptr, b2 && b2->defined() ? &*b2 : nullptr};
    bool stale = false;
    for (int i = 0; i < 6 && !stale; ++i)
      if (src[i] && (!copies[i].defined() || src[i]->_version() != copy_versions[i] || src[i]->data_ptr() != copy_ptrs[i] ||
                     !copies[i].sizes().equals(src[i]->sizes())))
        stale = true;
    if (!stale) return;
    for (int i = 0; i < 6; ++i) {
      if (!src[i]) { copies[i] = at::Tensor(); continue; }
      copies[i] = bf16 ? src[i]->to(at::kBFloat16).contiguous().clone()  // clone: never an alias of a bf16 source
                       : src[i]->contiguous();                             // the very tensor when contiguous already
      copy_versions[i] = src[i]->_version();
      copy_ptrs[i] = src[i]->data_ptr();
    }
    packed = at::Tensor();  // the copies are new tensors: repack
  }

  at::Tensor call(const at::Tensor& x) {
    const bool copied = bf16 || strided();
    if (copied) refresh_copies();
    const at::Tensor& NW = copied ? copies[0] : nw;
    const at::Tensor& NB = copied ? copies[1] : nb;
    const at::Tensor& A = copied ? copies[2] : a;
    const at::Tensor& B = copied ? copies[3] : b;
    if (leaf) {
      if (!copied) return leaf_mlp_tree(x, nw, nb, a, b, w2, b2, act, tie_ge, -1);
      c10::optional<at::Tensor> W2, B2;
      if (copies[4].defined()) W2 = copies[4];
      if (copies[5].defined()) B2 = copies[5];
      return leaf_mlp_tree(x, NW, NB, A, B, W2, B2, act, tie_ge, -1);
    }
    const bool dtypes_ok = x.scalar_type() == NW.scalar_type() || (x.scalar_type() == at::kFloat && NW.scalar_type() == at::kBFloat16);
    if (NW.dim() == 3 && A.dim() == 3 && NW.scalar_type() == A.scalar_type() && dtypes_ok) {
      if (!packed.defined() || NW._version() != packed_versions[0] || A._version() != packed_versions[1] ||
          NW.data_ptr() != packed_ptrs[0] || A.data_ptr() != packed_ptrs[1] || packed.scalar_type() != NW.scalar_type() ||
          packed.size(0) != NW.size(0) || packed.size(1) != NW.size(1) || packed.size(2) != NW.size(2) + A.size(2)) {
        packed = at::cat({NW, A}, 2).contiguous();
        packed_versions[0] = NW._version(); packed_versions[1] = A._version();
        packed_ptrs[0] = NW.data_ptr(); packed_ptrs[1] = A.data_ptr();
      }
      return neuron_tree(x, NW, NB, A, B, act, tie_ge, -1, packed);
    }
    return neuron_tree(x, NW, NB, A, B, act, tie_ge, -1);
  }
};

}  // namespace fff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fffcompile fused descent kernels (CPU)";
  m.def("leaf_mlp_tree", &fff::leaf_mlp_tree, "form A: leaf-MLP tree, hard descent",
        py::arg("x"), py::arg("node_weight"), py::arg("node_bias"), py::arg("leaf_w1"), py::arg("leaf_b1"),
        py::arg("leaf_w2"), py::arg("leaf_b2"), py::arg("act"), py::arg("tie_ge"), py::arg("isa") = -1);
  m.def("neuron_tree", &fff::neuron_tree, "form B: neuron tree, hard descent",
        py::arg("x"), py::arg("node_weight"), py::arg("node_bias"), py::arg("out_weight"), py::arg("out_bias"),
        py::arg("act"), py::arg("tie_ge"), py::arg("isa") = -1, py::arg("packed") = py::none());
  py::class_<fff::Prepared>(m, "Prepared", py::module_local(), "one layer's weights, held for repeated calls: prepared(x) -> y")
      .def(py::init([](bool leaf, at::Tensor nw, at::Tensor nb, at::Tensor a, at::Tensor b, c10::optional<at::Tensor> w2,
                       c10::optional<at::Tensor> b2, int64_t act, bool tie_ge, bool bf16) {
             return fff::Prepared{leaf, nw, nb, a, b, w2, b2, act, tie_ge, bf16};
           }),
           py::arg("leaf"), py::arg("node_weight"), py::arg("node_bias"), py::arg("a"), py::arg("b"), py::arg("leaf_w2"),
           py::arg("leaf_b2"), py::arg("act"), py::arg("tie_ge"), py::arg("bf16") = false)
      .def("__call__", &fff::Prepared::call, py::arg("x"));
  m.def("_tune", [](int child_mode, int child_mode_a) { fff::g_child_mode = child_mode; fff::g_child_mode_a = child_mode_a; },
        "set tuning knobs (experiments only)");
  m.def("_tune_grouped", [](int64_t min_b, int64_t min_a, int64_t bucket_rows, int prefetch, int dynamic) {
          const auto before = std::make_tuple(fff::g_group_min_b, fff::g_group_min_a, fff::g_bucket_rows, fff::g_subtree_prefetch, fff::g_dynamic);
          fff::g_group_min_b = min_b; fff::g_group_min_a = min_a; fff::g_bucket_rows = std::max<int64_t>(1, bucket_rows);
          fff::g_subtree_prefetch = prefetch; fff::g_dynamic = dynamic;
          return before;
        }, "subtree-blocked path: rows from which it runs (form B, form A), rows per bucket, prefetch (0-2), dynamic "
           "thread chunks (0/1); returns the previous values (tests and experiments only)");
  m.def("isa", []() { return std::string(fff::isa_name(fff::g_isa)); }, "instruction set chosen at load");
  m.def("_threads_used", []() {
          std::mutex lock;
          std::set<std::thread::id> ids;
          at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
            std::lock_guard<std::mutex> guard(lock);
            ids.insert(std::this_thread::get_id());
          });
          return static_cast<int64_t>(ids.size());
        }, "distinct threads that ran a parallel_for of at::get_num_threads() one-element tasks (a build check: "
           "1 when the extension was compiled without OpenMP)");
}
