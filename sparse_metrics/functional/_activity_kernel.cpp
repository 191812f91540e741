// One pass over rows of SAE activations f [rows, components, features] (C-contiguous, float or double) for the
// per-item L0 and L1 and the per-feature activity statistics of feature density and dead features. Built and loaded
// by sparse_metrics/functional/_activity_kernel.py, which checks every shape, dtype and layout (and masks >= 1).
//
// For each row r and component c:
//   l0[r, c] = number of i with f[r, c, i] != 0 (NaN counts), l1[r, c] = sum_i |f[r, c, i]| (accumulated in double);
// for each activity mask k (fires: f != 0 where thresholds[k] < 0, else !(f <= thresholds[k]); NaN fires either way),
// and each part p of the rows (consecutive ranges, one per thread):
//   counts[p, k, c, i] = number of the part's rows in which feature i fires,
//   last[p, k, c, i] = r + 1 for the part's last such row r (0 where it does not fire there).
// Rows are read four at a time (see BLOCK). The first mask is counted in the loop that reads them from memory for the
// L0 and L1; any further mask reads them again, from the cache.
//
// The parts run on OpenMP threads. Built with -fopenmp into a process where torch has loaded its libgomp, the
// library resolves to that same runtime, so the parts run on torch's intra-op threads: threads of our own would share
// the cores with torch's workers, which keep spinning for a while after each parallel region (a third more time on
// a 2-core machine). For the same reason each thread zeroes its own counters: counters another thread zeroed cost
// as much again (measured on a [4096, 16384] float32 batch, 2% non-zero, two threads: 14 ms against 20-25 ms).

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

template <typename T>
struct NonZero {
  int32_t operator()(T value) const { return value != T(0); }
};

template <typename T>
struct Above {
  T threshold;
  int32_t operator()(T value) const { return !(value <= threshold); }
};

// Rows are taken four at a time: the counters are read and written once per four rows, not once per row, which
// takes the pass from about 1.9x to 1.15-1.25x the time of one read (f.sum()) of a [4096, 16384] float32 batch, 2%
// non-zero, on two threads. The last rows (fewer than four) are taken one at a time.
constexpr int64_t BLOCK = 4;
static_assert(BLOCK == 4, "count_block and norms_and_count_block read rows r0 to r3");

// The mask `thresholds[k]` names, passed to `visit` as a function of one value.
template <typename T, typename Visit>
void with_mask(double threshold, Visit visit) {
  if (threshold < 0) {
    visit(NonZero<T>{});
  } else {
    visit(Above<T>{static_cast<T>(threshold)});
  }
}

template <typename T, typename Fires>
void count_row(const T* row, int64_t features, Fires fires, int32_t position, int32_t* count, int32_t* seen) {
#pragma omp simd
  for (int64_t i = 0; i < features; ++i) {
    const int32_t fired = fires(row[i]);
    count[i] += fired;
    seen[i] = fired ? position : seen[i];
  }
}

template <typename T, typename Fires>
void norms_and_count_row(const T* row, int64_t features, Fires fires, int32_t position, int32_t* count,
                         int32_t* seen, T* l0, T* l1) {
  int32_t active = 0;
  double absolute = 0.0;
#pragma omp simd reduction(+ : active, absolute)
  for (int64_t i = 0; i < features; ++i) {
    const T value = row[i];
    active += value != T(0);
    absolute += std::fabs(static_cast<double>(value));
    const int32_t fired = fires(value);
    count[i] += fired;
    seen[i] = fired ? position : seen[i];
  }
  *l0 = static_cast<T>(active);
  *l1 = static_cast<T>(absolute);
}

// Rows row, row + stride, row + 2 * stride, row + 3 * stride at positions position .. position + 3.
template <typename T, typename Fires>
void count_block(const T* row, int64_t stride, int64_t features, Fires fires, int32_t position, int32_t* count,
                 int32_t* seen) {
  const T* r0 = row;
  const T* r1 = row + stride;
  const T* r2 = row + 2 * stride;
  const T* r3 = row + 3 * stride;
#pragma omp simd
  for (int64_t i = 0; i < features; ++i) {
    const int32_t x0 = fires(r0[i]), x1 = fires(r1[i]), x2 = fires(r2[i]), x3 = fires(r3[i]);
    count[i] += x0 + x1 + x2 + x3;
    seen[i] = x3 ? position + 3 : x2 ? position + 2 : x1 ? position + 1 : x0 ? position : seen[i];
  }
}

