// nnderiv native CPU kernel: the packed forward Taylor recursion of an MLP as one XLA FFI
// custom call (value, Jacobian, Hessian and third tensor of every point of a batch).
//
// Per point, each layer's quantity q carries K = 1 + m + C(m+1,2) + C(m+2,3) Taylor
// coefficients (value; q_j; q_jk, j <= k; q_jkl, j <= k <= l; packed lexicographic order,
// as nnderiv.packed_indices). An affine layer multiplies the stack by W (bias on the
// value row); an activation applies the Faa di Bruno rule unit by unit. Until the first
// activation the first derivatives are point-independent rows (no matmul of the stack).
//
// Layout: a tile of `tile` points keeps its stack as (tile, K, ld) row-major, ld the
// widest layer padded to the micro-kernel's column block; the affine layer is one GEMM
// of (tile*K, in) by (in, out) with a register-blocked 6 x (2 vectors) micro-kernel, W
// packed in column panels once per call, the rows in L2-sized slabs (at one core's FMA
// peak within 5% at 64 units on the EPYC VM); the elementwise rule runs over the same
// buffer while it is in cache. Tiles are spread over a persistent thread pool (sized by
// sched_getaffinity) for large batches.
//
// Forward-over-reverse (for few outputs: (1 + n) C(m+2,2) columns against C(m+3,3)) runs
// the same recursion to order 2, keeps each activation's slope stack, and sweeps the n
// output adjoints back through the layers as stacks of the same order.
//
// Forward with the top order by adjoint (for every n: C(m+2,2) + 1 + n columns in the
// hidden layers' matmuls) propagates the stacks without their top-order rows and adds the
// top order of the outputs from first-order adjoints (see run_points_fwdadj).
//
// The compute (mlp_taylor_impl.inc) is compiled three times, for AVX-512 (512-bit vectors:
// twice the FMA width of AVX2 on cores with full-width units, such as Zen 4/5 and Xeon),
// AVX2+FMA and the baseline target; __builtin_cpu_supports picks the widest at run time.
//
// Custom call attributes: kinds (int64, one per stage: -1 affine, -2 affine with bias,
// -3 skip, >= 0 activation code), slopes (float64 per stage, leaky_relu), links (int64
// per stage: a skip stage adds the value after the first links[s] stages, which must
// follow the first activation; ignored elsewhere), parts (int64 triples (stage, first
// unit, code): an activation stage listed there applies one activation per block of
// units, from each first unit to the next; empty or (-1, 0, 0) when none), part_slopes
// (float64 per triple), order (1..3), full (1: full symmetric tensors, 0: packed),
// algorithm (0: forward, 1: forward-over-reverse, 2: forward with the top order by
// adjoint; 1 and 2 take no skip stages), weights_token (int64:
// nonzero names the weight operands' values, which the caller promises are the same on
// every call carrying this token, so what was packed from them is kept; 0: unknown).
// Operands: x (..., B, m), then per affine stage its weight (..., in, out) and bias
// (..., out) if it has one. Results: value (..., B, n),
// jacobian (..., B, n, m), hessian (..., B, n, m, m) or (..., B, n, P2), third
// (..., B, n, m, m, m) or (..., B, n, P3), as many as order + 1. Leading dimensions
// (from vmap with vmap_method="expand_dims") are slices: each operand has either 1 or
// all of them.

#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace nnd {

enum ActCode : int {
  kTanh = 0,
  kSigmoid = 1,
  kSoftplus = 2,
  kSilu = 3,
  kGeluTanh = 4,
  kGeluErf = 5,
  kSin = 6,
  kCos = 7,
  kExp = 8,
  kIdentity = 9,
  kRelu = 10,
  kLeakyRelu = 11,
  kNumActs = 12,
};

// Stage kinds inside the kernel (activations are their codes, >= 0).
constexpr int kAffineStage = -1;
constexpr int kSkipStage = -3;

// The instruction sets the compute is compiled for (values as NnderivMlpTaylorIsa says).
enum Isa : int { kIsaBaseline = 0, kIsaAvx2 = 2, kIsaAvx512 = 3 };

// Layers narrower than this many columns take dot products (gemm_narrow), not the GEMM:
// the GEMM pads them to its panel width. Two 32-byte vectors, on every instruction set
// (an 8-wide float64 layer pays the same 512-bit FMAs padded to 16 as 256-bit ones unpadded).
template <class T>
constexpr int kNarrowBelow = 2 * (32 / (int)sizeof(T));

inline int round_up(int v, int q) { return (v + q - 1) / q * q; }

struct Tables {
  int m = 0, order = 0, K = 0, P2 = 0, P3 = 0, off1 = 1, off2 = 0, off3 = 0;
  std::vector<int> pj, pk;                      // pairs j <= k
  std::vector<int> tj, tk, tl, tjk, tjl, tkl;   // triples j <= k <= l and their pair slots
  std::vector<int> pos2, pos3;                  // full index -> packed slot

  Tables(int m_, int order_) : m(m_), order(order_) {
    std::vector<int> slot(m * m, 0);
    for (int j = 0; j < m; ++j)
      for (int k = j; k < m; ++k) {
        slot[j * m + k] = slot[k * m + j] = (int)pj.size();
        pj.push_back(j);
        pk.push_back(k);
      }
    std::vector<int> slot3(m * m * m, 0);
    for (int j = 0; j < m; ++j)
      for (int k = j; k < m; ++k)
        for (int l = k; l < m; ++l) {
          const int q = (int)tj.size();
          const int perms[6][3] = {{j, k, l}, {j, l, k}, {k, j, l}, {k, l, j}, {l, j, k}, {l, k, j}};
          for (auto& p : perms) slot3[(p[0] * m + p[1]) * m + p[2]] = q;
          tj.push_back(j);
          tk.push_back(k);
          tl.push_back(l);
          tjk.push_back(slot[j * m + k]);
          tjl.push_back(slot[j * m + l]);
          tkl.push_back(slot[k * m + l]);
        }
    P2 = order >= 2 ? (int)pj.size() : 0;
    P3 = order >= 3 ? (int)tj.size() : 0;
    off2 = 1 + m;
    off3 = off2 + P2;
    K = off3 + P3;
    pos2 = slot;
    pos3 = slot3;
  }
};

