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
// The first mask is counted in the loop that reads the row from memory for the L0 and L1; any further mask reads the
// row again, from the cache.
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

template <typename T>
void activity_rows(const T* f, int64_t rows, int64_t first_row, int64_t components, int64_t features,
                   const double* thresholds, int64_t masks, T* l0, T* l1, int32_t* counts, int32_t* last) {
  const int64_t width = components * features;
  std::memset(counts, 0, sizeof(int32_t) * masks * width);
  std::memset(last, 0, sizeof(int32_t) * masks * width);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t position = static_cast<int32_t>(first_row + r + 1);
    for (int64_t c = 0; c < components; ++c) {
      const T* row = f + r * width + c * features;
      T* item_l0 = l0 + r * components + c;
      T* item_l1 = l1 + r * components + c;
      for (int64_t k = 0; k < masks; ++k) {
        int32_t* count = counts + k * width + c * features;
        int32_t* seen = last + k * width + c * features;
        if (k == 0 && thresholds[k] < 0) {
          norms_and_count_row(row, features, NonZero<T>{}, position, count, seen, item_l0, item_l1);
        } else if (k == 0) {
          Above<T> above{static_cast<T>(thresholds[k])};
          norms_and_count_row(row, features, above, position, count, seen, item_l0, item_l1);
        } else if (thresholds[k] < 0) {
          count_row(row, features, NonZero<T>{}, position, count, seen);
        } else {
          count_row(row, features, Above<T>{static_cast<T>(thresholds[k])}, position, count, seen);
        }
      }
    }
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
