/* A profiling shim: times every cblas_sgemm call MLX makes, then forwards it to the real BLAS.

   Preloaded before OpenBLAS (LD_PRELOAD=sgemm_timer.so:libopenblas.so.0), it resolves the next
   cblas_sgemm with dlsym(RTLD_NEXT) and keeps, per distinct call shape, the calls, the wall time
   and the calling thread's CPU time; scripts/profile_step.py reads them through ctypes. MLX
   calls BLAS from its one CPU stream thread. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

#define SHAPES 256
struct shape {
  int m, n, k, ta, tb;
  long long calls, ns, cpu_ns;
};
static struct shape shapes[SHAPES];
static int used;
static sgemm_fn real;

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (!real) real = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  struct timespec start, end, cpu_start, cpu_end;
  clock_gettime(CLOCK_MONOTONIC, &start);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu_start);
  real(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu_end);
  clock_gettime(CLOCK_MONOTONIC, &end);
  long long ns = (end.tv_sec - start.tv_sec) * 1000000000LL + (end.tv_nsec - start.tv_nsec);
  long long cpu_ns = (cpu_end.tv_sec - cpu_start.tv_sec) * 1000000000LL +
                     (cpu_end.tv_nsec - cpu_start.tv_nsec);
  int i = 0;
  while (i < used && !(shapes[i].m == m && shapes[i].n == n && shapes[i].k == k &&
                       shapes[i].ta == ta && shapes[i].tb == tb))
    i++;
  if (i == used) {
    if (used == SHAPES) i = SHAPES - 1; /* overflow: lump into the last entry */
    else {
      used++;
      shapes[i] = (struct shape){m, n, k, ta, tb, 0, 0, 0};
    }
  }
  shapes[i].calls++;
  shapes[i].ns += ns;
  shapes[i].cpu_ns += cpu_ns;
}

int sgemm_timer_count(void) { return used; }
void sgemm_timer_reset(void) { used = 0; }
/* entry i as 8 long longs: m, n, k, trans_a, trans_b, calls, wall ns, calling thread CPU ns */
void sgemm_timer_entry(int i, long long *out) {
  struct shape s = shapes[i];
  long long v[8] = {s.m, s.n, s.k, s.ta, s.tb, s.calls, s.ns, s.cpu_ns};
  for (int j = 0; j < 8; j++) out[j] = v[j];
}