// The index tables of (m, order), built once per process and shared by every thread
// (read-only once built). A thread's last answer is remembered: steady-state calls take
// no lock.
static const Tables& tables_for(int m, int order) {
  thread_local const Tables* last = nullptr;
  if (last && last->m == m && last->order == order) return *last;
  static std::mutex mu;
  static std::vector<const Tables*>* known = new std::vector<const Tables*>();  // never freed
  std::lock_guard<std::mutex> lock(mu);
  for (const Tables* t : *known)
    if (t->m == m && t->order == order) return *(last = t);
  known->push_back(new Tables(m, order));
  return *(last = known->back());
}

template <class T>
struct Affine {
  const T* W = nullptr;  // (in, out) row-major, as given
  const T* b = nullptr;  // (out,) or null
  int in = 0, out = 0;
  bool narrow = false;   // few columns: dot products against Wt
  std::vector<T> B;      // the GEMM's right operand: W packed in panels (pack_panels), ncols wide
  const T* Wt = nullptr; // narrow layers: (out, in), W itself when out == 1, else Wtbuf
  int ncols = 0;         // out rounded up to the micro-kernel's columns
  std::vector<T> Wtbuf;  // (out, in) transposed, for narrow layers with out > 1
  std::vector<T> Bt;     // forward-over-reverse, hidden layers: W^T (out x in) packed in panels
  int64_t ldbt = 0;      // in rounded up to the micro-kernel's columns
};

// The GEMM's right operand B (kc x cols, B[k, c] = src[k sk + c sc]) in the layout gemm()
// reads: panels of NR columns, each kc contiguous rows, zero-padded to ncols columns.
template <class T>
static void pack_panels(const T* src, int64_t sk, int64_t sc, int kc, int cols, int ncols, int NR,
                        std::vector<T>& dst) {
  dst.resize((size_t)kc * ncols);
  for (int p = 0; p < ncols; p += NR) {
    T* panel = dst.data() + (size_t)p * kc;
    if (sc == 1 && p + NR <= cols) {  // whole rows of W: one 64-byte copy each (the per-call cost at one point)
      for (int k = 0; k < kc; ++k) std::memcpy(panel + k * NR, src + k * sk + p, sizeof(T) * NR);
      continue;
    }
    for (int k = 0; k < kc; ++k)
      for (int l = 0; l < NR; ++l) panel[k * NR + l] = p + l < cols ? src[k * sk + (p + l) * sc] : T(0);
  }
}

// One activation over the units [start, next part's start or the stage's width).
template <class T>
struct Part {
  int start = 0;
  int code = 0;
  T slope = 0;
};

// A call's program. A few per thread, reused from call to call (the vectors keep their
// capacity: a steady-state call allocates nothing). prepare() fills what derives from the
// weights' values (packed panels, constant rows and products, adjoints). When the caller
// names those values by a token (weights_token: a digest of weights that are constants of
// the program, as derivs_fn bakes them in), the program is kept under the token and the
// structure, and a later call of the same network reuses it. Addresses would not do (a
// buffer may hold other values at the same address), nor would comparing the values
// (measured: memcmp of a 64x3 net's 68 KB took a sixth of a one-point call).
template <class T>
struct Program {
  bool reusable = false;     // key describes the derived data below
  std::vector<int64_t> key;  // the token and the structure (see program_key)
  uint64_t last_used = 0;
  int isa = kIsaBaseline;  // the compute copy that runs it (its panel width shapes the packing)
  int nr = 0;              // that copy's panel width (kPanel)
  const Tables* tbp = nullptr;
  int n = 0;
  std::vector<int> kinds;  // per stage: kAffineStage, kSkipStage or an activation code
  std::vector<T> slopes;
  std::vector<int> link;        // per stage: a skip stage's source (values after link[s] stages)
  std::vector<int> save_slot;   // per count k of stages: where the stack after k stages is kept, or -1
  std::vector<char> release;    // per stage: a skip stage that is its source's last use
  int nslots = 0;               // stacks kept at once, at most (slots are reused)
  std::vector<int> last_use, slot_free;  // run_call's bookkeeping, kept for their capacity
  std::vector<int> part_begin;  // per stage: its parts are parts[part_begin[s] .. part_begin[s + 1])
  std::vector<Part<T>> parts;
  std::vector<Affine<T>> affine;  // per stage (unused for activations)
  int first_act = 0;              // index of the first activation (== stages if none)
  int64_t maxld = 0;
  int64_t tile = 1;
  std::vector<T> Rp;  // K x maxld: rows 1.. the constant rows and their products
  std::vector<T> R, R2;  // m x maxld: the constant rows through several leading layers
  std::vector<int> width;  // per stage: its output width

  // Forward-over-reverse (fwdrev true): tbp holds the tables of the inner order
  // (order_out - 1) and a stack has Kf rows. Forward with the top order by adjoint
  // (fwdadj true): tbp holds the tables of order_out, the hidden layers' matmuls carry the
  // Kf rows below the top order, and the adjoint fields below serve its pre-pass too.
  bool fwdrev = false;
  bool fwdadj = false;
  int order_out = 0;
  int Kf = 0;
  int last_act = 0;          // index of the last activation
  int nacts = 0;             // activations, each keeping its slope stacks
  std::vector<int> gslot;    // per stage: which slope stack (activations)
  std::vector<T> Cadj;       // n x maxld: d output / d (last activation's output)
  std::vector<T> Rt;         // R^T ((first activation's width) x mpad) packed in panels
  int64_t mpad = 0;          // m rounded up to the micro-kernel's columns

  const Tables& tb() const { return *tbp; }
  int top_rows() const { return tbp->K - Kf; }  // fwdadj: the stack's top-order rows
  // fwdadj: a stack's rows, all K with a single activation (there the first activation's
  // constant rule yields every order), else the Kf below the top order.
  int fwdadj_stack_rows() const { return first_act == last_act ? tbp->K : Kf; }
  // fwdadj, per point of a tile: two stacks, four value rows, each activation's s..s'''
  // and n adjoints, two adjoint buffers, and the accumulators (top x n).
  int64_t fwdadj_point_size() const {
    return (2 * fwdadj_stack_rows() + 4 + nacts * (4 + n) + 2 * n) * maxld + (int64_t)top_rows() * n;
  }
  size_t work_size() const {
    if (fwdadj) return (size_t)(tile * fwdadj_point_size() + top_rows() * n);
    if (fwdrev)
      return (size_t)((2 + nacts + 2 * n) * tile * Kf * maxld + tile * n * Kf * mpad + 2 * tile * maxld +
                      4 * maxld);
    return (size_t)((2 + nslots) * tile * tbp->K * maxld + 2 * tile * maxld + (4 + tbp->P2) * maxld);
  }
};

