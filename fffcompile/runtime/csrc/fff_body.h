// The fused descent, written once over a vector-traits type and included once per instruction
// set (see fff_kernels.cpp): no include guard on purpose. Each inclusion sits inside its own
// namespace and `#pragma GCC target` region, which supplies
//
//   template <class S> struct VecFor { using type = ...; };   // storage type S -> vector traits
//
// The per-row functions are templated on the weights' storage type S and x / out's storage type XS
// (XS = S, or float32 x / out with bfloat16 weights: the optional reduced-precision weight copy);
// the subtree-blocked functions read x and y rows already in the accumulation type (GroupRows).
//
// A vector traits type V has: S (storage scalar), A (accumulation scalar: float for the 16-bit
// types, else S), R (register), W (lanes), zero(), set1(A), load(const S*) (converting to A),
// loadA(const A*), storeA(A*, R), fma(a, b, c) = a * b + c, add(a, b), hsum(R).
//
// Math (FORMS.md): form A descends n = 2n + 1 + [z_n >= 0] (tie "ge") or [z_n > 0] (tie "gt")
// D times, then y = act(x W1_j + b1_j) W2_j + b2_j (linear leaves: y = act(x W1_j + b1_j));
// form B sums act(a_{p,n}) V_{p,n} over the D + 1 neurons on each tree's path.

template <class S>
using Vec = typename VecFor<S>::type;

// Prefetch [p, p + bytes) into cache, one hint per 64-byte line.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}


// z[r] = x[r] . w[r] (length n) for NR rows at once: independent streams keep several loads in flight.
template <class V, int NR>
inline void dots(const typename V::A* const* x, const typename V::S* const* w, int64_t n, typename V::A* z) {
  using A = typename V::A;
  using R = typename V::R;
  constexpr int W = V::W;
  constexpr int U = NR >= 4 ? 2 : (NR == 1 ? 8 : 4);
  R acc[NR][U];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = V::zero();
  int64_t d = 0;
  for (; d + U * W <= n; d += U * W)
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < NR; ++r) acc[r][u] = V::fma(V::loadA(x[r] + d + u * W), V::load(w[r] + d + u * W), acc[r][u]);
  for (; d + W <= n; d += W)
    for (int r = 0; r < NR; ++r) acc[r][0] = V::fma(V::loadA(x[r] + d), V::load(w[r] + d), acc[r][0]);
  for (int r = 0; r < NR; ++r) {
    R s = acc[r][0];
    for (int u = 1; u < U; ++u) s = V::add(s, acc[r][u]);
    A t = V::hsum(s);
    for (int64_t e = d; e < n; ++e) t += x[r][e] * static_cast<A>(w[r][e]);
    z[r] = t;
  }
}

// dots<V, NR> for the run-time row count nr (1..4) of a block of rows.
template <class V>
inline void dots_rows(int nr, const typename V::A* const* x, const typename V::S* const* w, int64_t n, typename V::A* z) {
  switch (nr) {
    case 4: dots<V, 4>(x, w, n, z); break;
    case 3: dots<V, 3>(x, w, n, z); break;
    case 2: dots<V, 2>(x, w, n, z); break;
    default: dots<V, 1>(x, w, n, z); break;
  }
}

