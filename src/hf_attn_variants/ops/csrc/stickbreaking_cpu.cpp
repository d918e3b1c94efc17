// Stick-breaking attention forward on CPU: the blockwise algorithm of stickbreaking_torch._blockwise_forward, with
// the work split over torch's threads by (batch, kv head, query block) and each block's elementwise work fused.
//
// The PyTorch path spends as long on the elementwise work between its two matmuls (two sigmoids, a cumprod, three
// products: six passes over the scores) as on the matmuls, and runs its block loop in Python with every op split
// over the threads. Here each thread owns whole query blocks: for each key block (nearest first) one GEMM for the
// scores, one sweep per row for the weights (one exp per score, the stick as a running product), one GEMM into the
// output, and the same exact early exit once every row's stick is below e^-86 (fp32).
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// float: ATen's exp_u20 (the exp of its CPU flash attention, ~20 ulp): an error of d in exp(-z) moves 1 - beta by
// d * beta and beta by d * (1 - beta), so weights and stick stay within ~d of exact (the stick is a product of
// factors 1 - beta, and prod(1 - beta_l) * sum(beta_l) <= 1/e). double: SLEEF's 1-ulp exp.
template <typename scalar_t>
inline at::vec::Vectorized<scalar_t> fast_exp(const at::vec::Vectorized<scalar_t>& x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

constexpr int64_t kTileRows = 8;  // rows whose stick products run interleaved (independent multiply chains)

// One row of scores, in place (vectorised along the keys): x holds -z, keys in cache order, its `hidden` nearest keys
// (a suffix) causally hidden. Writes beta = 1 / (1 + e) to x and 1 - beta = e * beta to keep, e = exp(-z), with no
// cancellation for any z. Hidden keys (the suffix, and -z = +inf from the mask) get beta = 0 and 1 - beta = 1: they
// break nothing.
template <typename scalar_t>
inline void row_betas(scalar_t* x, scalar_t* keep, int64_t n, int64_t hidden, scalar_t max_abs_logit, bool clamp) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec one(1), zero(0), inf(std::numeric_limits<scalar_t>::infinity()), hi(max_abs_logit), lo(-max_abs_logit);
  const int64_t visible = n - std::min<int64_t>(n, std::max<int64_t>(0, hidden));
  std::fill(x + visible, x + n, scalar_t(0));
  std::fill(keep + visible, keep + n, scalar_t(1));
  int64_t c = 0;
  for (; c + Vec::size() <= visible; c += Vec::size()) {
    Vec neg_z = Vec::loadu(x + c);
    Vec masked = neg_z == inf;
    // maximum/minimum propagate NaN, as torch.clamp does.
    Vec e = fast_exp(clamp ? at::vec::minimum(at::vec::maximum(neg_z, lo), hi) : neg_z);
    Vec beta = one / (one + e);
    Vec::blendv(beta, zero, masked).store(x + c);
    Vec::blendv(e * beta, one, masked).store(keep + c);
  }
  for (; c < visible; ++c) {
    scalar_t neg_z = x[c];
    if (neg_z == std::numeric_limits<scalar_t>::infinity()) {
      x[c] = 0;
      keep[c] = 1;
      continue;
    }
    if (clamp && !std::isnan(neg_z)) neg_z = std::min(std::max(neg_z, -max_abs_logit), max_abs_logit);
    const scalar_t e = std::exp(neg_z), beta = scalar_t(1) / (scalar_t(1) + e);
    x[c] = beta;
    keep[c] = e * beta;
  }
}

