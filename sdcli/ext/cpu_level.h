/* The CPU level: the one place that decides which instruction sets the compiled kernels may use.
 *
 * Levels, each including the ones below it:
 *   SDCLI_LEVEL_BASELINE     the portable code: 4-lane vectors (SSE2 on x86-64, NEON on arm64), plain C loops
 *   SDCLI_LEVEL_AVX2         AVX2, FMA and F16C (with the ymm state enabled by the OS)
 *   SDCLI_LEVEL_AVX512       AVX-512F and AVX-512DQ (with the zmm state enabled by the OS)
 *   SDCLI_LEVEL_AVX512_BF16  AVX-512BW and AVX512_BF16
 *   SDCLI_LEVEL_AMX          AMX-TILE and AMX-BF16 (Linux only: the kernel must grant the tile data state)
 * The level in use is the lower of the best one this build, CPU and OS have (sdcli_cpu_detected) and the cap the
 * environment variable SDCLI_CPU_LEVEL names (one of sdcli_level_names; unset or empty: no cap). A cap above what
 * the CPU has gives the CPU's best. Every kernel asks sdcli_cpu_level() before it takes a path beyond the
 * baseline, so a capped run takes the same paths as a CPU of that level.
 *
 * Each extension module includes this header and so has its own copy of the state below. The module
 * sdcli.ext.levels (levels.pyx) reads the environment once per process and every other module copies its result
 * at import (sdcli_cpu_level_set), so all of them agree; a module that has not been given the level works it out
 * on its first call. An unknown SDCLI_CPU_LEVEL makes the cap -1 here and the import of a kernel module fail.
 *
 * SDCLI_BASELINE_ONLY (CFLAGS=-DSDCLI_BASELINE_ONLY) compiles x86-64 as any other machine: no code beyond the
 * baseline is built, and the detected level is the baseline. It checks that the portable build compiles; the
 * run-time cap SDCLI_CPU_LEVEL=baseline runs the same paths in a normal build.
 */
#ifndef SDCLI_CPU_LEVEL_H
#define SDCLI_CPU_LEVEL_H

#include <stdlib.h>
#include <string.h>

enum {
    SDCLI_LEVEL_BASELINE = 0,
    SDCLI_LEVEL_AVX2 = 1,
    SDCLI_LEVEL_AVX512 = 2,
    SDCLI_LEVEL_AVX512_BF16 = 3,
    SDCLI_LEVEL_AMX = 4,
    SDCLI_LEVEL_COUNT = 5
};

#define SDCLI_CPU_LEVEL_ENV "SDCLI_CPU_LEVEL"

static const char *const sdcli_level_names[SDCLI_LEVEL_COUNT] = {"baseline", "avx2", "avx512", "avx512_bf16",
                                                                 "amx"};

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(SDCLI_BASELINE_ONLY)
#define SDCLI_CPU_X86 1
#include <cpuid.h>
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#ifdef SDCLI_CPU_X86
static inline unsigned long long sdcli_cpu_xgetbv0(void) {
    unsigned eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}
#endif

/* The best level of this build, CPU and OS. Where it finds AMX on Linux it asks the kernel for permission to use
 * the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; process-wide, harmless to repeat),
 * without which the first tile instruction faults; AMX counts only when that is granted. */
static inline int sdcli_cpu_detected(void) {
#ifdef SDCLI_CPU_X86
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return SDCLI_LEVEL_BASELINE;
    __cpuid(1, a, b, c, d);
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1, fma = (c >> 12) & 1;
    if (!(osxsave && avx && f16c && fma)) return SDCLI_LEVEL_BASELINE;
    const unsigned long long xcr0 = sdcli_cpu_xgetbv0();
    unsigned max_subleaf;
    __cpuid_count(7, 0, max_subleaf, b, c, d);
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1;
    const int amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    int avx512_bf16 = 0;
    if (max_subleaf >= 1) {
        unsigned a1, b1, c1, d1;
        __cpuid_count(7, 1, a1, b1, c1, d1);
        avx512_bf16 = (a1 >> 5) & 1;
    }
    /* XCR0: SSE and AVX state (bits 1, 2); opmask, ZMM upper halves, ZMM16-31 (bits 5, 6, 7) */
    if (!(avx2 && (xcr0 & 0x6) == 0x6)) return SDCLI_LEVEL_BASELINE;
    if (!(avx512f && avx512dq && (xcr0 & 0xe6) == 0xe6)) return SDCLI_LEVEL_AVX2;
    if (!(avx512bw && avx512_bf16)) return SDCLI_LEVEL_AVX512;
#if defined(__linux__) && defined(__x86_64__)
    /* XCR0 bits 17, 18: tile configuration and tile data */
    if (amx_tile && amx_bf16 && ((xcr0 >> 17) & 3) == 3 && syscall(SYS_arch_prctl, 0x1023, 18) == 0)
        return SDCLI_LEVEL_AMX;
#else
    (void)amx_bf16;
    (void)amx_tile;
#endif
    return SDCLI_LEVEL_AVX512_BF16;
#else
    return SDCLI_LEVEL_BASELINE;
#endif
}

/* The cap SDCLI_CPU_LEVEL names: its level, SDCLI_LEVEL_COUNT - 1 when unset or empty, -1 when unknown. */
static inline int sdcli_cpu_cap(void) {
    const char *name = getenv(SDCLI_CPU_LEVEL_ENV);
    if (name == NULL || name[0] == '\0') return SDCLI_LEVEL_COUNT - 1;
    for (int level = 0; level < SDCLI_LEVEL_COUNT; level++)
        if (strcmp(name, sdcli_level_names[level]) == 0) return level;
    return -1;
}

/* this module's copy: -2 until known; the level in use, or -1 (an unknown cap: the baseline runs) */
static int sdcli_cpu_level_state = -2;

/* The level in use for a cap (from sdcli_cpu_cap) and a detected level; -1 for an unknown cap. */
static inline int sdcli_cpu_level_capped(int cap, int detected) {
    if (cap < 0) return -1;
    return cap < detected ? cap : detected;
}

/* Gives this module the level sdcli.ext.levels worked out (the value of sdcli_cpu_level_capped). Call it at
 * import, before any kernel runs: the state is then only read, also by parallel threads. */
static inline void sdcli_cpu_level_set(int level) { sdcli_cpu_level_state = level; }

/* The level every kernel dispatches on: SDCLI_LEVEL_BASELINE ... SDCLI_LEVEL_AMX. */
static inline int sdcli_cpu_level(void) {
    if (sdcli_cpu_level_state == -2)
        sdcli_cpu_level_state = sdcli_cpu_level_capped(sdcli_cpu_cap(), sdcli_cpu_detected());
    return sdcli_cpu_level_state < 0 ? SDCLI_LEVEL_BASELINE : sdcli_cpu_level_state;
}

#endif /* SDCLI_CPU_LEVEL_H */