// y[r][j0 : j0 + MV W] = bias + sum_k a[r][k] B[k][j0 : ...] for NR rows: one pass over B feeds NR rows.
// KU independent accumulator sets over k hide the FMA latency when NR * MV is small.
template <class V, int NR, int MV, int KU>
inline void gemm_block(const typename V::A* const* a, const typename V::S* B, int64_t K, int64_t ldb,
                       const typename V::S* bias, typename V::A* const* y, int64_t j0) {
  using R = typename V::R;
  constexpr int W = V::W;
  R acc[KU][NR][MV];
  for (int u = 0; u < KU; ++u)
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < MV; ++v) acc[u][r][v] = V::zero();
  int64_t k = 0;
  for (; k + KU <= K; k += KU)
    for (int u = 0; u < KU; ++u) {
      const typename V::S* row = B + (k + u) * ldb + j0;
      R b[MV];
      for (int v = 0; v < MV; ++v) b[v] = V::load(row + v * W);
      for (int r = 0; r < NR; ++r) {
        R s = V::set1(a[r][k + u]);
        for (int v = 0; v < MV; ++v) acc[u][r][v] = V::fma(s, b[v], acc[u][r][v]);
      }
    }
  for (; k < K; ++k) {
    const typename V::S* row = B + k * ldb + j0;
    for (int r = 0; r < NR; ++r) {
      R s = V::set1(a[r][k]);
      for (int v = 0; v < MV; ++v) acc[0][r][v] = V::fma(s, V::load(row + v * W), acc[0][r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) {
      R s = acc[0][r][v];
      for (int u = 1; u < KU; ++u) s = V::add(s, acc[u][r][v]);
      if (bias) s = V::add(s, V::load(bias + j0 + v * W));
      V::storeA(y[r] + j0 + v * W, s);
    }
}

// Y[r][0:m] = bias[0:m] + a[r][0:K] @ B (B is K x m, row stride ldb), NR rows (1..4).
template <class V, int NR>
inline void gemm_rows(const typename V::A* const* a, const typename V::S* B, int64_t K, int64_t m, int64_t ldb,
                      const typename V::S* bias, typename V::A* const* y) {
  using A = typename V::A;
  constexpr int W = V::W;
  constexpr int MVMAX = NR >= 3 ? 2 : 4;
  int64_t j = 0;
  for (; j + MVMAX * W <= m; j += MVMAX * W)
    gemm_block<V, NR, MVMAX, (NR * MVMAX >= 8 ? 1 : 8 / (NR * MVMAX))>(a, B, K, ldb, bias, y, j);
  if (MVMAX > 2)
    for (; j + 2 * W <= m; j += 2 * W) gemm_block<V, NR, 2, (2 * NR >= 8 ? 1 : 8 / (2 * NR))>(a, B, K, ldb, bias, y, j);
  for (; j + W <= m; j += W) gemm_block<V, NR, 1, (NR >= 4 ? 2 : 8 / NR)>(a, B, K, ldb, bias, y, j);
  for (; j < m; ++j)
    for (int r = 0; r < NR; ++r) {
      A s = bias ? static_cast<A>(bias[j]) : A(0);
      for (int64_t k = 0; k < K; ++k) s += a[r][k] * static_cast<A>(B[k * ldb + j]);
      y[r][j] = s;
    }
}

template <class V>
inline void gemm_rows_n(int nr, const typename V::A* const* a, const typename V::S* B, int64_t K, int64_t m,
                        int64_t ldb, const typename V::S* bias, typename V::A* const* y) {
  switch (nr) {
    case 4: gemm_rows<V, 4>(a, B, K, m, ldb, bias, y); break;
    case 3: gemm_rows<V, 3>(a, B, K, m, ldb, bias, y); break;
    case 2: gemm_rows<V, 2>(a, B, K, m, ldb, bias, y); break;
    default: gemm_rows<V, 1>(a, B, K, m, ldb, bias, y); break;
  }
}

// y[0:m] += alpha * v[0:m]
template <class V>
inline void axpy(typename V::A* y, typename V::A alpha, const typename V::S* v, int64_t m) {
  constexpr int W = V::W;
  auto s = V::set1(alpha);
  int64_t j = 0;
  for (; j + 4 * W <= m; j += 4 * W)
    for (int u = 0; u < 4; ++u) V::storeA(y + j + u * W, V::fma(s, V::load(v + j + u * W), V::loadA(y + j + u * W)));
  for (; j + W <= m; j += W) V::storeA(y + j, V::fma(s, V::load(v + j), V::loadA(y + j)));
  for (; j < m; ++j) y[j] += alpha * static_cast<typename V::A>(v[j]);
}

template <class A>
inline void activate(int act, A* h, int64_t m) {
  if (act == ACT_IDENTITY) return;
  for (int64_t j = 0; j < m; ++j) h[j] = activation<A>(act, h[j]);
}

// x rows as accumulation-type pointers: the row itself when S == A, else a converted copy in buf.
template <class S, class A>
inline const A* row_as_acc(const S* x, int64_t n, A* buf) {
  if constexpr (std::is_same<S, A>::value) {
    return x;
  } else {
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<A>(x[d]);
    return buf;
  }
}

// y[0:m] = start[0:m] + sum_k alpha[k] * v[k][0:m]: one pass over y with K independent row streams
// (form B's output: the K = P (D + 1) path neurons' rows, all addresses known before the pass).
// start: the output bias (storage type), or y itself to add onto a running sum.
template <class V, class B>
inline void gather_sum(typename V::A* y, const B* start, const typename V::S* const* v,
                       const typename V::A* alpha, int64_t K, int64_t m) {
  using A = typename V::A;
  using R = typename V::R;
  constexpr int W = V::W;
  const auto first = [start](int64_t j) -> R {
    if constexpr (std::is_same<B, A>::value) return V::loadA(start + j);
    else return V::load(start + j);
  };
  int64_t j = 0;
  for (; j + 4 * W <= m; j += 4 * W) {
    R acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = first(j + u * W);
    for (int64_t k = 0; k < K; ++k) {
      const R s = V::set1(alpha[k]);
      for (int u = 0; u < 4; ++u) acc[u] = V::fma(s, V::load(v[k] + j + u * W), acc[u]);
    }
    for (int u = 0; u < 4; ++u) V::storeA(y + j + u * W, acc[u]);
  }
  for (; j + W <= m; j += W) {
    R acc = first(j);
    for (int64_t k = 0; k < K; ++k) acc = V::fma(V::set1(alpha[k]), V::load(v[k] + j), acc);
    V::storeA(y + j, acc);
  }
  for (; j < m; ++j) {
    A t = static_cast<A>(start[j]);
    for (int64_t k = 0; k < K; ++k) t += alpha[k] * static_cast<A>(v[k][j]);
    y[j] = t;
  }
}

// ------------------------------------------------------------------------------------------- form A

// Route rows [begin, end) to their leaves (leaf[r]), NR = 4 rows interleaved per level.
template <class S, class XS>
void leaf_route(const LeafArgs& p, int64_t begin, int64_t end, int64_t* leaf) {
  using V = Vec<S>;
  using A = typename V::A;
  const XS* X = static_cast<const XS*>(p.x);
  const S* NW = static_cast<const S*>(p.node_weight);
  const S* NB = static_cast<const S*>(p.node_bias);
  const int64_t d = p.d_in;
  const int64_t first_leaf = (int64_t(1) << p.depth) - 1;
  std::vector<A> buf(std::is_same<XS, A>::value ? 0 : 4 * d);
  for (int64_t r0 = begin; r0 < end; r0 += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, end - r0));
    const A* xr[4];
    const S* wr[4];
    int64_t node[4] = {0, 0, 0, 0};
    A z[4];
    for (int r = 0; r < nr; ++r) xr[r] = row_as_acc<XS, A>(X + (r0 + r) * d, d, buf.data() + r * d);
    for (int r = nr; r < 4; ++r) xr[r] = xr[0];
    for (int level = 0; level < p.depth; ++level) {
      for (int r = 0; r < 4; ++r) wr[r] = NW + node[r < nr ? r : 0] * d;
      if (level + 1 < p.depth && p.child_mode == 2)  // both children are adjacent rows: fetch them while this level computes
        for (int r = 0; r < nr; ++r) prefetch_bytes(NW + (2 * node[r] + 1) * d, 2 * d * int64_t(sizeof(S)));
      dots_rows<V>(nr, xr, wr, d, z);
      for (int r = 0; r < nr; ++r) {
        const A zz = z[r] + static_cast<A>(NB[node[r]]);
        const bool right = p.tie_ge ? (zz >= A(0)) : (zz > A(0));
        node[r] = 2 * node[r] + 1 + (right ? 1 : 0);
      }
    }
    for (int r = 0; r < nr; ++r) leaf[r0 - begin + r] = node[r] - first_leaf;
  }
}