// Weights of one (query block, key block) pair, in place. scores (rows, n) holds -z with the keys in cache order
// (column c = key j0 + c), so the nearest key is the last column; stick (rows,) is the stick left by nearer blocks and
// becomes the stick left after this one. Row t is query t % rows_per_group of its block; its `band - t % rows_per_group`
// nearest keys (a suffix of the row) are causally hidden. A score of +inf (a key the mask hides) gets beta = 0.
template <typename scalar_t>
void rows_block_weights(scalar_t* scores, scalar_t* stick, int64_t rows, int64_t n, int64_t rows_per_group,
                        int64_t band, scalar_t max_abs_logit, bool clamp, scalar_t* keep) {
  for (int64_t tile = 0; tile < rows; tile += kTileRows) {
    const int64_t tile_rows = std::min(kTileRows, rows - tile);
    for (int64_t t = 0; t < tile_rows; ++t) {
      row_betas<scalar_t>(scores + (tile + t) * n, keep + t * n, n, band - (tile + t) % rows_per_group,
                          max_abs_logit, clamp);
    }
    // Pass 2, nearest key first: A = beta * (stick before the key); the stick shrinks by 1 - beta per key. The rows of
    // the tile advance together so that their multiply chains overlap.
    scalar_t s[kTileRows];
    for (int64_t t = 0; t < tile_rows; ++t) s[t] = stick[tile + t];
    scalar_t* x0 = scores + tile * n;
    for (int64_t c = n - 1; c >= 0; --c) {
      for (int64_t t = 0; t < tile_rows; ++t) {
        const scalar_t beta = x0[t * n + c];
        x0[t * n + c] = s[t] * beta;
        s[t] *= keep[t * n + c];
      }
    }
    for (int64_t t = 0; t < tile_rows; ++t) stick[tile + t] = s[t];
  }
}

// Gradients of one (query block, key block) pair: the backward's counterpart of rows_block_weights (same layout, band
// and mask convention, the same weights recomputed). In: x (rows, n) holds -z, dov (rows, n) do_i . v_j. Out: x holds
// A, dov holds dL/dz; keep and beta are (kTileRows, n) scratch (one tile of rows at a time); stick and nearer (the
// running sum of g over nearer keys) carry over to the next, farther block.
//
// With g_ij = A_ij (do_i . v_j - drem_i), dL/dz_ij = g_ij - beta_ij F_ij, F_ij the sum of g over key j and every
// farther key. Writing F_ij = g_ij + (farther keys of this block) + (farther blocks) gives
//   dL/dz_ij = (1 - beta_ij) g_ij - beta_ij [in-block farther sum + far_i],
// which never subtracts g_ij from itself; the in-block sum is summed directly, farthest first; far_i, the sum over
// all farther blocks, is the row total (do_i . o_i - drem_i (1 - rem_i)) minus every nearer g. That difference
// cancels once the stick is spent (true value ~0, rounding ~eps |total|), so it is clamped to the bound the true value
// obeys, |far_i| <= (stick after this block) * bound_i with bound_i = |do_i| max_j |v_j| + |drem_i| (g_bound): without
// that, fp32 gradients of rows whose logits reach |z| ~ 20+ carried rounding noise far above their size.
template <typename scalar_t>
void rows_block_grads(scalar_t* x, scalar_t* dov, scalar_t* keep, scalar_t* beta, scalar_t* stick, double* nearer,
                      const scalar_t* drem, const double* total, const scalar_t* g_bound, int64_t rows, int64_t n,
                      int64_t rows_per_group, int64_t band, scalar_t max_abs_logit) {
  for (int64_t tile = 0; tile < rows; tile += kTileRows) {
    const int64_t tile_rows = std::min(kTileRows, rows - tile);
    for (int64_t t = 0; t < tile_rows; ++t) {
      scalar_t* xr = x + (tile + t) * n;
      row_betas<scalar_t>(xr, keep + t * n, n, band - (tile + t) % rows_per_group, max_abs_logit, /*clamp=*/true);
      std::copy(xr, xr + n, beta + t * n);
    }
    // The sums of g (and the row totals) are double: in float their rounding over a long stick was the largest error
    // left in dq (1e-5 rel. RMS against 4e-6 at T=300, every key visited).
    scalar_t s[kTileRows], dr[kTileRows];
    double sum[kTileRows], far[kTileRows];
    for (int64_t t = 0; t < tile_rows; ++t) {
      s[t] = stick[tile + t];
      sum[t] = 0;
      dr[t] = drem[tile + t];
    }
    scalar_t* x0 = x + tile * n;
    scalar_t* g0 = dov + tile * n;
    const scalar_t* k0 = keep;
    const scalar_t* b0 = beta;
    // Nearest key first: A = beta * (stick before the key), g = A (do . v - drem); the rows advance together.
    for (int64_t c = n - 1; c >= 0; --c) {
      for (int64_t t = 0; t < tile_rows; ++t) {
        const scalar_t weight = s[t] * b0[t * n + c];
        s[t] *= k0[t * n + c];
        const scalar_t g = weight * (g0[t * n + c] - dr[t]);
        x0[t * n + c] = weight;
        g0[t * n + c] = g;
        sum[t] += g;
      }
    }
    for (int64_t t = 0; t < tile_rows; ++t) {
      const int64_t row = tile + t;
      nearer[row] += sum[t];
      const double limit = static_cast<double>(s[t]) * g_bound[row];
      far[t] = std::min(std::max(total[row] - nearer[row], -limit), limit);
      stick[row] = s[t];
    }
    // Farthest key first: the in-block farther sum accumulates directly onto far.
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t t = 0; t < tile_rows; ++t) {
        const scalar_t g = g0[t * n + c];
        g0[t * n + c] = static_cast<scalar_t>(k0[t * n + c] * g - b0[t * n + c] * far[t]);
        far[t] += g;
      }
    }
  }
}

