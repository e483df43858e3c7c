// Tests only: the AVX-512F intrinsics that namespace avx512_isa (fff_kernels.cpp) uses, declared
// inside that namespace over SIMDe's portable implementations (Debian's libsimde-dev), so that
// the AVX-512 path -- fff_body.h at 16 float / 8 double lanes, and the Vec structs as written --
// runs and is checked against reference.hard on a CPU without AVX-512
// (cpu_kernel.load_emulated_avx512(), tests/test_avx512_emulated.py). Compiled only with
// -DFFF_EMULATE_AVX512; the real build never includes it.
//
// Unqualified names inside avx512_isa find these before the global intrinsics. SIMDe 0.7.4 has
// no _mm512_reduce_add_ps/pd, _mm512_cvtepu16_epi32 or _mm512_cvtph_ps: they are written here
// lane by lane from Intel's definitions (the sum of the 16 / 8 lanes; zero-extension of 16
// unsigned 16-bit lanes to 32 bits; 16 IEEE half-precision lanes to float32).

using __m512 = simde__m512;
using __m512d = simde__m512d;
using __m512i = simde__m512i;
using __m256i = simde__m256i;

inline __m512 _mm512_setzero_ps() { return simde_mm512_setzero_ps(); }
inline __m512 _mm512_set1_ps(float a) { return simde_mm512_set1_ps(a); }
inline __m512 _mm512_loadu_ps(const float* p) { return simde_mm512_loadu_ps(p); }
inline void _mm512_storeu_ps(float* p, __m512 v) { simde_mm512_storeu_ps(p, v); }
inline __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) { return simde_mm512_fmadd_ps(a, b, c); }
inline __m512 _mm512_add_ps(__m512 a, __m512 b) { return simde_mm512_add_ps(a, b); }
inline __m512d _mm512_setzero_pd() { return simde_mm512_setzero_pd(); }
inline __m512d _mm512_set1_pd(double a) { return simde_mm512_set1_pd(a); }
inline __m512d _mm512_loadu_pd(const double* p) { return simde_mm512_loadu_pd(p); }
inline void _mm512_storeu_pd(double* p, __m512d v) { simde_mm512_storeu_pd(p, v); }
inline __m512d _mm512_fmadd_pd(__m512d a, __m512d b, __m512d c) { return simde_mm512_fmadd_pd(a, b, c); }
inline __m512d _mm512_add_pd(__m512d a, __m512d b) { return simde_mm512_add_pd(a, b); }
inline __m256i _mm256_loadu_si256(const __m256i* p) { return simde_mm256_loadu_si256(p); }
inline __m512 _mm512_castsi512_ps(__m512i v) { return simde_mm512_castsi512_ps(v); }
inline __m512i _mm512_slli_epi32(__m512i v, unsigned int n) { return simde_mm512_slli_epi32(v, n); }

// The sum of n lanes, pairwise (n a power of two).
template <class T>
inline T sum_lanes(T* lane, int n) {
  for (int half = n / 2; half >= 1; half /= 2)
    for (int i = 0; i < half; ++i) lane[i] += lane[i + half];
  return lane[0];
}

inline float _mm512_reduce_add_ps(__m512 v) {
  float lane[16];
  simde_mm512_storeu_ps(lane, v);
  return sum_lanes(lane, 16);
}

inline double _mm512_reduce_add_pd(__m512d v) {
  double lane[8];
  simde_mm512_storeu_pd(lane, v);
  return sum_lanes(lane, 8);
}

// 16 unsigned 16-bit lanes, each converted by `widen` into a 32-bit lane.
template <class T, class Widen>
inline void widen_u16(__m256i h, T* out, Widen widen) {
  uint16_t in[16];
  simde_mm256_storeu_si256(reinterpret_cast<simde__m256i*>(in), h);
  for (int i = 0; i < 16; ++i) out[i] = widen(in[i]);
}

inline __m512i _mm512_cvtepu16_epi32(__m256i h) {
  int32_t out[16];
  widen_u16(h, out, [](uint16_t u) { return static_cast<int32_t>(u); });
  return simde_mm512_loadu_si512(out);
}

inline __m512 _mm512_cvtph_ps(__m256i h) {
  float out[16];
  widen_u16(h, out, [](uint16_t u) { return static_cast<float>(c10::Half(u, c10::Half::from_bits())); });
  return simde_mm512_loadu_ps(out);
}