// Leaf MLPs for rows rows[0:count), all routed to leaf j: blocks of 4 rows share one pass over the weights.
template <class S, class XS>
void leaf_apply(const LeafArgs& p, int64_t j, const int64_t* rows, int64_t count) {
  using V = Vec<S>;
  using A = typename V::A;
  const XS* X = static_cast<const XS*>(p.x);
  XS* Y = static_cast<XS*>(p.out);
  const int64_t d = p.d_in, l = p.width, m = p.d_out;
  const S* W1 = static_cast<const S*>(p.leaf_w1) + j * d * l;
  const S* B1 = static_cast<const S*>(p.leaf_b1) + j * l;
  const S* W2 = p.leaf_w2 ? static_cast<const S*>(p.leaf_w2) + j * l * m : nullptr;
  const S* B2 = p.leaf_b2 ? static_cast<const S*>(p.leaf_b2) + j * m : nullptr;
  constexpr bool same = std::is_same<XS, A>::value;
  std::vector<A> xbuf(same ? 0 : 4 * d), hbuf(4 * l), ybuf(same ? 0 : 4 * m);
  for (int64_t i = 0; i < count; i += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, count - i));
    const A* xr[4];
    A* hr[4];
    A* yr[4];
    for (int r = 0; r < nr; ++r) {
      const int64_t row = rows[i + r];
      xr[r] = row_as_acc<XS, A>(X + row * d, d, xbuf.data() + r * d);
      hr[r] = hbuf.data() + r * l;
      if constexpr (same) yr[r] = reinterpret_cast<A*>(Y + row * m);
      else yr[r] = ybuf.data() + r * m;
    }
    if (W2) {
      gemm_rows_n<V>(nr, xr, W1, d, l, l, B1, hr);
      for (int r = 0; r < nr; ++r) activate<A>(p.act, hr[r], l);
      const A* hc[4] = {hr[0], hr[1], hr[2], hr[3]};
      gemm_rows_n<V>(nr, hc, W2, l, m, m, B2, yr);
    } else {
      gemm_rows_n<V>(nr, xr, W1, d, l, l, B1, yr);
      for (int r = 0; r < nr; ++r) activate<A>(p.act, yr[r], l);
    }
    if constexpr (!same)
      for (int r = 0; r < nr; ++r) {
        XS* out = Y + rows[i + r] * m;
        for (int64_t o = 0; o < m; ++o) out[o] = static_cast<XS>(yr[r][o]);
      }
  }
}