// A bool mask (B, H, G, Q, K) read through its strides (broadcast views welcome), True = may attend; null = none.
struct MaskView {
  const bool* ptr = nullptr;
  int64_t stride[5] = {0, 0, 0, 0, 0};
};

// `mask` (bool, 5 dims, broadcastable to (B, H, G, Q, K)) is expanded here (a view: stride 0 on broadcast dims);
// `expanded` keeps that view alive while `view` points into it.
MaskView mask_view(const c10::optional<torch::Tensor>& mask, int64_t B, int64_t H, int64_t G, int64_t Q, int64_t K,
                   const char* op, torch::Tensor& expanded) {
  MaskView view;
  if (!mask.has_value()) return view;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 5, op,
              ": mask must be bool with 5 dims, broadcastable to (B,H,G,Q,K)");
  expanded = mask->detach().expand({B, H, G, Q, K});
  view.ptr = expanded.data_ptr<bool>();
  for (int d = 0; d < 5; ++d) view.stride[d] = expanded.stride(d);
  return view;
}

// The kernels read raw memory and call ATen ops inside at::parallel_for, whose worker threads do not inherit the
// caller's grad mode: on inputs that require grad those ops would record autograd graphs (keeping every block's
// scores alive until the call returns: 1.6 GB at T=8192 with 2 threads). Every input is therefore detached first.
torch::Tensor plain(const torch::Tensor& x) { return x.detach(); }

// Keys the mask hides get -z = +inf (which gives beta = 0) in the scores x (G * m rows, n keys from key j0) of
// queries i0 .. i0 + m of kv head (b, h); row g * m + a is query i0 + a of query head g.
template <typename scalar_t>
void hide_masked_keys(const MaskView& mask, scalar_t* x, int64_t b, int64_t h, int64_t G, int64_t m, int64_t i0,
                      int64_t j0, int64_t n) {
  if (mask.ptr == nullptr) return;
  const int64_t* st = mask.stride;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t a = 0; a < m; ++a) {
      const bool* row = mask.ptr + b * st[0] + h * st[1] + g * st[2] + (i0 + a) * st[3] + j0 * st[4];
      scalar_t* xr = x + (g * m + a) * n;
      for (int64_t c = 0; c < n; ++c) {
        if (!row[c * st[4]]) xr[c] = std::numeric_limits<scalar_t>::infinity();
      }
    }
  }
}

