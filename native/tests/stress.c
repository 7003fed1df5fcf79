/* Memory-safety stress for the page-diff kernels, built with
 * -fsanitize=address,undefined by scripts/asan-tests.
 *
 * Every buffer is heap-allocated at its exact size, so any read or write past
 * an end is reported by AddressSanitizer. The decoder gets random streams and
 * mutated valid streams; the encoder gets edge-case pages (changes at the very
 * first and last bytes, alternating bytes, all-different pages) and tight
 * output capacities. Exits non-zero on any failed round-trip.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctlive_native.h"

#define PS CTL_PAGE_SIZE
#define NP 6

static unsigned long long rng = 88172645463325252ULL;
static unsigned long long next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void fill_case(unsigned char *o, unsigned char *n, int c) {
    for (int i = 0; i < NP * PS; i++) o[i] = (unsigned char)next();
    memcpy(n, o, NP * PS);
    switch (c % 6) {
    case 0: n[0] ^= 1; n[NP * PS - 1] ^= 1; break;
    case 1: for (int i = 0; i < NP * PS; i += 2) n[i] ^= 0x5a; break;
    case 2: for (int i = 0; i < NP * PS; i++) n[i] = (unsigned char)next(); break;
    case 3: memset(n + PS, 0, PS); n[PS * 3 + 4095] ^= 0xff; break;
    case 4: for (int k = 0; k < 64; k++) n[next() % (NP * PS)] ^= (unsigned char)(1 + next() % 255); break;
    default: for (int i = 0; i < NP * PS; i += 3) n[i] ^= 1; break;
    }
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 20000;
    int failures = 0;
    unsigned char *o = malloc(NP * PS), *n = malloc(NP * PS), *work = malloc(NP * PS);
    unsigned long long *h = malloc(NP * sizeof *h);
    unsigned int *idx = malloc(NP * sizeof *idx);
    ctl_encode_stats es;
    ctl_decode_stats ds;

    for (int c = 0; c < 600; c++) {
        fill_case(o, n, c);
        ctl_hash_pages(n, NP, h);
        ctl_zero_pages(n, NP, idx);
        ctl_changed_pages(o, n, NP, idx);
        /* Exact-size output buffers: full bound, then tight capacities. */
        size_t caps[3] = {NP * CTL_MAX_RECORD, CTL_MAX_RECORD, CTL_MAX_RECORD * 2 + 17};
        for (int k = 0; k < 3; k++) {
            unsigned char *out = malloc(caps[k]);
            memcpy(work, o, NP * PS);
            unsigned long long done = 0;
            while (done < NP) {
                unsigned int *rest = malloc((NP - done) * sizeof *rest);
                for (unsigned long long j = done; j < NP; j++) rest[j - done] = (unsigned int)j;
                if (ctl_encode(o, n, NP, rest, NP - done, out, caps[k], &es) != 0) failures++;
                free(rest);
                if (es.consumed == 0) { failures++; break; }
                unsigned char *exact = malloc(es.out_len ? es.out_len : 1);
                memcpy(exact, out, es.out_len);
                if (ctl_decode(work, NP, exact, es.out_len, &ds) != 0) failures++;
                free(exact);
                done += es.consumed;
            }
            if (memcmp(work, n, NP * PS) != 0) failures++;
            free(out);
        }
    }

    /* Decoder fuzz: mutated valid streams and pure noise, at exact sizes. */
    unsigned char *full = malloc(NP * CTL_MAX_RECORD);
    for (int r = 0; r < rounds; r++) {
        fill_case(o, n, r);
        ctl_encode(o, n, NP, NULL, 0, full, NP * CTL_MAX_RECORD, &es);
        size_t len = es.out_len;
        int noise = (r % 4) == 0;
        if (noise) len = next() % 64;
        if (!noise && len && (next() & 1)) len = next() % len; /* truncate */
        unsigned char *s = malloc(len ? len : 1);
        for (size_t i = 0; i < len; i++) s[i] = noise ? (unsigned char)next() : full[i];
        for (int m = 0; !noise && len && m < 1 + (int)(next() % 4); m++)
            s[next() % len] ^= (unsigned char)(1u << (next() % 8));
        memcpy(work, o, NP * PS);
        ctl_decode(work, NP, s, len, &ds);
        free(s);
    }
    /* Single-page arrays: any run that escapes its page escapes the allocation,
     * so AddressSanitizer sees it. */
    unsigned char *o1 = malloc(PS), *n1 = malloc(PS), *w1 = malloc(PS);
    unsigned char *enc1 = malloc(CTL_MAX_RECORD);
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < PS; i++) o1[i] = (unsigned char)next();
        memcpy(n1, o1, PS);
        int changes = 1 + (int)(next() % 200);
        for (int k = 0; k < changes; k++) n1[next() % PS] ^= (unsigned char)(1 + next() % 255);
        if (next() & 1) n1[PS - 1] ^= 0x80;
        ctl_encode(o1, n1, 1, NULL, 0, enc1, CTL_MAX_RECORD, &es);
        size_t len = es.out_len;
        unsigned char *s = malloc(len ? len : 1);
        memcpy(s, enc1, len);
        for (int m = 0; len && m < 1 + (int)(next() % 3); m++) {
            size_t at = next() % len;
            /* Bias towards the run-length bytes near the front of the payload. */
            if (next() & 1) at = next() % (len < 12 ? len : 12);
            s[at] = (next() & 1) ? (unsigned char)next() : (unsigned char)(s[at] ^ (1u << (next() % 8)));
        }
        memcpy(w1, o1, PS);
        ctl_decode(w1, 1, s, len, &ds);
        free(s);
    }
    free(o1); free(n1); free(w1); free(enc1);
    free(full);
    free(o); free(n); free(work); free(h); free(idx);
    if (failures) {
        fprintf(stderr, "stress: %d round-trip failures\n", failures);
        return 1;
    }
    printf("stress: ok (%d decoder fuzz rounds)\n", rounds);
    return 0;
}