template <class T>
struct Outputs {
  T* value;
  T* jac;
  T* hess;
  T* third;
  int h_size;  // per output: m*m (full) or P2 (packed)
  int t_size;
  bool full;
};

}  // namespace nnd

// ------------------------------------------------------------------------------------
// The compute, three times.

#define NND_VBYTES 64
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")
namespace nnd {
namespace avx512 {
constexpr bool kVectorExp = true;
#include "mlp_taylor_impl.inc"
}  // namespace avx512
}  // namespace nnd
#pragma GCC pop_options
#undef NND_VBYTES

#define NND_VBYTES 32
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace nnd {
namespace avx2 {
constexpr bool kVectorExp = true;
#include "mlp_taylor_impl.inc"
}  // namespace avx2
}  // namespace nnd
#pragma GCC pop_options

namespace nnd {
namespace generic {
constexpr bool kVectorExp = true;
#include "mlp_taylor_impl.inc"
}  // namespace generic
}  // namespace nnd
#undef NND_VBYTES

namespace nnd {

// The widest compute copy this CPU runs.
static int detected_isa() {
  static const int found = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return (int)kIsaBaseline;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      return (int)kIsaAvx512;
    return (int)kIsaAvx2;
  }();
  return found;
}

// The copy new calls run: the detected one unless NnderivMlpTaylorSetIsa chose a narrower one.
static std::atomic<int> g_isa{-1};
static int current_isa() {
  const int v = g_isa.load(std::memory_order_relaxed);
  return v >= 0 ? v : detected_isa();
}

template <class T>
static int panel_width(int isa) {
  return isa == kIsaAvx512 ? avx512::kPanel<T> : isa == kIsaAvx2 ? avx2::kPanel<T> : generic::kPanel<T>;
}

// Calls f on the compute copy isa names, e.g. NND_DISPATCH(P.isa, run_points<T>(...)).
#define NND_DISPATCH(isa, ...)    \
  do {                            \
    switch (isa) {                \
      case kIsaAvx512:            \
        avx512::__VA_ARGS__;      \
        break;                    \
      case kIsaAvx2:              \
        avx2::__VA_ARGS__;        \
        break;                    \
      default:                    \
        generic::__VA_ARGS__;     \
    }                             \
  } while (0)

// ------------------------------------------------------------------------------------
// A persistent thread pool: workers sleep on a condition variable; parallel_for hands
// out task indices from an atomic counter and the caller works too. One parallel region
// at a time (another caller meanwhile runs serially).
//
// After a region the workers, and the caller waiting for them, spin for a while before
// they block: a sleeping thread's wake-up (a futex and, on a VM, an idle vCPU woken by
// an interrupt) costs tens of microseconds, and a simulation calling derivs in a loop
// comes back within that.

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { loop(); });
    for (auto& t : workers_) t.detach();
  }
  int size() const { return (int)workers_.size() + 1; }

  // Runs f(i) for i in [0, tasks); returns false (nothing run) if the pool is busy.
  bool parallel_for(int64_t tasks, const std::function<void(int64_t)>& f) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &f;
      tasks_ = tasks;
      next_.store(0);
      active_.store((int)workers_.size());
      generation_.fetch_add(1);
    }
    if (sleeping_.load() > 0) cv_.notify_all();
    work(f, tasks);
    spin_until([this] { return active_.load() == 0; });
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return active_.load() == 0; });
    fn_ = nullptr;
    return true;
  }

 private:
  // NNDERIV_NATIVE_SPIN_US (default 300; 0: block at once). Measured on the 2-core Zen 4
  // VM, 64 points of m = 3, 64x3, called back to back and awaited, alternated with a build
  // that blocks at once: median 283 and 318 us per call against 235 and 203 (spinning
  // 100 us, without the yield: no gain over blocking).
  static std::chrono::microseconds spin_time() {
    static const std::chrono::microseconds t{[] {
      const char* v = getenv("NNDERIV_NATIVE_SPIN_US");
      return v && *v ? std::max(0L, strtol(v, nullptr, 10)) : 300L;
    }()};
    return t;
  }

  // Polls ready() until it holds or the spin time has passed; true if it holds. Yields
  // between polls, so that a runnable thread on this core (XLA's own) is not held up.
  template <class F>
  static bool spin_until(F&& ready) {
    if (ready()) return true;
    const auto spin = spin_time();
    if (spin.count() == 0) return false;
    const auto until = std::chrono::steady_clock::now() + spin;
    for (;;) {
      for (int i = 0; i < 32; ++i) {
        if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
      sched_yield();
      if (std::chrono::steady_clock::now() > until) return ready();
    }
  }
  void work(const std::function<void(int64_t)>& f, int64_t tasks) {
    for (int64_t i; (i = next_.fetch_add(1)) < tasks;) f(i);
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)>* f;
      int64_t tasks;
      if (!spin_until([&] { return generation_.load() != seen; })) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = generation_.load();
        f = fn_;
        tasks = tasks_;
      }
      work(*f, tasks);
      std::lock_guard<std::mutex> lock(mu_);
      if (active_.fetch_sub(1) == 1) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_, mu_;
  std::condition_variable cv_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0}, sleeping_{0};
  std::atomic<uint64_t> generation_{0};
};

static int affinity_count() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

static std::atomic<Pool*> g_pool{nullptr};
static std::mutex g_pool_mu;

static void forget_pool_in_child() { g_pool.store(nullptr); }  // threads do not survive fork

static Pool* pool() {
  Pool* p = g_pool.load();
  if (p) return p;
  std::lock_guard<std::mutex> lock(g_pool_mu);
  p = g_pool.load();
  if (!p) {
    static bool registered = (pthread_atfork(nullptr, nullptr, forget_pool_in_child), true);
    (void)registered;
    p = new Pool(affinity_count() - 1);  // never deleted: detached workers live as long as the process
    g_pool.store(p);
  }
  return p;
}

// ------------------------------------------------------------------------------------
// Per-call preparation and the driver.