template <typename scalar_t>
scalar_t max_of(const scalar_t* x, int64_t n) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// q5 (B, H, G, Q, D), k (B, H, K, D), v (B, H, K, Dv); mask: None or bool (B, H, G, Q, K), any strides (broadcast
// views welcome), True = may attend. Query i sits at key position K - Q + i. Returns o (B, H, G, Q, Dv), rem (B, H, G, Q).
std::vector<torch::Tensor> forward(torch::Tensor q5, torch::Tensor k, torch::Tensor v, double scale,
                                   bool attend_current, c10::optional<torch::Tensor> mask, int64_t block_size) {
  TORCH_CHECK(q5.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "forward: CPU tensors");
  TORCH_CHECK(q5.dim() == 5 && k.dim() == 4 && v.dim() == 4, "forward: q (B,H,G,Q,D), k/v (B,H,K,D)");
  TORCH_CHECK(q5.scalar_type() == k.scalar_type() && q5.scalar_type() == v.scalar_type(),
              "forward: q, k, v dtypes differ");
  TORCH_CHECK(block_size > 0, "forward: block_size must be positive");
  at::NoGradGuard no_grad;
  q5 = plain(q5).contiguous();
  k = plain(k).contiguous();
  v = plain(v).contiguous();
  const int64_t B = q5.size(0), H = q5.size(1), G = q5.size(2), Q = q5.size(3), D = q5.size(4);
  const int64_t K = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(2) == K, "forward: shapes");
  torch::Tensor mask_expanded;
  const MaskView mask_keys = mask_view(mask, B, H, G, Q, K, "forward", mask_expanded);
  // |z| <= s |q| |k| (Cauchy-Schwarz): with the largest key norm, each query block below decides whether clamping
  // could change anything (NaN/inf norms keep the clamp).
  const double max_key_norm = K > 0 && B * H > 0 ? k.norm(2, -1).max().item<double>() : 0.0;
  auto o = at::empty({B, H, G, Q, Dv}, q5.options());
  auto rem = at::empty({B, H, G, Q}, q5.options());
  const int64_t n_query_blocks = (Q + block_size - 1) / block_size;
  AT_DISPATCH_FLOATING_TYPES(q5.scalar_type(), "stickbreaking_forward", [&] {
    const scalar_t max_abs_logit = static_cast<scalar_t>(-std::log(std::numeric_limits<scalar_t>::min()) - 1.0);
    const scalar_t exhausted = std::exp(-max_abs_logit);
    at::parallel_for(0, B * H * n_query_blocks, 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard worker_no_grad;
      // Scratch of this worker, reused by all its tasks: no allocation per task or key block (freed blocks would
      // stay cached by each thread's malloc arena, and that grew with the thread count).
      const int64_t max_rows = G * std::min(block_size, Q), max_n = std::min(block_size, K);
      auto opts = q5.options();
      auto neg_q_buf = at::empty({max_rows * D}, opts), acc_buf = at::empty({max_rows * Dv}, opts);
      auto scores_buf = at::empty({max_rows * max_n}, opts), stick_buf = at::empty({max_rows}, opts);
      std::vector<scalar_t> keep(kTileRows * max_n);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (H * n_query_blocks), h = (task / n_query_blocks) % H;
        const int64_t i0 = (task % n_query_blocks) * block_size, i1 = std::min(Q, i0 + block_size), m = i1 - i0;
        const int64_t rows = G * m;
        auto q_block = q5[b][h].slice(1, i0, i1);  // (G, m, D)
        auto neg_q = neg_q_buf.narrow(0, 0, rows * D).view({rows, D});
        neg_q.view({G, m, D}).copy_(q_block).mul_(-scale);
        // |z| <= s |q| |k|: where that bound is at most half the clamp bound, clamping would change nothing.
        const double bound = std::abs(scale) * q_block.norm(2, -1).max().item<double>() * max_key_norm;
        const bool clamp = !(bound <= 0.5 * static_cast<double>(max_abs_logit));
        auto acc = acc_buf.narrow(0, 0, rows * Dv).view({rows, Dv}).zero_();
        auto stick = stick_buf.narrow(0, 0, rows).fill_(1);
        scalar_t* stick_ptr = stick.data_ptr<scalar_t>();
        auto keys = k[b][h], values = v[b][h];
        // Key blocks nearest first: distances [r0, r1) are keys [K - r1, K - r0).
        const int64_t first_visible = std::max<int64_t>(0, Q - i1 + 1 - int64_t(attend_current));
        for (int64_t r0 = first_visible; r0 < K; r0 += block_size) {
          if (max_of(stick_ptr, rows) <= exhausted) break;  // every row's stick is spent: farther keys get < tiny
          const int64_t r1 = std::min(K, r0 + block_size), j0 = K - r1, n = r1 - r0;
          auto scores = scores_buf.narrow(0, 0, rows * n).view({rows, n});
          at::mm_out(scores, neg_q, keys.slice(0, j0, j0 + n).t());  // (rows, n) = -z, contiguous
          scalar_t* x = scores.data_ptr<scalar_t>();
          hide_masked_keys<scalar_t>(mask_keys, x, b, h, G, m, i0, j0, n);
          rows_block_weights<scalar_t>(x, stick_ptr, rows, n, m, Q - int64_t(attend_current) - i0 - r0,
                                       max_abs_logit, clamp, keep.data());
          acc.addmm_(scores, values.slice(0, j0, j0 + n));
        }
        o[b][h].slice(1, i0, i1).copy_(acc.view({G, m, Dv}));
        rem[b][h].slice(1, i0, i1).copy_(stick.view({G, m}));
      }
    });
  });
  return {o, rem};
}