// ------------------------------------------------------------------------------------------- form B

// One level of form B's descent for nr rows (pointers past nr repeat row 0) at nodes node[0:nr):
// a = x . W_node + b; slot k of each row's alpha / vrow (rows `stride` apart) gets act(a) and the
// node's V row; node moves to the child the tie rule picks.
template <class V, class S>
inline void neuron_level(const NeuronArgs& p, int nr, const typename V::A* const* xr, const S* TW, const S* TB,
                         const S* TV, int64_t* node, int64_t stride, int64_t k, typename V::A* alpha, const S** vrow) {
  using A = typename V::A;
  const S* wr[4];
  A z[4];
  for (int r = 0; r < 4; ++r) wr[r] = TW + node[r < nr ? r : 0] * p.w_stride;
  dots_rows<V>(nr, xr, wr, p.d_in, z);
  for (int r = 0; r < nr; ++r) {
    const A a = z[r] + static_cast<A>(TB[node[r]]);
    const bool right = p.tie_ge ? (a >= A(0)) : (a > A(0));
    alpha[r * stride + k] = activation<A>(p.act, a);
    vrow[r * stride + k] = TV + node[r] * p.v_stride;
    node[r] = 2 * node[r] + 1 + (right ? 1 : 0);
  }
}

// Per block of up to 4 rows: descend every tree recording each path neuron's act(a) and its
// output row, then write each row's output in one pass over all its path rows (gather_sum).
template <class S, class XS>
void neuron_rows(const NeuronArgs& p, int64_t begin, int64_t end) {
  using V = Vec<S>;
  using A = typename V::A;
  const XS* X = static_cast<const XS*>(p.x);
  XS* Y = static_cast<XS*>(p.out);
  const S* NW = static_cast<const S*>(p.node_weight);
  const S* NB = static_cast<const S*>(p.node_bias);
  const S* OW = static_cast<const S*>(p.out_weight);
  const S* OB = static_cast<const S*>(p.out_bias);
  const int64_t d = p.d_in, m = p.d_out, n = p.nodes;
  const int64_t sw = p.w_stride, sv = p.v_stride;   // row strides: d and m, or d + m for the packed [W | V] layout
  const int64_t K = p.trees * (p.depth + 1);        // path neurons per row
  constexpr bool same = std::is_same<XS, A>::value;
  std::vector<A> xbuf(same ? 0 : 4 * d), ybuf(same ? 0 : 4 * m), alpha(4 * K);
  std::vector<const S*> vrow(4 * K);
  for (int64_t r0 = begin; r0 < end; r0 += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, end - r0));
    const A* xr[4];
    for (int r = 0; r < nr; ++r) xr[r] = row_as_acc<XS, A>(X + (r0 + r) * d, d, xbuf.data() + r * d);
    for (int r = nr; r < 4; ++r) xr[r] = xr[0];
    int64_t k = 0;
    for (int64_t t = 0; t < p.trees; ++t) {
      const S* TW = NW + t * n * sw;
      const S* TB = NB + t * n;
      const S* TV = OW + t * n * sv;
      int64_t node[4] = {0, 0, 0, 0};
      for (int level = 0; level <= p.depth; ++level, ++k) {
        if (level < p.depth && p.child_mode == 2)  // both children's W rows, a level ahead of their use
          for (int r = 0; r < nr; ++r) prefetch_bytes(TW + (2 * node[r] + 1) * sw, (sw + d) * int64_t(sizeof(S)));
        if (level < p.depth && p.child_mode == 1)  // the first 4 lines of both children's W rows: starts their streams
          for (int r = 0; r < nr; ++r) {
            prefetch_bytes(TW + (2 * node[r] + 1) * sw, 256);
            prefetch_bytes(TW + (2 * node[r] + 2) * sw, 256);
          }
        neuron_level<V>(p, nr, xr, TW, TB, TV, node, K, k, alpha.data(), vrow.data());
      }
    }
    for (int r = 0; r < nr; ++r) {
      A* y = same ? reinterpret_cast<A*>(Y + (r0 + r) * m) : ybuf.data() + r * m;
      gather_sum<V>(y, OB, vrow.data() + r * K, alpha.data() + r * K, K, m);
      if constexpr (!same) {
        XS* out = Y + (r0 + r) * m;
        for (int64_t o = 0; o < m; ++o) out[o] = static_cast<XS>(y[o]);
      }
    }
  }
}