// One custom call's operands as plain pointers and sizes (what compute() reads from the
// FFI buffers); run_call() does the work. Separate so that the kernel can be driven
// without XLA (profiling harnesses).
template <class T>
struct Call {
  const T* x = nullptr;
  int64_t Bp = 0;  // points per slice
  int m = 0;
  int64_t S = 0;  // slices of the results: the product of their leading (vmap) dims
  // The results' leading dims, and per operand and leading dim the stride of its slice
  // index (0 where the operand has size 1 there and is shared along that dim). Nested
  // vmaps batch x and the parameters along different dims: an ensemble of models each
  // at a batch of points.
  std::vector<int64_t> lead;
  std::vector<int64_t> xstride, wstride, bstride;  // wstride/bstride: lead.size() per affine stage
  bool x_whole = false;  // x has every leading dim: its slices are the results' slices
  int order = 0;
  bool full = false;
  int algorithm = 0;  // 0: forward, 1: forward-over-reverse, 2: forward with the top order by adjoint
  int64_t weights_token = 0;  // names the weights' values (0: unknown; see Program)
  std::vector<int64_t> kinds;
  std::vector<double> slopes;
  std::vector<int64_t> links;
  std::vector<int64_t> parts;  // triples (stage, first unit, code)
  std::vector<double> part_slopes;
  std::vector<const T*> W, b;  // per affine stage; b null without a bias
  std::vector<int> ins, outs;
  std::vector<T*> res;  // order + 1 result buffers

  // The slice of an operand (its strides from ``stride[first]``) that result slice s reads.
  int64_t slice_of(const std::vector<int64_t>& stride, size_t first, int64_t s) const {
    int64_t at = 0;
    for (size_t j = lead.size(); j-- > 0;) {
      at += (s % lead[j]) * stride[first + j];
      s /= lead[j];
    }
    return at;
  }

  void clear() {  // keeps the capacity
    kinds.clear();
    slopes.clear();
    links.clear();
    parts.clear();
    part_slopes.clear();
    W.clear();
    b.clear();
    ins.clear();
    outs.clear();
    lead.clear();
    xstride.clear();
    wstride.clear();
    bstride.clear();
    res.clear();
  }
};

// What both adjoint algorithms add to prepare(): each activation's slot, the transposed
// weights of the hidden layers, the constant adjoint after the last activation.
template <class T>
static void prepare_adjoints(Program<T>& P, int64_t ld) {
  const int nstages = (int)P.kinds.size(), n = P.n;
  P.last_act = P.first_act;
  P.nacts = 0;
  P.gslot.assign(nstages, -1);
  for (int s = P.first_act; s < nstages; ++s)
    if (P.kinds[s] >= 0) {
      P.last_act = s;
      P.gslot[s] = P.nacts++;
    }
  for (int s = P.first_act + 1; s < P.last_act; ++s) {
    if (P.kinds[s] != kAffineStage) continue;
    Affine<T>& a = P.affine[s];
    a.ldbt = round_up(a.in, P.nr);
    pack_panels<T>(a.W, 1, a.out, a.out, a.in, (int)a.ldbt, P.nr, a.Bt);  // B[k, c] = W[c, k]
  }
  // C = (W_last ... W_first-after)^T, from the identity (n x n) backwards: C <- C W^T.
  std::vector<T>& C = P.Cadj;
  C.assign((size_t)n * ld, T(0));
  for (int i = 0; i < n; ++i) C[(size_t)i * ld + i] = 1;
  for (int s = nstages - 1; s > P.last_act; --s) {
    const Affine<T>& a = P.affine[s];
    P.R2.assign((size_t)n * ld, T(0));
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < a.in; ++k) {
        T acc = 0;
        for (int o = 0; o < a.out; ++o) acc += C[(size_t)i * ld + o] * a.W[(size_t)k * a.out + o];
        P.R2[(size_t)i * ld + k] = acc;
      }
    C.swap(P.R2);
  }
}

// What forward-over-reverse adds to prepare(): the adjoints' data, the constant rows
// transposed. R: the constant rows (m rows, ld apart) of the first activation.
template <class T>
static void prepare_fwdrev(Program<T>& P, const T* R, int64_t ld) {
  const int m = P.tb().m, n = P.n;
  prepare_adjoints<T>(P, ld);
  const int w = P.width[P.first_act];
  P.mpad = round_up(m, P.nr);
  pack_panels<T>(R, 1, ld, w, m, (int)P.mpad, P.nr, P.Rt);  // B[u, j] = R[j, u]
  // A tile's stacks (forward, slopes, adjoints) in about 192 KB.
  const int64_t per_point =
      ((2 + P.nacts + 2 * n) * (int64_t)P.Kf * ld + (int64_t)n * P.Kf * P.mpad) * (int64_t)sizeof(T);
  P.tile = std::max<int64_t>(1, std::min<int64_t>(16, (192 * 1024) / per_point));
}

// Everything a program is built from besides the weights' values: the stage bookkeeping
// (describe) and the derived data (prepare).
template <class T>
static void program_key(const Call<T>& c, int isa, int algorithm, std::vector<int64_t>& key) {
  key.clear();
  key.push_back(c.weights_token);
  key.push_back(isa);
  key.push_back(algorithm);
  key.push_back(c.order);
  key.push_back(c.m);
  key.push_back((int64_t)c.kinds.size());
  key.insert(key.end(), c.kinds.begin(), c.kinds.end());
  key.insert(key.end(), c.links.begin(), c.links.end());
  key.insert(key.end(), c.ins.begin(), c.ins.end());
  key.insert(key.end(), c.outs.begin(), c.outs.end());
  key.insert(key.end(), c.parts.begin(), c.parts.end());
  for (const std::vector<double>* v : {&c.slopes, &c.part_slopes})
    for (double d : *v) {
      int64_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      key.push_back(bits);
    }
}

// Programs kept per thread (networks alternating in one simulation step each keep theirs).
constexpr int kKeptPrograms = 4;
// Programs built and reused, all threads (NnderivMlpTaylorPrograms: for tests and profiles).
static std::atomic<uint64_t> g_built{0}, g_reused{0};

// This thread's program for c: one built for the same token and structure if kept (*reuse
// set), else the least recently used (to be rebuilt). shared: every slice has the same
// weights (only then is there one program per call to keep).
template <class T>
static Program<T>& pick_program(const Call<T>& c, int isa, int algorithm, bool shared, bool* reuse) {
  thread_local Program<T> kept[kKeptPrograms];
  thread_local uint64_t clock = 0;
  thread_local std::vector<int64_t> key;
  ++clock;
  *reuse = false;
  program_key<T>(c, isa, algorithm, key);
  Program<T>* victim = &kept[0];
  for (Program<T>& P : kept) {
    if (shared && c.weights_token != 0 && P.reusable && P.key == key) {
      P.last_used = clock;
      *reuse = true;
      g_reused.fetch_add(1, std::memory_order_relaxed);
      return P;
    }
    if (P.last_used < victim->last_used) victim = &P;
  }
  victim->last_used = clock;
  victim->reusable = false;
  g_built.fetch_add(1, std::memory_order_relaxed);
  victim->key.swap(key);
  return *victim;
}

