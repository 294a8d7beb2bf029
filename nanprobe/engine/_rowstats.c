/* A statistics row's numbers in one read of a dense CPU tensor's memory (nanprobe.engine.stats).

   The probe measures every op's output. In torch that is |x| written out, then a reduction over it:
   two passes and a write, for values the op has just produced. Here, one read gives the largest
   |x|, the smallest |x| and the smallest non-zero |x| (as bit patterns: with the sign cleared, a
   float's bits ordered as an integer order its magnitude); a second read, only when some value lies
   below the smallest normal, counts the zeros and the subnormals. The numbers are the same integers
   the torch path computes, so a row does not depend on which path ran.

   Optional: when this module is not built (no C compiler at install time), stats.py computes the
   same row with torch ops. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* AVX2 where the CPU has it, chosen once at load time; plain x86-64 (SSE2) otherwise. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* The counting pass keeps counters as narrow as the values (so that it vectorises) over blocks
   short enough not to overflow them. */
#define BLOCK 32768

#define SCAN(W, T, C)                                                                              \
    CLONES static void range##W(const T *p, Py_ssize_t n, T mag, T *hi_out, T *lo_out,          \
                                T *lonz_out) {                                                  \
        T hi = 0, lo = mag, lonz = mag;                                                         \
        for (Py_ssize_t i = 0; i < n; i++) {                                                    \
            T u = (T)(p[i] & mag);                                                              \
            T v = (T)((T)(u - 1) & mag); /* 0 wraps to the largest pattern */                   \
            hi = u > hi ? u : hi;                                                               \
            lo = u < lo ? u : lo;                                                               \
            lonz = v < lonz ? v : lonz;                                                         \
        }                                                                                       \
        *hi_out = hi;                                                                           \
        *lo_out = lo;                                                                           \
        *lonz_out = lonz;                                                                       \
    }                                                                                           \
    CLONES static void count##W(const T *p, Py_ssize_t n, T mag, T tiny, uint64_t *zeros_out,   \
                                uint64_t *small_out) {                                          \
        uint64_t zeros = 0, small = 0;                                                          \
        for (Py_ssize_t b = 0; b < n; b += BLOCK) {                                             \
            Py_ssize_t e = n - b < BLOCK ? n : b + BLOCK;                                       \
            C z = 0, s = 0;                                                                     \
            for (Py_ssize_t i = b; i < e; i++) {                                                \
                T u = (T)(p[i] & mag);                                                          \
                z += u == 0;                                                                    \
                s += u < tiny;                                                                  \
            }                                                                                   \
            zeros += z;                                                                         \
            small += s;                                                                         \
        }                                                                                       \
        *zeros_out = zeros;                                                                     \
        *small_out = small;                                                                     \
    }                                                                                           \
    static void scan##W(const void *data, Py_ssize_t n, long long tiny, long long inf,          \
                        long long out[4]) {                                                     \
        const T mag = (T)(((uint64_t)1 << (8 * sizeof(T) - 1)) - 1);                          \
        T hi, lo, lonz;                                                                         \
        uint64_t zeros = 0, small = 0;                                                          \
        range##W((const T *)data, n, mag, &hi, &lo, &lonz);                                     \
        if (hi < (T)inf && lo < (T)tiny)                                                        \
            count##W((const T *)data, n, mag, (T)tiny, &zeros, &small);                         \
        out[0] = (long long)hi;                                                                 \
        out[1] = lonz == mag ? 0 : (long long)lonz + 1;                                         \
        out[2] = (long long)zeros;                                                              \
        out[3] = (long long)small;                                                              \
    }

SCAN(16, int16_t, uint16_t)
SCAN(32, int32_t, uint32_t)
SCAN(64, int64_t, uint64_t)

PyDoc_STRVAR(scan_doc,
"scan(address, numel, width, tiny, inf) -> (hi, lo, zeros, small)\n\n"
"Over numel floats of `width` bytes at `address` (one dense span of memory), with the sign bit\n"
"cleared: the largest bit pattern, the smallest non-zero one (0 when all are zero), and, when a\n"
"value lies below `tiny` (the smallest normal's bits) and none at or above `inf` (+inf's bits),\n"
"the number of zeros and of values below `tiny` (zeros included); 0 and 0 otherwise.");

static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    Py_ssize_t n;
    int width;
    long long tiny, inf, out[4];
    if (!PyArg_ParseTuple(args, "KniLL", &address, &n, &width, &tiny, &inf))
        return NULL;
    if (n < 0 || (width != 2 && width != 4 && width != 8)) {
        PyErr_SetString(PyExc_ValueError, "scan: numel must be >= 0 and width 2, 4 or 8");
        return NULL;
    }
    const void *data = (const void *)(uintptr_t)address;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2)
        scan16(data, n, tiny, inf, out);
    else if (width == 4)
        scan32(data, n, tiny, inf, out);
    else
        scan64(data, n, tiny, inf, out);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(LLLL)", out[0], out[1], out[2], out[3]);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowstats",
    "A statistics row's numbers in one read of a dense CPU tensor's memory.", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* What scan() returns and takes; stats.py uses the module only when it has the version it was written
   for, so a library left from an older checkout (an editable install not rebuilt) is not used. */
#define VERSION 1

PyMODINIT_FUNC PyInit__rowstats(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VERSION", VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
