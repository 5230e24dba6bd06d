/* Exports the standard CBLAS gemm names MLX calls and forwards them to the OpenBLAS of the
   `scipy-openblas32` wheel (PyPI), whose symbols carry a `scipy_` prefix but keep the 32-bit
   integer ABI. Preloaded (LD_PRELOAD=this.so), it lets MLX use that newer OpenBLAS.
   Build: gcc -O2 -shared -fPIC scipy_openblas_shim.c -o shim.so -L$LIB -lscipy_openblas
          -Wl,-rpath,$LIB   (LIB: scipy_openblas32.get_lib_dir()) */
typedef int blasint;

#define FORWARD(T, name)                                                                      \
  void scipy_cblas_##name(int, int, int, blasint, blasint, blasint, T, const T *, blasint,   \
                          const T *, blasint, T, T *, blasint);                               \
  void cblas_##name(int order, int ta, int tb, blasint m, blasint n, blasint k, T alpha,     \
                    const T *a, blasint lda, const T *b, blasint ldb, T beta, T *c,           \
                    blasint ldc) {                                                            \
    scipy_cblas_##name(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);        \
  }

FORWARD(float, sgemm)
FORWARD(double, dgemm)

void scipy_cblas_cgemm(int, int, int, blasint, blasint, blasint, const void *, const void *,
                       blasint, const void *, blasint, const void *, void *, blasint);
void cblas_cgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, const void *alpha,
                 const void *a, blasint lda, const void *b, blasint ldb, const void *beta,
                 void *c, blasint ldc) {
  scipy_cblas_cgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void scipy_openblas_set_num_threads(int);
void openblas_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }
char *scipy_openblas_get_config(void);
char *openblas_get_config(void) { return scipy_openblas_get_config(); }
char *scipy_openblas_get_corename(void);
char *openblas_get_corename(void) { return scipy_openblas_get_corename(); }