// Fills P for slice `slice` of c. reuse: P was built from these very weights (values) and
// structure, only the addresses are set again.
template <class T>
static void prepare(Program<T>& P, const Call<T>& c, int64_t slice, bool reuse) {
  const Tables& tb = P.tb();
  const int m = tb.m;
  const int nstages = (int)P.kinds.size();
  if ((int)P.affine.size() < nstages) P.affine.resize(nstages);
  int widest = m, ai = 0;
  P.first_act = nstages;
  P.width.resize(nstages);
  for (int s = 0; s < nstages; ++s) {
    if (P.kinds[s] != kAffineStage) {
      if (P.kinds[s] >= 0 && P.first_act == nstages) P.first_act = s;
      P.width[s] = s == 0 ? m : P.width[s - 1];
      continue;
    }
    Affine<T>& a = P.affine[s];
    a.in = c.ins[ai];
    a.out = c.outs[ai];
    P.width[s] = a.out;
    const size_t first = (size_t)ai * c.lead.size();
    a.W = c.W[ai] + c.slice_of(c.wstride, first, slice) * (int64_t)a.in * a.out;
    a.b = c.b[ai] ? c.b[ai] + c.slice_of(c.bstride, first, slice) * (int64_t)a.out : nullptr;
    ++ai;
    widest = std::max(widest, a.out);
    a.ncols = round_up(a.out, P.nr);
    a.narrow = false;
    a.Wt = nullptr;
    if (s < P.first_act) continue;  // leading layers: applied to the values only
    a.narrow = a.out < kNarrowBelow<T>;
    if (a.narrow) {
      if (a.out == 1) {
        a.Wt = a.W;  // (in, 1) is its own transpose
      } else if (reuse) {
        a.Wt = a.Wtbuf.data();
      } else {
        a.Wtbuf.resize((size_t)a.out * a.in);
        for (int k = 0; k < a.in; ++k)
          for (int o = 0; o < a.out; ++o) a.Wtbuf[(size_t)o * a.in + k] = a.W[(size_t)k * a.out + o];
        a.Wt = a.Wtbuf.data();
      }
    } else if (!reuse) {
      pack_panels<T>(a.W, a.out, 1, a.in, a.out, a.ncols, P.nr, a.B);
    }
  }
  if (reuse) return;  // the rest derives from the weights' values and the structure alone
  const int64_t ld = round_up(widest, P.nr);
  P.maxld = ld;
  if (P.Rp.size() < (size_t)tb.K * ld) P.Rp.resize((size_t)tb.K * ld);
  // The constant rows R (m x w) after the leading affine layers, as rows 1..m of Rp, and
  // their products; only the first rw = round_up(w) columns are ever read.
  T* const R = P.Rp.data() + (int64_t)tb.off1 * ld;
  int w = m;
  if (P.first_act == 1) {
    // One leading layer: R = W.
    const Affine<T>& a = P.affine[0];
    w = a.out;
    NND_DISPATCH(P.isa, constant_rows<T>(a.W, m, w, R, ld, round_up(w, P.nr)));
  } else {
    const size_t msz = (size_t)m * ld;
    P.R.assign(msz, T(0));
    for (int j = 0; j < m; ++j) P.R[(size_t)j * ld + j] = 1;
    for (int s = 0; s < P.first_act; ++s) {
      const Affine<T>& a = P.affine[s];
      P.R2.assign(msz, T(0));
      for (int j = 0; j < m; ++j)
        for (int k = 0; k < a.in; ++k) {
          const T r = P.R[(size_t)j * ld + k];
          for (int o = 0; o < a.out; ++o) P.R2[(size_t)j * ld + o] += r * a.W[(size_t)k * a.out + o];
        }
      std::swap(P.R, P.R2);
      w = a.out;
    }
    const int rw = round_up(w, P.nr);
    for (int j = 0; j < m; ++j) std::memcpy(R + (int64_t)j * ld, &P.R[(size_t)j * ld], sizeof(T) * rw);
  }
  const int rw = round_up(w, P.nr);
  NND_DISPATCH(P.isa, constant_products<T>(tb, P.Rp.data(), ld, rw));
  if (P.fwdrev) {
    prepare_fwdrev<T>(P, R, ld);
    return;
  }
  if (P.fwdadj) {
    prepare_adjoints<T>(P, ld);
    // A tile's stacks, values, slopes and adjoints in about 192 KB, but at least 6 points:
    // the pre-pass multiplies one row per point (and n adjoints), and a matmul of fewer
    // rows than the micro-kernel's 6 waits on its FMAs' latency (m = 3, 128 x 3, n = 1:
    // one point per tile ran 1.2x slower than forward, 6 per tile 1.35x faster).
    const int64_t per_point = P.fwdadj_point_size() * (int64_t)sizeof(T);
    P.tile = std::max<int64_t>(6, std::min<int64_t>(16, (192 * 1024) / per_point));
    return;
  }
  // A tile's two stacks (and those kept for skip stages) in about 96 KB (L2-resident; the
  // weights of a 64-wide layer are 32 KB).
  const int64_t per_point = (int64_t)tb.K * ld * (int64_t)sizeof(T) * (2 + P.nslots);
  P.tile = std::max<int64_t>(1, std::min<int64_t>(16, (96 * 1024) / per_point));
}

template <class T>
static void run_range(const Program<T>& P, const T* x, const Outputs<T>& out, int64_t b0, int64_t b1) {
  thread_local std::vector<T> work;
  const size_t need = P.work_size();
  if (work.size() < need) work.assign(need, T(0));
  if (P.fwdrev)
    NND_DISPATCH(P.isa, run_points_fwdrev<T>(P, x, out, b0, b1, work.data()));
  else if (P.fwdadj)
    NND_DISPATCH(P.isa, run_points_fwdadj<T>(P, x, out, b0, b1, work.data()));
  else
    NND_DISPATCH(P.isa, run_points<T>(P, x, out, b0, b1, work.data()));
}