// ------------------------------------------------------------------------------- subtree-blocked path
//
// For many rows (run_neuron / run_leaf in fff_kernels.cpp): the top `split` levels of a tree run
// per row as above (their nodes are few and stay in L2), the rows are then bucketed by their node
// at level `split` (counting sort), and each bucket descends the rest of its subtree level by
// level: at each level the bucket's rows are kept sorted by current node (a stable split of each
// node's run into its children's runs, no sort), each node's W row (and form B's V row) is
// loaded once and used by all of that node's rows, kGroupRows rows per pass while it sits in L1.
// A subtree's levels are contiguous node ranges visited in increasing order, so its rows stream
// forward through memory once per bucket instead of once per row, and the bucket's x and y rows
// stay in L2 across the subtree's levels.

// z[r] = x[r] . w for NR rows sharing one weight row w (loaded once per NR rows).
template <class V, int NR>
inline void dots_shared(const typename V::A* const* x, const typename V::S* w, int64_t n, typename V::A* z) {
  using A = typename V::A;
  using R = typename V::R;
  constexpr int W = V::W;
  constexpr int U = NR >= 4 ? 2 : 4;
  R acc[NR][U];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = V::zero();
  int64_t d = 0;
  for (; d + U * W <= n; d += U * W)
    for (int u = 0; u < U; ++u) {
      const R wv = V::load(w + d + u * W);
      for (int r = 0; r < NR; ++r) acc[r][u] = V::fma(V::loadA(x[r] + d + u * W), wv, acc[r][u]);
    }
  for (; d + W <= n; d += W) {
    const R wv = V::load(w + d);
    for (int r = 0; r < NR; ++r) acc[r][0] = V::fma(V::loadA(x[r] + d), wv, acc[r][0]);
  }
  for (int r = 0; r < NR; ++r) {
    R s = acc[r][0];
    for (int u = 1; u < U; ++u) s = V::add(s, acc[r][u]);
    A t = V::hsum(s);
    for (int64_t e = d; e < n; ++e) t += x[r][e] * static_cast<A>(w[e]);
    z[r] = t;
  }
}

