// CPU body of center_task_vectors, written once over a vector ISA `Vec` and included by csrc/center.cpp
// once per ISA (AVX2 = the build baseline, AVX-512 under `#pragma GCC target`, scalar fp64), each time inside
// its own namespace that defines `Vec` first. Not a public header: no include guard on purpose.
//
// Vec provides: Acc (accumulator scalar), V (vector of Acc), W (lanes), set1, mul, fma (w * x + acc, one
// rounding), sub, load(const In*) -> V, and store<NT>(Out*, V) for the dtypes it supports. The scalar tail
// uses the per-element math of pymerge/center.h (load1 / store1 in csrc/center.cpp), which rounds exactly
// as the vector instructions do.

// One prefetch per cache line of a block; past the end of an input they are harmless (prefetches never fault).
template <int64_t B, int64_t kLine, class In>
inline void prefetch_block(const In* x) {
  for (int64_t p = 0; p < B; p += kLine) _mm_prefetch(reinterpret_cast<const char*>(x + p), _MM_HINT_T0);
}

// Elements [lo, hi) of the flat range, in blocks of R vectors, two cache lines of every input (32 fp32
// elements with AVX-512: longer blocks measured slower, as did t-outer chunks with an L1 accumulator). A block's
// weighted sum of the T inputs is accumulated in registers (the only time the inputs come from memory), then
// centered[t] re-reads input t's block from L1, and the average is stored last, so outputs that exactly alias
// their inputs (centered[t] is thetas[t], or avg is one of the thetas) still see every input before it is
// overwritten. Each input is prefetched kPrefetchBytes ahead so T + 1 + T concurrent streams keep memory busy.
template <bool NT, class In, class Out>
void process_range(const CenterArgs& a, int64_t lo, int64_t hi) {
  using Acc = typename Vec::Acc;
  using V = typename Vec::V;
  constexpr int64_t W = Vec::W, R = unroll(W * static_cast<int64_t>(sizeof(In))), B = R * W;
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(In));  // elements per cache line
  constexpr int64_t kAhead = kPrefetchBytes / static_cast<int64_t>(sizeof(In));
  const In* const* xs = reinterpret_cast<const In* const*>(a.thetas);
  const Acc* w = static_cast<const Acc*>(a.weights);
  Out* avg = static_cast<Out*>(a.avg);
  Out* cent = static_cast<Out*>(a.centered);
  const int64_t T = a.T, N = a.numel;

  int64_t i = lo;
  for (; i + B <= hi; i += B) {
    V acc[R];
    {
      const In* x = xs[0] + i;
      prefetch_block<B, kLine>(x + kAhead);
      const V wt = Vec::set1(w[0]);
      for (int64_t r = 0; r < R; ++r) acc[r] = Vec::mul(wt, Vec::load(x + r * W));
    }
    for (int64_t t = 1; t < T; ++t) {
      const In* x = xs[t] + i;
      prefetch_block<B, kLine>(x + kAhead);
      const V wt = Vec::set1(w[t]);
      for (int64_t r = 0; r < R; ++r) acc[r] = Vec::fma(wt, Vec::load(x + r * W), acc[r]);
    }
    if (cent != nullptr)
      for (int64_t t = 0; t < T; ++t) {
        const In* x = xs[t] + i;
        Out* y = cent + t * N + i;
        for (int64_t r = 0; r < R; ++r)
          Vec::template store<NT>(y + r * W, Vec::sub(Vec::load(x + r * W), acc[r]));
      }
    for (int64_t r = 0; r < R; ++r) Vec::template store<NT>(avg + i + r * W, acc[r]);
  }
  for (; i < hi; ++i) {  // tail (< one block): the shared scalar math
    Acc s = first_term(w[0], static_cast<Acc>(load1(xs[0] + i)));
    for (int64_t t = 1; t < T; ++t) s = accumulate(s, w[t], static_cast<Acc>(load1(xs[t] + i)));
    if (cent != nullptr)
      for (int64_t t = 0; t < T; ++t) store1(cent + t * N + i, deviation(static_cast<Acc>(load1(xs[t] + i)), s));
    store1(avg + i, s);
  }
  // Streaming stores are weakly ordered: fence before another thread (or the caller) reads the outputs.
  if (NT) _mm_sfence();
}