// As count_block, with each row's L0 and L1 (at l0[j * item_stride], l1[j * item_stride] for row j).
template <typename T, typename Fires>
void norms_and_count_block(const T* row, int64_t stride, int64_t features, Fires fires, int32_t position,
                           int32_t* count, int32_t* seen, T* l0, T* l1, int64_t item_stride) {
  const T* r0 = row;
  const T* r1 = row + stride;
  const T* r2 = row + 2 * stride;
  const T* r3 = row + 3 * stride;
  int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  double b0 = 0.0, b1 = 0.0, b2 = 0.0, b3 = 0.0;
  // Four scalar accumulators of each kind: an array reduction (reduction(+ : a[:4])) is not vectorised as well.
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t i = 0; i < features; ++i) {
    const T v0 = r0[i], v1 = r1[i], v2 = r2[i], v3 = r3[i];
    a0 += v0 != T(0);
    a1 += v1 != T(0);
    a2 += v2 != T(0);
    a3 += v3 != T(0);
    b0 += std::fabs(static_cast<double>(v0));
    b1 += std::fabs(static_cast<double>(v1));
    b2 += std::fabs(static_cast<double>(v2));
    b3 += std::fabs(static_cast<double>(v3));
    const int32_t x0 = fires(v0), x1 = fires(v1), x2 = fires(v2), x3 = fires(v3);
    count[i] += x0 + x1 + x2 + x3;
    seen[i] = x3 ? position + 3 : x2 ? position + 2 : x1 ? position + 1 : x0 ? position : seen[i];
  }
  const int32_t active[BLOCK] = {a0, a1, a2, a3};
  const double absolute[BLOCK] = {b0, b1, b2, b3};
  for (int64_t j = 0; j < BLOCK; ++j) {
    l0[j * item_stride] = static_cast<T>(active[j]);
    l1[j * item_stride] = static_cast<T>(absolute[j]);
  }
}

// Calls visit(row, c, fires, position, count, seen, is_first) for each component c and activity mask of the rows
// from row r on (position r + 1 in the batch): their values, the mask's counters, and whether it is the first mask.
template <typename T, typename Visit>
void each_mask(const T* f, int64_t r, int64_t first_row, int64_t components, int64_t features,
               const double* thresholds, int64_t masks, int32_t* counts, int32_t* last, Visit visit) {
  const int64_t width = components * features;
  const int32_t position = static_cast<int32_t>(first_row + r + 1);
  for (int64_t c = 0; c < components; ++c) {
    const T* row = f + r * width + c * features;
    for (int64_t k = 0; k < masks; ++k) {
      int32_t* count = counts + k * width + c * features;
      int32_t* seen = last + k * width + c * features;
      with_mask<T>(thresholds[k], [&](auto fires) { visit(row, c, fires, position, count, seen, k == 0); });
    }
  }
}

template <typename T>
void activity_rows(const T* f, int64_t rows, int64_t first_row, int64_t components, int64_t features,
                   const double* thresholds, int64_t masks, T* l0, T* l1, int32_t* counts, int32_t* last) {
  const int64_t width = components * features;
  std::memset(counts, 0, sizeof(int32_t) * masks * width);
  std::memset(last, 0, sizeof(int32_t) * masks * width);
  int64_t r = 0;
  for (; r + BLOCK <= rows; r += BLOCK) {
    each_mask(f, r, first_row, components, features, thresholds, masks, counts, last,
              [&](const T* row, int64_t c, auto fires, int32_t position, int32_t* count, int32_t* seen, bool first) {
                if (first) {
                  norms_and_count_block(row, width, features, fires, position, count, seen, l0 + r * components + c,
                                        l1 + r * components + c, components);
                } else {
                  count_block(row, width, features, fires, position, count, seen);
                }
              });
  }
  for (; r < rows; ++r) {
    each_mask(f, r, first_row, components, features, thresholds, masks, counts, last,
              [&](const T* row, int64_t c, auto fires, int32_t position, int32_t* count, int32_t* seen, bool first) {
                if (first) {
                  norms_and_count_row(row, features, fires, position, count, seen, l0 + r * components + c,
                                      l1 + r * components + c);
                } else {
                  count_row(row, features, fires, position, count, seen);
                }
              });
  }
}

// Rows split into `parts` consecutive ranges, one OpenMP thread each with counters of its own (part p's at
// counts + p * masks * components * features, likewise last); without OpenMP the parts run one after another.
template <typename T>
void activity_parts(const T* f, int64_t rows, int64_t components, int64_t features, const double* thresholds,
                    int64_t masks, int64_t parts, T* l0, T* l1, int32_t* counts, int32_t* last) {
  const int64_t width = components * features;
#pragma omp parallel for num_threads(static_cast<int>(parts)) schedule(static, 1)
  for (int64_t part = 0; part < parts; ++part) {
    const int64_t start = rows * part / parts;
    const int64_t stop = rows * (part + 1) / parts;
    activity_rows(f + start * width, stop - start, start, components, features, thresholds, masks,
                  l0 + start * components, l1 + start * components, counts + part * masks * width,
                  last + part * masks * width);
  }
}

}  // namespace

extern "C" {

// Whether the parts run in parallel (built with OpenMP).
int sparse_metrics_activity_parallel() {
#if defined(_OPENMP)
  return 1;
#else
  return 0;
#endif
}

void sparse_metrics_activity_float(const float* f, int64_t rows, int64_t components, int64_t features,
                                   const double* thresholds, int64_t masks, int64_t parts, float* l0, float* l1,
                                   int32_t* counts, int32_t* last) {
  activity_parts(f, rows, components, features, thresholds, masks, parts, l0, l1, counts, last);
}

void sparse_metrics_activity_double(const double* f, int64_t rows, int64_t components, int64_t features,
                                    const double* thresholds, int64_t masks, int64_t parts, double* l0, double* l1,
                                    int32_t* counts, int32_t* last) {
  activity_parts(f, rows, components, features, thresholds, masks, parts, l0, l1, counts, last);
}

}  // extern "C"