// y[r][0:m] += alpha[r] * v[0:m] for NR rows sharing one row v (loaded once per NR rows).
template <class V, int NR>
inline void axpy_shared(typename V::A* const* y, const typename V::A* alpha, const typename V::S* v, int64_t m) {
  using R = typename V::R;
  constexpr int W = V::W;
  R s[NR];
  for (int r = 0; r < NR; ++r) s[r] = V::set1(alpha[r]);
  int64_t j = 0;
  for (; j + 2 * W <= m; j += 2 * W) {
    const R v0 = V::load(v + j), v1 = V::load(v + j + W);
    for (int r = 0; r < NR; ++r) {
      V::storeA(y[r] + j, V::fma(s[r], v0, V::loadA(y[r] + j)));
      V::storeA(y[r] + j + W, V::fma(s[r], v1, V::loadA(y[r] + j + W)));
    }
  }
  for (; j + W <= m; j += W) {
    const R v0 = V::load(v + j);
    for (int r = 0; r < NR; ++r) V::storeA(y[r] + j, V::fma(s[r], v0, V::loadA(y[r] + j)));
  }
  for (; j < m; ++j)
    for (int r = 0; r < NR; ++r) y[r][j] += alpha[r] * static_cast<typename V::A>(v[j]);
}

constexpr int kGroupRows = 4;  // rows per pass over a shared weight row

template <class V>
inline void dots_shared_n(int nr, const typename V::A* const* x, const typename V::S* w, int64_t n, typename V::A* z) {
  switch (nr) {
    case 4: dots_shared<V, 4>(x, w, n, z); break;
    case 3: dots_shared<V, 3>(x, w, n, z); break;
    case 2: dots_shared<V, 2>(x, w, n, z); break;
    default: dots_shared<V, 1>(x, w, n, z); break;
  }
}

template <class V>
inline void axpy_shared_n(int nr, typename V::A* const* y, const typename V::A* alpha, const typename V::S* v, int64_t m) {
  switch (nr) {
    case 4: axpy_shared<V, 4>(y, alpha, v, m); break;
    case 3: axpy_shared<V, 3>(y, alpha, v, m); break;
    case 2: axpy_shared<V, 2>(y, alpha, v, m); break;
    default: axpy_shared<V, 1>(y, alpha, v, m); break;
  }
}

// One node's run: order[start : start + count) are the block rows now at node.
struct NodeRun { int64_t node; int32_t start, count; };

struct RunScratch {
  std::vector<int32_t> order, scratch;
  std::vector<NodeRun> runs, next;
};