template <class T>
static double flops_per_point(const Program<T>& P) {
  double f = 0;
  if (P.fwdrev) {
    for (int s = P.first_act + 1; s < P.last_act; ++s)
      if (P.kinds[s] == kAffineStage) f += 2.0 * (1 + P.n) * P.Kf * P.affine[s].in * P.affine[s].out;
    return f + 2.0 * P.n * P.Kf * P.width[P.first_act] * P.tb().m + 1.0;
  }
  if (P.fwdadj) {
    for (size_t s = P.first_act + 1; s < P.kinds.size(); ++s)
      if (P.kinds[s] == kAffineStage)
        f += 2.0 * ((int)s < P.last_act ? P.Kf + 1 + P.n : P.fwdadj_stack_rows()) * P.affine[s].in * P.affine[s].out;
    if (P.first_act != P.last_act && P.tb().order >= 2) {  // adjoints against the top-order terms
      // multiply-adds per term and unit: the rule's (3 at order 3, 1 at order 2), one per
      // output beyond a single one (methods/_cost.py, _contraction_macs)
      const double macs = (P.tb().order == 3 ? 3 : 1) + (P.n > 1 ? P.n : 0);
      for (int s = P.first_act; s <= P.last_act; ++s)
        if (P.kinds[s] >= 0) f += 2.0 * macs * P.top_rows() * P.width[s];
    }
    return f + 1.0;
  }
  for (size_t s = 0; s < P.kinds.size(); ++s)
    if (P.kinds[s] == kAffineStage && (int)s > P.first_act) f += 2.0 * P.tb().K * P.affine[s].in * P.affine[s].out;
  return f + 1.0;
}

template <class T>
static void run_batch(const Program<T>& P, const T* x, const Outputs<T>& out, int64_t batch) {
  // Threads pay off from about 1 ms of work: one point (or a few) never pays a hand-off.
  const int64_t tiles = (batch + P.tile - 1) / P.tile;
  const double flops = flops_per_point(P) * (double)batch;
  if (tiles >= 2 && flops > 2e6) {
    Pool* p = pool();
    if (p->size() > 1) {
      // Chunks of whole tiles, about 4 per thread, for balance under noisy neighbours.
      const int64_t chunks = std::min<int64_t>(tiles, 4 * p->size());
      const int64_t per = (tiles + chunks - 1) / chunks * P.tile;
      const int64_t nchunks = (batch + per - 1) / per;
      std::function<void(int64_t)> f = [&](int64_t c) {
        run_range<T>(P, x, out, c * per, std::min(batch, (c + 1) * per));
      };
      if (p->parallel_for(nchunks, f)) return;
    }
  }
  run_range<T>(P, x, out, 0, batch);
}

// Appends to ``out`` the slice strides of an operand's leading dims (all but its last
// ``core``) against the results' ``lead``, right-aligned as in broadcasting: 0 where the
// operand has size 1 (shared along that dim). False if a dim is neither 1 nor the
// results'. ``whole``: whether the operand has every leading dim in full.
static bool lead_strides(ffi::Span<const int64_t> dims, size_t core, const std::vector<int64_t>& lead,
                         std::vector<int64_t>& out, bool* whole = nullptr) {
  if (dims.size() < core) return false;
  const size_t own = dims.size() - core, r = lead.size();
  if (own > r) return false;
  const size_t base = out.size();
  out.resize(base + r);
  int64_t acc = 1;
  bool all = true;
  for (size_t j = r; j-- > 0;) {
    const int64_t d = j >= r - own ? dims[j - (r - own)] : 1;
    if (d != 1 && d != lead[j]) return false;
    out[base + j] = d == 1 ? 0 : acc;
    all = all && d == lead[j];
    acc *= d;
  }
  if (whole) *whole = all;
  return true;
}

// A large result buffer is usually fresh memory (malloc maps allocations of 32 MB and
// more anew each time), so the kernel's first write to each 4 KiB page takes a page fault.
// On the 2-core EPYC VM that is about 1 GB/s: at m = 16, n = 8, full layout (280 KB of
// results per point) the faults took 35% of the call. Asking for transparent huge pages
// on the buffer's whole 2 MiB pages cuts that 4x (33.5 MB written into fresh memory: 32.6
// ms, with the advice 8.2 ms). Advice only: the kernel ignores whether the system takes it
// (THP off, not a mapping of its own), and it does not change what the memory holds.
static void advise_huge_pages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = ((uintptr_t)data + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = ((uintptr_t)data + bytes) & ~(kHuge - 1);
#ifdef MADV_HUGEPAGE
  if (end > begin) (void)madvise((void*)begin, end - begin, MADV_HUGEPAGE);
#endif
}

// The stage bookkeeping of a program for c (kinds, skip slots, activation parts): what
// run_points reads besides the derived data. A reused program has it already.
template <class T>
static void describe(Program<T>& P, const Call<T>& c, int isa, int algorithm) {
  P.isa = isa;
  P.nr = panel_width<T>(isa);
  P.fwdrev = algorithm == 1;
  P.fwdadj = algorithm == 2;
  P.order_out = c.order;
  P.tbp = &tables_for(c.m, P.fwdrev ? c.order - 1 : c.order);
  const int top_start[4] = {1, P.tbp->off1, P.tbp->off2, P.tbp->off3};
  P.Kf = P.fwdrev && c.order == 1 ? 1 : P.fwdadj ? top_start[c.order] : P.tbp->K;
  P.n = c.outs.empty() ? c.m : c.outs.back();
  const int nst = (int)c.kinds.size();
  P.kinds.resize(nst);
  P.slopes.resize(nst);
  P.link.assign(nst, -1);
  P.save_slot.assign(nst + 1, -1);
  P.release.assign(nst, 0);
  P.nslots = 0;
  for (int s = 0; s < nst; ++s) {
    P.kinds[s] = c.kinds[s] == kSkipStage ? kSkipStage : c.kinds[s] < 0 ? kAffineStage : (int)c.kinds[s];
    P.slopes[s] = s < (int)c.slopes.size() ? (T)c.slopes[s] : T(0);
    if (P.kinds[s] == kSkipStage) P.link[s] = (int)c.links[s];
  }
  // Slots for the kept stacks, reused once a stack's last skip stage has read it (a chain
  // of residual blocks keeps one at a time).
  {
    std::vector<int>& last = P.last_use;
    last.assign(nst + 1, -1);
    for (int s = 0; s < nst; ++s)
      if (P.kinds[s] == kSkipStage) last[P.link[s]] = s;
    std::vector<int>& slot_free = P.slot_free;
    slot_free.clear();
    for (int k = 0; k <= nst; ++k) {
      if (k > 0 && P.kinds[k - 1] == kSkipStage && last[P.link[k - 1]] == k - 1) {
        P.release[k - 1] = 1;  // stage k - 1 read its source for the last time
        slot_free.push_back(P.save_slot[P.link[k - 1]]);
      }
      if (last[k] < 0) continue;
      if (slot_free.empty()) slot_free.push_back(P.nslots++);
      P.save_slot[k] = slot_free.back();
      slot_free.pop_back();
    }
  }
  // Every activation stage's parts: those listed (sorted by first unit), else one.
  P.part_begin.assign(nst + 1, 0);
  P.parts.clear();
  for (int s = 0; s < nst; ++s) {
    P.part_begin[s] = (int)P.parts.size();
    if (P.kinds[s] < 0) continue;
    for (size_t q = 0; q + 2 < c.parts.size(); q += 3)
      if (c.parts[q] == s) P.parts.push_back({(int)c.parts[q + 1], (int)c.parts[q + 2], (T)c.part_slopes[q / 3]});
    if ((int)P.parts.size() == P.part_begin[s]) P.parts.push_back({0, P.kinds[s], P.slopes[s]});
  }
  P.part_begin[nst] = (int)P.parts.size();
}