// -z of every row against `n` keys: x[r * n + c] = neg_q[r] . key_c, key_c at keys + c * key_stride.
template <typename scalar_t>
void rows_key_scores(const scalar_t* neg_q, const scalar_t* keys, int64_t key_stride, int64_t rows, int64_t n,
                     int64_t D, scalar_t* x) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t c = 0; c < n; ++c) {
    const scalar_t* key = keys + c * key_stride;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* q = neg_q + r * D;
      Vec acc0(0), acc1(0);
      int64_t d = 0;
      for (; d + 2 * Vec::size() <= D; d += 2 * Vec::size()) {
        acc0 = at::vec::fmadd(Vec::loadu(q + d), Vec::loadu(key + d), acc0);
        acc1 = at::vec::fmadd(Vec::loadu(q + d + Vec::size()), Vec::loadu(key + d + Vec::size()), acc1);
      }
      for (; d + Vec::size() <= D; d += Vec::size()) acc0 = at::vec::fmadd(Vec::loadu(q + d), Vec::loadu(key + d), acc0);
      scalar_t dot = at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
      for (; d < D; ++d) dot += q[d] * key[d];
      x[r * n + c] = dot;
    }
  }
}

// acc[r] += sum_c w[r * n + c] * value_c for every row, value_c at values + c * value_stride.
template <typename scalar_t>
void rows_accumulate_values(const scalar_t* w, const scalar_t* values, int64_t value_stride, int64_t rows, int64_t n,
                            int64_t Dv, scalar_t* acc) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t c = 0; c < n; ++c) {
    const scalar_t* value = values + c * value_stride;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t weight = w[r * n + c];
      if (weight == scalar_t(0)) continue;  // hidden keys and spent sticks
      scalar_t* out = acc + r * Dv;
      const Vec wv(weight);
      int64_t d = 0;
      for (; d + Vec::size() <= Dv; d += Vec::size()) {
        at::vec::fmadd(wv, Vec::loadu(value + d), Vec::loadu(out + d)).store(out + d);
      }
      for (; d < Dv; ++d) out[d] += weight * value[d];
    }
  }
}