// Descend `levels` levels from node `root` for the block rows rows[0:count), level by level.
// visit(node, rows, nr, a) gets each pass's rows and their pre-activations a = x . W_node + b_node;
// right[row] is the row's last decision (the spec's tie rule on a). At the end s.order / s.runs
// hold the rows grouped by their last node.
template <class V, class Visit>
inline void descend_runs(const typename V::A* const* xr, const int32_t* rows_in, int32_t count, int64_t root,
                         int levels, const typename V::S* TW, int64_t sw, const typename V::S* TB, int64_t d, bool tie_ge,
                         int64_t prefetch_w, const typename V::S* TV, int64_t sv, int64_t prefetch_v, uint8_t* right,
                         RunScratch& s, Visit visit) {
  using A = typename V::A;
  using S = typename V::S;
  s.order.assign(rows_in, rows_in + count);
  s.scratch.resize(count);
  s.runs.clear();
  s.runs.push_back({root, 0, count});
  for (int level = 0; level < levels; ++level) {
    for (size_t g = 0; g < s.runs.size(); ++g) {
      const NodeRun run = s.runs[g];
      const S* w = TW + run.node * sw;
      if (g + 1 < s.runs.size() && g_subtree_prefetch > 0) {  // the next run's rows: addresses known, fetch them early
        const int64_t ahead = s.runs[g + 1].node;
        const int64_t bytes = g_subtree_prefetch == 1 ? 256 : prefetch_w * int64_t(sizeof(S));
        prefetch_bytes(TW + ahead * sw, bytes);
        if (prefetch_v > 0) prefetch_bytes(TV + ahead * sv, g_subtree_prefetch == 1 ? 256 : prefetch_v * int64_t(sizeof(S)));
      }
      const A bias = static_cast<A>(TB[run.node]);
      for (int32_t i = run.start; i < run.start + run.count; i += kGroupRows) {
        const int nr = static_cast<int>(std::min<int32_t>(kGroupRows, run.start + run.count - i));
        const A* xs[kGroupRows];
        int32_t rows[kGroupRows];
        A a[kGroupRows];
        for (int r = 0; r < nr; ++r) { rows[r] = s.order[i + r]; xs[r] = xr[rows[r]]; }
        dots_shared_n<V>(nr, xs, w, d, a);
        for (int r = 0; r < nr; ++r) {
          a[r] += bias;
          right[rows[r]] = tie_ge ? (a[r] >= A(0)) : (a[r] > A(0));
        }
        visit(run.node, rows, nr, a);
      }
    }
    if (level + 1 == levels) break;
    s.next.clear();
    for (const NodeRun& run : s.runs) {  // stable split: the left child's rows, then the right child's
      int32_t out = run.start;
      for (int32_t i = run.start; i < run.start + run.count; ++i)
        if (!right[s.order[i]]) s.scratch[out++] = s.order[i];
      const int32_t left = out - run.start;
      for (int32_t i = run.start; i < run.start + run.count; ++i)
        if (right[s.order[i]]) s.scratch[out++] = s.order[i];
      if (left > 0) s.next.push_back({2 * run.node + 1, run.start, left});
      if (run.count - left > 0) s.next.push_back({2 * run.node + 2, run.start + left, run.count - left});
    }
    s.order.swap(s.scratch);
    s.runs.swap(s.next);
  }
}

// Form B, tree c.tree, rows [begin, end): the top c.split levels per row (4 rows interleaved),
// y = out_bias + their terms (tree 0) or y += their terms (later trees); c.node[row] = the row's
// node at level c.split.
template <class S>
void neuron_top(const NeuronArgs& p, const GroupCtx& c, int64_t begin, int64_t end) {
  using V = Vec<S>;
  using A = typename V::A;
  const int64_t m = p.d_out, n = p.nodes, sw = p.w_stride, sv = p.v_stride;
  const S* TW = static_cast<const S*>(p.node_weight) + c.tree * n * sw;
  const S* TB = static_cast<const S*>(p.node_bias) + c.tree * n;
  const S* TV = static_cast<const S*>(p.out_weight) + c.tree * n * sv;
  const S* OB = static_cast<const S*>(p.out_bias);
  const int K = c.split;
  A alpha[4 * 64];
  const S* vrow[4 * 64];
  for (int64_t r0 = begin; r0 < end; r0 += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, end - r0));
    const A* xr[4];
    int64_t node[4] = {0, 0, 0, 0};
    for (int r = 0; r < 4; ++r) xr[r] = static_cast<const A*>(c.xr[r0 + (r < nr ? r : 0)]);
    for (int level = 0; level < K; ++level) neuron_level<V>(p, nr, xr, TW, TB, TV, node, K, level, alpha, vrow);
    for (int r = 0; r < nr; ++r) {
      A* y = static_cast<A*>(c.yr[r0 + r]);
      if (c.tree == 0) gather_sum<V>(y, OB, vrow + r * K, alpha + r * K, K, m);
      else gather_sum<V>(y, static_cast<const typename V::A*>(y), vrow + r * K, alpha + r * K, K, m);  // later trees: onto y
      c.node[r0 + r] = node[r];
    }
  }
}