template <class T>
static void run_call(const Call<T>& c) {
  const int m = c.m, order = c.order;
  const bool full = c.full;
  const int64_t Bp = c.Bp, S = c.S;
  const int n = c.outs.empty() ? m : c.outs.back();
  bool shared = true;
  for (int64_t st : c.wstride) shared = shared && st == 0;
  for (int64_t st : c.bstride) shared = shared && st == 0;

  const int P2 = order >= 2 ? (full ? m * m : m * (m + 1) / 2) : 0;
  const int P3 = order >= 3 ? (full ? m * m * m : m * (m + 1) * (m + 2) / 6) : 0;
  // Forward-over-reverse needs an activation to sweep back through; without one the
  // network is affine and the forward recursion is exact and as cheap.
  bool any_act = false;
  for (int64_t k : c.kinds) any_act = any_act || k >= 0;
  const int isa = current_isa();
  bool reuse = false;
  const int algorithm = any_act ? c.algorithm : 0;
  Program<T>& P = pick_program<T>(c, isa, algorithm, shared, &reuse);
  if (!reuse) describe<T>(P, c, isa, algorithm);

  const int64_t sizes[4] = {n, (int64_t)n * m, (int64_t)n * P2, (int64_t)n * P3};
  auto outputs_at = [&](int64_t point0) {
    Outputs<T> o{c.res[0] + point0 * sizes[0],
                 order >= 1 ? c.res[1] + point0 * sizes[1] : nullptr,
                 order >= 2 ? c.res[2] + point0 * sizes[2] : nullptr,
                 order >= 3 ? c.res[3] + point0 * sizes[3] : nullptr,
                 P2,
                 P3,
                 full};
    return o;
  };
  for (int k = 0; k <= std::min(order, 3); ++k) advise_huge_pages(c.res[k], sizeof(T) * S * Bp * sizes[k]);
  if (shared) {  // one program for every slice
    prepare<T>(P, c, 0, reuse);
    P.reusable = c.weights_token != 0;
  }
  if (shared && c.x_whole) {  // one batch of S * Bp points
    run_batch<T>(P, c.x, outputs_at(0), S * Bp);
    return;
  }
  for (int64_t s = 0; s < S; ++s) {
    if (!shared) prepare<T>(P, c, s, false);
    run_batch<T>(P, c.x + c.slice_of(c.xstride, 0, s) * Bp * m, outputs_at(s * Bp), Bp);
  }
}

// Checks the stage attributes that only the program's shape constrains: skip sources
// after the first activation (the kernel keeps stacks, not the leading values), parts
// inside the stage, starting at its first unit, in order, with known codes.
static const char* check_stages(ffi::Span<const int64_t> kinds, ffi::Span<const int64_t> links,
                                ffi::Span<const int64_t> parts, ffi::Span<const double> part_slopes, int algorithm) {
  const int64_t nst = (int64_t)kinds.size();
  int64_t first_act = nst;
  for (int64_t s = 0; s < nst; ++s)
    if (kinds[s] >= 0) {
      first_act = s;
      break;
    }
  for (int64_t s = 0; s < nst; ++s) {
    if (kinds[s] < -3) return "unknown stage kind";
    if (kinds[s] >= kNumActs) return "unknown activation code";
    if (kinds[s] != kSkipStage) continue;
    if (algorithm == 1) return "forward-over-reverse takes no skip stage";
    if (algorithm == 2) return "forward with the top order by adjoint takes no skip stage";
    if ((int64_t)links.size() != nst) return "links must have one entry per stage";
    if (links[s] <= first_act || links[s] > s) return "a skip stage must add a value after the first activation";
  }
  if (parts.size() % 3 != 0 || part_slopes.size() * 3 < parts.size()) return "parts must be (stage, unit, code) triples";
  int64_t last_stage = -1, last_start = -1;
  for (size_t q = 0; q < parts.size(); q += 3) {
    const int64_t s = parts[q], start = parts[q + 1], code = parts[q + 2];
    if (s == -1) continue;  // the placeholder of an empty list
    if (s < 0 || s >= nst || kinds[s] < 0) return "a part names a stage that is no activation";
    if (code < 0 || code >= kNumActs) return "unknown activation code in parts";
    if (s != last_stage ? start != 0 : start <= last_start) return "a stage's parts must start at 0, in order";
    last_stage = s;
    last_start = start;
  }
  return nullptr;
}

