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

// Weights of one (query block, key block) pair, in place. scores (rows, n) holds -z with the keys in cache order
// (column c = key j0 + c), so the nearest key is the last column; stick (rows,) is the stick left by nearer blocks and
// becomes the stick left after this one. Row t is query t % rows_per_group of its block; its `band - t % rows_per_group`
// nearest keys (a suffix of the row) are causally hidden. A score of +inf (a key the mask hides) gets beta = 0.
template <typename scalar_t>
void rows_block_weights(scalar_t* scores, scalar_t* stick, int64_t rows, int64_t n, int64_t rows_per_group,
                        int64_t band, scalar_t max_abs_logit, bool clamp, scalar_t* keep) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec one(1), zero(0), inf(std::numeric_limits<scalar_t>::infinity()), hi(max_abs_logit), lo(-max_abs_logit);
  for (int64_t tile = 0; tile < rows; tile += kTileRows) {
    const int64_t tile_rows = std::min(kTileRows, rows - tile);
    // Pass 1 (vectorised along the keys): e = exp(-z), beta = 1 / (1 + e), 1 - beta = e * beta, with no cancellation
    // for any z. Hidden keys get beta = 0 and 1 - beta = 1: they break nothing.
    for (int64_t t = 0; t < tile_rows; ++t) {
      scalar_t* x = scores + (tile + t) * n;
      scalar_t* kp = keep + t * n;
      const int64_t visible = n - std::min<int64_t>(n, std::max<int64_t>(0, band - (tile + t) % rows_per_group));
      std::fill(x + visible, x + n, scalar_t(0));
      std::fill(kp + visible, kp + n, scalar_t(1));
      int64_t c = 0;
      for (; c + Vec::size() <= visible; c += Vec::size()) {
        Vec neg_z = Vec::loadu(x + c);
        Vec hidden = neg_z == inf;
        // maximum/minimum propagate NaN, as torch.clamp does.
        Vec e = fast_exp(clamp ? at::vec::minimum(at::vec::maximum(neg_z, lo), hi) : neg_z);
        Vec beta = one / (one + e);
        Vec::blendv(beta, zero, hidden).store(x + c);
        Vec::blendv(e * beta, one, hidden).store(kp + c);
      }
      for (; c < visible; ++c) {
        scalar_t neg_z = x[c];
        if (neg_z == std::numeric_limits<scalar_t>::infinity()) {
          x[c] = 0;
          kp[c] = 1;
          continue;
        }
        if (clamp && !std::isnan(neg_z)) neg_z = std::min(std::max(neg_z, -max_abs_logit), max_abs_logit);
        const scalar_t e = std::exp(neg_z), beta = scalar_t(1) / (scalar_t(1) + e);
        x[c] = beta;
        kp[c] = e * beta;
      }
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

template <typename scalar_t>
scalar_t max_of(const scalar_t* x, int64_t n) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// q5 (B, H, G, Q, D), k (B, H, K, D), v (B, H, K, Dv); mask: None or bool (B, H, G, Q, K), any strides (broadcast
// views welcome), True = may attend. Query i sits at key position K - Q + i. Returns o (B, H, G, Q, Dv), rem (B, H, G, Q).
std::vector<torch::Tensor> forward(torch::Tensor q5, torch::Tensor k, torch::Tensor v, double scale,
                                   bool attend_current, c10::optional<torch::Tensor> mask, int64_t block_size,
                                   double max_key_norm) {
  TORCH_CHECK(q5.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "forward: CPU tensors");
  TORCH_CHECK(q5.dim() == 5 && k.dim() == 4 && v.dim() == 4, "forward: q (B,H,G,Q,D), k/v (B,H,K,D)");
  TORCH_CHECK(q5.scalar_type() == k.scalar_type() && q5.scalar_type() == v.scalar_type(),
              "forward: q, k, v dtypes differ");
  TORCH_CHECK(block_size > 0, "forward: block_size must be positive");
  q5 = q5.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t B = q5.size(0), H = q5.size(1), G = q5.size(2), Q = q5.size(3), D = q5.size(4);
  const int64_t K = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(2) == K, "forward: shapes");
  const bool* mask_ptr = nullptr;
  std::vector<int64_t> ms(5, 0);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 5, "forward: mask must be bool (B,H,G,Q,K)");
    TORCH_CHECK(mask->size(0) == B && mask->size(1) == H && mask->size(2) == G && mask->size(3) == Q &&
                mask->size(4) == K, "forward: mask must be expanded to (B,H,G,Q,K)");
    mask_ptr = mask->data_ptr<bool>();
    for (int d = 0; d < 5; ++d) ms[d] = mask->stride(d);
  }
  auto o = at::empty({B, H, G, Q, Dv}, q5.options());
  auto rem = at::empty({B, H, G, Q}, q5.options());
  const int64_t n_query_blocks = (Q + block_size - 1) / block_size;
  AT_DISPATCH_FLOATING_TYPES(q5.scalar_type(), "stickbreaking_forward", [&] {
    const scalar_t max_abs_logit = static_cast<scalar_t>(-std::log(std::numeric_limits<scalar_t>::min()) - 1.0);
    const scalar_t exhausted = std::exp(-max_abs_logit);
    at::parallel_for(0, B * H * n_query_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (H * n_query_blocks), h = (task / n_query_blocks) % H;
        const int64_t i0 = (task % n_query_blocks) * block_size, i1 = std::min(Q, i0 + block_size), m = i1 - i0;
        const int64_t rows = G * m;
        auto q_block = q5[b][h].slice(1, i0, i1);  // (G, m, D)
        auto neg_q = (q_block * (-scale)).reshape({rows, D});
        // |z| <= s |q| |k|: where that bound is at most half the clamp bound, clamping would change nothing.
        const double bound = std::abs(scale) * q_block.norm(2, -1).max().item<double>() * max_key_norm;
        const bool clamp = !(bound <= 0.5 * static_cast<double>(max_abs_logit));
        auto acc = at::zeros({rows, Dv}, q5.options());
        auto stick = at::ones({rows}, q5.options());
        scalar_t* stick_ptr = stick.data_ptr<scalar_t>();
        auto keys = k[b][h], values = v[b][h];
        std::vector<scalar_t> keep(kTileRows * std::min(block_size, K));
        // Key blocks nearest first: distances [r0, r1) are keys [K - r1, K - r0).
        const int64_t first_visible = std::max<int64_t>(0, Q - i1 + 1 - int64_t(attend_current));
        for (int64_t r0 = first_visible; r0 < K; r0 += block_size) {
          if (max_of(stick_ptr, rows) <= exhausted) break;  // every row's stick is spent: farther keys get < tiny
          const int64_t r1 = std::min(K, r0 + block_size), j0 = K - r1, n = r1 - r0;
          auto scores = at::mm(neg_q, keys.slice(0, j0, j0 + n).t());  // (rows, n) = -z, contiguous
          scalar_t* x = scores.data_ptr<scalar_t>();
          if (mask_ptr != nullptr) {  // keys the mask hides: -z = +inf, which gives beta = 0
            for (int64_t g = 0; g < G; ++g) {
              for (int64_t a = 0; a < m; ++a) {
                const bool* row = mask_ptr + b * ms[0] + h * ms[1] + g * ms[2] + (i0 + a) * ms[3] + j0 * ms[4];
                scalar_t* xr = x + (g * m + a) * n;
                for (int64_t c = 0; c < n; ++c) {
                  if (!row[c * ms[4]]) xr[c] = std::numeric_limits<scalar_t>::infinity();
                }
              }
            }
          }
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "stick-breaking attention forward (CPU)");
}