// Few queries over a long cache (decoding): q5 (B, H, G, Q, D) with Q small, k (B, H, K, D), v (B, H, K, Dv) with any
// strides but a contiguous last dimension (a static cache's slice is read in place, never copied). The same
// algorithm, band and early exit as `forward` with one query block, but without its per-call setup (tensor
// allocations, GEMM calls, the key-norm pass that decides whether to clamp: here clamping is two vector ops): the
// scores and the output accumulation are hand-vectorised loops over `block_size` keys nearest first, so each kept
// key's k and v rows are read once, from L1. Threads take (batch, kv head) pairs.
std::vector<torch::Tensor> decode(torch::Tensor q5, torch::Tensor k, torch::Tensor v, double scale,
                                  bool attend_current, c10::optional<torch::Tensor> mask, int64_t block_size) {
  TORCH_CHECK(q5.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode: CPU tensors");
  TORCH_CHECK(q5.dim() == 5 && k.dim() == 4 && v.dim() == 4, "decode: q (B,H,G,Q,D), k/v (B,H,K,D)");
  TORCH_CHECK(q5.scalar_type() == k.scalar_type() && q5.scalar_type() == v.scalar_type(),
              "decode: q, k, v dtypes differ");
  TORCH_CHECK(block_size > 0, "decode: block_size must be positive");
  at::NoGradGuard no_grad;
  q5 = plain(q5);
  k = plain(k);
  v = plain(v);
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  const int64_t B = q5.size(0), H = q5.size(1), G = q5.size(2), Q = q5.size(3), D = q5.size(4);
  const int64_t K = k.size(2), Dv = v.size(3), rows = G * Q;
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(0) == B && v.size(1) == H &&
              v.size(2) == K, "decode: shapes");
  TORCH_CHECK(Q <= K, "decode: more queries than keys");
  torch::Tensor mask_expanded;
  const MaskView mask_keys = mask_view(mask, B, H, G, Q, K, "decode", mask_expanded);
  auto neg_q = (q5 * (-scale)).contiguous();  // (B, H, G*Q, D): row g * Q + a is query a of query head g
  auto o = at::zeros({B, H, G, Q, Dv}, q5.options());
  auto rem = at::ones({B, H, G, Q}, q5.options());
  AT_DISPATCH_FLOATING_TYPES(q5.scalar_type(), "stickbreaking_decode", [&] {
    const scalar_t max_abs_logit = static_cast<scalar_t>(-std::log(std::numeric_limits<scalar_t>::min()) - 1.0);
    const scalar_t exhausted = std::exp(-max_abs_logit);
    const scalar_t* k_ptr = k.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.data_ptr<scalar_t>();
    const int64_t n_max = std::min(block_size, K);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scores(rows * n_max), keep(kTileRows * n_max);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / H, h = task % H;
        const scalar_t* q_rows = neg_q.data_ptr<scalar_t>() + task * rows * D;
        const scalar_t* keys = k_ptr + b * k.stride(0) + h * k.stride(1);
        const scalar_t* values = v_ptr + b * v.stride(0) + h * v.stride(1);
        scalar_t* acc = o.data_ptr<scalar_t>() + task * rows * Dv;
        scalar_t* stick = rem.data_ptr<scalar_t>() + task * rows;
        // Key blocks nearest first: distances [r0, r1) are keys [K - r1, K - r0). Query a sits at K - Q + a.
        for (int64_t r0 = std::max<int64_t>(0, 1 - int64_t(attend_current)); r0 < K; r0 += block_size) {
          if (max_of(stick, rows) <= exhausted) break;  // every row's stick is spent: farther keys get < tiny
          const int64_t r1 = std::min(K, r0 + block_size), j0 = K - r1, n = r1 - r0;
          scalar_t* x = scores.data();
          rows_key_scores<scalar_t>(q_rows, keys + j0 * k.stride(2), k.stride(2), rows, n, D, x);
          hide_masked_keys<scalar_t>(mask_keys, x, b, h, G, Q, 0, j0, n);
          rows_block_weights<scalar_t>(x, stick, rows, n, Q, Q - int64_t(attend_current) - r0, max_abs_logit,
                                       /*clamp=*/true, keep.data());
          rows_accumulate_values<scalar_t>(x, values + j0 * v.stride(2), v.stride(2), rows, n, Dv, acc);
        }
      }
    });
  });
  return {o, rem};
}

// Below this many (batch, kv head) pairs the backward also splits each pair's query blocks into groups (see below).
constexpr int64_t kMinBackwardTasks = 8;