template <class T>
static ffi::Error compute(const ffi::AnyBuffer& x, const ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                          ffi::Span<const int64_t> kinds, ffi::Span<const double> slopes, ffi::Span<const int64_t> links,
                          ffi::Span<const int64_t> parts, ffi::Span<const double> part_slopes, int order, bool full,
                          int algorithm, int64_t weights_token) {
  const auto xd = x.dimensions();
  if (xd.size() < 2) return ffi::Error::InvalidArgument("x must have rank >= 2");
  thread_local Call<T> c;  // this thread's, reused: no allocation in steady state
  c.clear();
  c.Bp = xd[xd.size() - 2];
  c.m = (int)xd[xd.size() - 1];
  c.order = order;
  c.full = full;
  c.algorithm = algorithm;
  c.weights_token = weights_token;
  const int64_t Bp = c.Bp;
  const int m = c.m;
  if ((int64_t)rets.size() != order + 1) return ffi::Error::InvalidArgument("expected order + 1 results");
  for (size_t i = 0; i < rets.size(); ++i) {
    auto r = rets.get<ffi::AnyBuffer>(i);
    if (r.has_error()) return r.error();
    ffi::AnyBuffer buf = *r.value();
    c.res.push_back(reinterpret_cast<T*>(buf.untyped_data()));
    if (i == 0) {  // the value: (*lead, Bp, n)
      const auto rd = buf.dimensions();
      if (rd.size() < 2 || rd[rd.size() - 2] != c.Bp) return ffi::Error::InvalidArgument("results do not match x");
      c.lead.assign(rd.begin(), rd.end() - 2);
    }
  }
  c.S = 1;
  for (int64_t d : c.lead) c.S *= d;
  if (m <= 0) return ffi::Error::InvalidArgument("x has no inputs");
  // Operands and their slice counts.
  size_t ai = 0;
  if (const char* bad = check_stages(kinds, links, parts, part_slopes, algorithm)) return ffi::Error::InvalidArgument(bad);
  for (size_t s = 0; s < kinds.size(); ++s) {
    if (kinds[s] >= 0 || kinds[s] == kSkipStage) continue;
    if (ai >= args.size()) return ffi::Error::InvalidArgument("missing weight operand");
    auto wb = args.get<ffi::AnyBuffer>(ai++);
    if (wb.has_error()) return wb.error();
    const auto wd = wb.value().dimensions();
    if (wd.size() < 2) return ffi::Error::InvalidArgument("weights must have rank >= 2");
    const int in = (int)wd[wd.size() - 2], outd = (int)wd[wd.size() - 1];
    if (in != (c.outs.empty() ? m : c.outs.back()))
      return ffi::Error::InvalidArgument("weight shapes do not chain");
    c.W.push_back(reinterpret_cast<const T*>(wb.value().untyped_data()));
    if (!lead_strides(wd, 2, c.lead, c.wstride)) return ffi::Error::InvalidArgument("parameter slices do not match");
    c.ins.push_back(in);
    c.outs.push_back(outd);
    if (kinds[s] == -2) {
      if (ai >= args.size()) return ffi::Error::InvalidArgument("missing bias operand");
      auto bb = args.get<ffi::AnyBuffer>(ai++);
      if (bb.has_error()) return bb.error();
      c.b.push_back(reinterpret_cast<const T*>(bb.value().untyped_data()));
      if (!lead_strides(bb.value().dimensions(), 1, c.lead, c.bstride))
        return ffi::Error::InvalidArgument("parameter slices do not match");
    } else {
      c.b.push_back(nullptr);
      c.bstride.resize(c.bstride.size() + c.lead.size(), 0);
    }
  }
  if (!lead_strides(xd, 2, c.lead, c.xstride, &c.x_whole))
    return ffi::Error::InvalidArgument("x slices do not match the results");
  if (c.S == 0 || Bp == 0) return ffi::Error::Success();
  c.x = reinterpret_cast<const T*>(x.untyped_data());
  c.kinds.assign(kinds.begin(), kinds.end());
  c.slopes.assign(slopes.begin(), slopes.end());
  c.links.assign(links.begin(), links.end());
  c.parts.assign(parts.begin(), parts.end());
  c.part_slopes.assign(part_slopes.begin(), part_slopes.end());
  run_call<T>(c);
  return ffi::Error::Success();
}

static ffi::Error MlpTaylorImpl(ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                                ffi::Span<const int64_t> kinds, ffi::Span<const double> slopes,
                                ffi::Span<const int64_t> links, ffi::Span<const int64_t> parts,
                                ffi::Span<const double> part_slopes, int64_t order, int64_t full, int64_t algorithm,
                                int64_t weights_token) {
  if (order < 1 || order > 3) return ffi::Error::InvalidArgument("order must be 1, 2 or 3");
  if (algorithm < 0 || algorithm > 2) return ffi::Error::InvalidArgument("algorithm must be 0, 1 or 2");
  switch (x.element_type()) {
    case ffi::DataType::F64:
      return compute<double>(x, args, rets, kinds, slopes, links, parts, part_slopes, (int)order, full != 0,
                             (int)algorithm, weights_token);
    case ffi::DataType::F32:
      return compute<float>(x, args, rets, kinds, slopes, links, parts, part_slopes, (int)order, full != 0,
                            (int)algorithm, weights_token);
    default:
      return ffi::Error::InvalidArgument("x must be float32 or float64");
  }
}

}  // namespace nnd

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnderivMlpTaylor, nnd::MlpTaylorImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("kinds")
                                  .Attr<ffi::Span<const double>>("slopes")
                                  .Attr<ffi::Span<const int64_t>>("links")
                                  .Attr<ffi::Span<const int64_t>>("parts")
                                  .Attr<ffi::Span<const double>>("part_slopes")
                                  .Attr<int64_t>("order")
                                  .Attr<int64_t>("full")
                                  .Attr<int64_t>("algorithm")
                                  .Attr<int64_t>("weights_token"));

// For tests and status reports: which compute copy new calls run (an nnd::Isa value).
extern "C" int NnderivMlpTaylorIsa() { return nnd::current_isa(); }

// Programs built and reused so far (all threads): out[0] built, out[1] reused.
extern "C" void NnderivMlpTaylorPrograms(uint64_t* out) {
  out[0] = nnd::g_built.load(std::memory_order_relaxed);
  out[1] = nnd::g_reused.load(std::memory_order_relaxed);
}

// Makes new calls run the copy `isa` names (an nnd::Isa value) if this CPU runs it, else
// the widest copy below it; -1 restores the detected one. Returns the copy now in use.
// For comparing the copies on one machine (tests, NNDERIV_NATIVE_ISA); not during a call.
extern "C" int NnderivMlpTaylorSetIsa(int isa) {
  using namespace nnd;
  int v = isa < 0 ? detected_isa() : std::min(isa, detected_isa());
  if (v != kIsaAvx512 && v != kIsaAvx2) v = kIsaBaseline;
  g_isa.store(v, std::memory_order_relaxed);
  return v;
}