// Form B, tree c.tree: the subtree under node `root` (at level c.split) for the block rows
// rows[0:count), level by level; y[row] += act(a) V[node] at every level.
template <class S>
void neuron_subtree(const NeuronArgs& p, const GroupCtx& c, int64_t root, const int32_t* rows, int32_t count) {
  using V = Vec<S>;
  using A = typename V::A;
  const int64_t d = p.d_in, m = p.d_out, n = p.nodes, sw = p.w_stride, sv = p.v_stride;
  const S* TW = static_cast<const S*>(p.node_weight) + c.tree * n * sw;
  const S* TB = static_cast<const S*>(p.node_bias) + c.tree * n;
  const S* TV = static_cast<const S*>(p.out_weight) + c.tree * n * sv;
  const bool packed = TV == TW + d && sw == d + m;  // [W | V] rows: one prefetch covers both
  thread_local RunScratch s;
  thread_local std::vector<uint8_t> right;
  right.resize(c.rows);
  const A* const* xr = reinterpret_cast<const A* const*>(c.xr);
  A* const* yr = reinterpret_cast<A* const*>(c.yr);
  descend_runs<V>(xr, rows, count, root, p.depth + 1 - c.split, TW, sw, TB, d, p.tie_ge, packed ? d + m : d, TV, sv,
                  packed ? 0 : m, right.data(), s, [&](int64_t node, const int32_t* rr, int nr, A* a) {
                    A al[kGroupRows];
                    A* ys[kGroupRows];
                    for (int r = 0; r < nr; ++r) { al[r] = activation<A>(p.act, a[r]); ys[r] = yr[rr[r]]; }
                    axpy_shared_n<V>(nr, ys, al, TV + node * sv, m);
                  });
}

// Form A, rows [begin, end): the top c.split levels per row; c.node[row] = node at level c.split.
template <class S>
void leaf_top(const LeafArgs& p, const GroupCtx& c, int64_t begin, int64_t end) {
  using V = Vec<S>;
  using A = typename V::A;
  const S* NW = static_cast<const S*>(p.node_weight);
  const S* NB = static_cast<const S*>(p.node_bias);
  const int64_t d = p.d_in;
  for (int64_t r0 = begin; r0 < end; r0 += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, end - r0));
    const A* xr[4];
    const S* wr[4];
    int64_t node[4] = {0, 0, 0, 0};
    A z[4];
    for (int r = 0; r < 4; ++r) xr[r] = static_cast<const A*>(c.xr[r0 + (r < nr ? r : 0)]);
    for (int level = 0; level < c.split; ++level) {
      for (int r = 0; r < 4; ++r) wr[r] = NW + node[r < nr ? r : 0] * d;
      dots_rows<V>(nr, xr, wr, d, z);
      for (int r = 0; r < nr; ++r) {
        const A zz = z[r] + static_cast<A>(NB[node[r]]);
        node[r] = 2 * node[r] + 1 + ((p.tie_ge ? (zz >= A(0)) : (zz > A(0))) ? 1 : 0);
      }
    }
    for (int r = 0; r < nr; ++r) c.node[r0 + r] = node[r];
  }
}

// Form A: the subtree under `root` (level c.split < depth) for rows[0:count): leaf[row] for each.
template <class S>
void leaf_subtree(const LeafArgs& p, const GroupCtx& c, int64_t root, const int32_t* rows, int32_t count, int64_t* leaf) {
  using V = Vec<S>;
  using A = typename V::A;
  const S* NW = static_cast<const S*>(p.node_weight);
  const S* NB = static_cast<const S*>(p.node_bias);
  const int64_t d = p.d_in, first_leaf = (int64_t(1) << p.depth) - 1;
  thread_local RunScratch s;
  thread_local std::vector<uint8_t> right;
  right.resize(c.rows);
  descend_runs<V>(reinterpret_cast<const A* const*>(c.xr), rows, count, root, p.depth - c.split, NW, d, NB, d, p.tie_ge, d,
                  static_cast<const S*>(nullptr), 0, 0, right.data(), s, [](int64_t, const int32_t*, int, A*) {});
  for (const NodeRun& run : s.runs)
    for (int32_t i = run.start; i < run.start + run.count; ++i) {
      const int32_t row = s.order[i];
      leaf[row] = 2 * run.node + 1 + (right[row] ? 1 : 0) - first_leaf;
    }
}