// Gradients of `forward`: q5 (B, H, G, Q, D), k, v, do5 (B, H, G, Q, Dv), drem5, total5 and bound5 (B, H, G, Q): the
// row totals (float64) and the bounds |do_i| max_j |v_j| + |drem_i| (rounded up) of rows_block_grads; mask as in
// `forward`. Returns dq5, dk, dv. Per (batch, kv head, query block): the key blocks nearest first with the same early
// exit, five GEMMs per block (scores, do . v, and dq, dk, dv) around one sweep.
//
// dk and dv sum over query blocks. Each task owns whole (batch, kv head) pairs and accumulates straight into their
// dk and dv, its query blocks in a fixed order: no per-thread copies, and the same sums in the same order for any
// thread count (bit-identical gradients at 1, 2 or 64 threads). When B * H is below kMinBackwardTasks each pair's
// query blocks are also dealt round-robin into S = ceil(kMinBackwardTasks / (B * H)) groups (so a single head still
// keeps several threads busy); groups after the first accumulate into their own copy of that pair's dk and dv, added
// in group order at the end. S depends on the shapes only, so the extra memory, (S - 1) B H K (D + Dv) < 8 K (D + Dv),
// never grows with the thread count and the result stays the same for any. Tasks are taken dynamically (an atomic
// counter), which balances uneven costs (masks, early exits) without changing any task's arithmetic.
std::vector<torch::Tensor> backward(torch::Tensor q5, torch::Tensor k, torch::Tensor v, torch::Tensor do5,
                                    torch::Tensor drem5, torch::Tensor total5, torch::Tensor bound5, double scale,
                                    bool attend_current,
                                    c10::optional<torch::Tensor> mask, int64_t block_size) {
  TORCH_CHECK(q5.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "backward: CPU tensors");
  TORCH_CHECK(q5.dim() == 5 && k.dim() == 4 && v.dim() == 4 && do5.dim() == 5, "backward: shapes");
  TORCH_CHECK(block_size > 0, "backward: block_size must be positive");
  TORCH_CHECK(total5.scalar_type() == at::kDouble, "backward: row totals must be float64");
  for (const auto& t : {k, v, do5, drem5, bound5}) {
    TORCH_CHECK(t.scalar_type() == q5.scalar_type(), "backward: dtypes differ");
  }
  at::NoGradGuard no_grad;
  q5 = plain(q5).contiguous();
  k = plain(k).contiguous();
  v = plain(v).contiguous();
  do5 = plain(do5).contiguous();
  drem5 = plain(drem5).contiguous();
  total5 = plain(total5).contiguous();
  bound5 = plain(bound5).contiguous();
  const int64_t B = q5.size(0), H = q5.size(1), G = q5.size(2), Q = q5.size(3), D = q5.size(4);
  const int64_t K = k.size(2), Dv = v.size(3);
  torch::Tensor mask_expanded;
  const MaskView mask_keys = mask_view(mask, B, H, G, Q, K, "backward", mask_expanded);
  if (B * H * Q * K == 0) return {at::zeros_like(q5), at::zeros_like(k), at::zeros_like(v)};
  const int64_t n_query_blocks = (Q + block_size - 1) / block_size;
  const int64_t groups = std::min(n_query_blocks, std::max<int64_t>(1, (kMinBackwardTasks + B * H - 1) / (B * H)));
  const int64_t n_tasks = B * H * groups;
  auto dq5 = at::empty_like(q5);
  auto dk_all = at::zeros_like(k);
  auto dv_all = at::zeros_like(v);
  // Groups 1 .. S-1 of every pair: their own dk, dv (none when S == 1).
  auto dk_groups = groups > 1 ? at::zeros({groups - 1, B, H, K, D}, q5.options()) : torch::Tensor();
  auto dv_groups = groups > 1 ? at::zeros({groups - 1, B, H, K, Dv}, q5.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q5.scalar_type(), "stickbreaking_backward", [&] {
    const scalar_t max_abs_logit = static_cast<scalar_t>(-std::log(std::numeric_limits<scalar_t>::min()) - 1.0);
    const scalar_t exhausted = std::exp(-max_abs_logit);
    std::atomic<int64_t> next_task{0};
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      at::NoGradGuard worker_no_grad;
      // Scratch of this worker, reused by all its tasks (as in `forward`).
      const int64_t max_rows = G * std::min(block_size, Q), max_n = std::min(block_size, K);
      auto opts = q5.options();
      auto neg_q_buf = at::empty({max_rows * D}, opts), dq_buf = at::empty({max_rows * D}, opts);
      auto scores_buf = at::empty({max_rows * max_n}, opts), grads_buf = at::empty({max_rows * max_n}, opts);
      auto stick_buf = at::empty({max_rows}, opts);
      std::vector<scalar_t> keep(kTileRows * max_n), beta(keep.size());
      std::vector<double> nearer(max_rows);
      for (int64_t task = next_task.fetch_add(1); task < n_tasks; task = next_task.fetch_add(1)) {
        const int64_t pair = task / groups, group = task % groups;
        const int64_t b = pair / H, h = pair % H;
        auto keys = k[b][h], values = v[b][h];
        auto dk = group == 0 ? dk_all[b][h] : dk_groups[group - 1][b][h];
        auto dv = group == 0 ? dv_all[b][h] : dv_groups[group - 1][b][h];
        // The group's query blocks, last (most expensive) first: n-1-group, n-1-group-S, ...
        for (int64_t block = n_query_blocks - 1 - group; block >= 0; block -= groups) {
          const int64_t i0 = block * block_size, i1 = std::min(Q, i0 + block_size), m = i1 - i0;
          const int64_t rows = G * m;
          auto neg_q = neg_q_buf.narrow(0, 0, rows * D).view({rows, D});
          neg_q.view({G, m, D}).copy_(q5[b][h].slice(1, i0, i1)).mul_(-scale);
          auto do_rows = do5[b][h].slice(1, i0, i1).reshape({rows, Dv});
          auto drem = drem5[b][h].slice(1, i0, i1).reshape({rows}).contiguous();
          auto total = total5[b][h].slice(1, i0, i1).reshape({rows}).contiguous();
          std::fill(nearer.begin(), nearer.begin() + rows, 0.0);
          auto g_bound = bound5[b][h].slice(1, i0, i1).reshape({rows}).contiguous();
          auto stick = stick_buf.narrow(0, 0, rows).fill_(1);
          auto dq_rows = dq_buf.narrow(0, 0, rows * D).view({rows, D}).zero_();
          scalar_t* stick_ptr = stick.data_ptr<scalar_t>();
          const int64_t first_visible = std::max<int64_t>(0, Q - i1 + 1 - int64_t(attend_current));
          for (int64_t r0 = first_visible; r0 < K; r0 += block_size) {
            if (max_of(stick_ptr, rows) <= exhausted) break;  // as the forward: farther keys have weights < tiny
            const int64_t r1 = std::min(K, r0 + block_size), j0 = K - r1, n = r1 - r0;
            auto key_block = keys.slice(0, j0, j0 + n), value_block = values.slice(0, j0, j0 + n);
            auto scores = scores_buf.narrow(0, 0, rows * n).view({rows, n});
            auto grads = grads_buf.narrow(0, 0, rows * n).view({rows, n});
            at::mm_out(scores, neg_q, key_block.t());  // -z
            at::mm_out(grads, do_rows, value_block.t());  // do . v, then dL/dz
            scalar_t* x = scores.data_ptr<scalar_t>();
            hide_masked_keys<scalar_t>(mask_keys, x, b, h, G, m, i0, j0, n);
            rows_block_grads<scalar_t>(x, grads.data_ptr<scalar_t>(), keep.data(), beta.data(), stick_ptr,
                                       nearer.data(), drem.data_ptr<scalar_t>(), total.data_ptr<double>(),
                                       g_bound.data_ptr<scalar_t>(), rows, n, m,
                                       Q - int64_t(attend_current) - i0 - r0, max_abs_logit);
            dq_rows.addmm_(grads, key_block);
            // neg_q is -s q: dk += s dz^T q = -dz^T neg_q.
            dk.slice(0, j0, j0 + n).addmm_(grads.t(), neg_q, 1, -1);
            dv.slice(0, j0, j0 + n).addmm_(scores.t(), do_rows);
          }
          dq5[b][h].slice(1, i0, i1).copy_(dq_rows.view({G, m, D}).mul_(scale));
        }
      }
    });
  });
  for (int64_t group = 1; group < groups; ++group) {  // in group order: elementwise adds, the same for any threads
    dk_all.add_(dk_groups[group - 1]);
    dv_all.add_(dv_groups[group - 1]);
  }
  return {dq5, dk_all, dv_all};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "stick-breaking attention forward (CPU)");
  m.def("backward", &backward, "stick-breaking attention backward (CPU)");
  m.def("decode", &decode, "stick-breaking attention forward for few queries over a long cache (CPU)");
}
