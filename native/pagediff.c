/* ctlive page-diff kernels: change and zero detection, XXH64 page hashes,
 * XBZRLE-style delta encode and a bounds-checked decoder.
 *
 * Design notes:
 * - Every kernel walks whole buffers; Python never calls in per page.
 * - Word-at-a-time loops (memcpy into uint64_t, which gcc turns into plain
 *   loads) keep the code strict-aliasing clean and let -O3 vectorise.
 * - The decoder treats its input as hostile: every length is checked against
 *   what remains of the input and of the page before it is used, and a record
 *   is fully validated before its page is modified.
 */
#include <stdint.h>
#include <string.h>

#include "ctlive_native.h"

#define PS CTL_PAGE_SIZE
#define WORDS (PS / 8)

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t load32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- XXH64, from the xxHash specification (little-endian reads) ---------- */

static const uint64_t P1 = 0x9E3779B185EBCA87ULL;
static const uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
static const uint64_t P3 = 0x165667B19E3779F9ULL;
static const uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
static const uint64_t P5 = 0x27D4EB2F165667C5ULL;

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t xxh_round(uint64_t acc, uint64_t lane) {
    acc += lane * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t xxh_merge(uint64_t acc, uint64_t v) {
    acc ^= xxh_round(0, v);
    return acc * P1 + P4;
}

unsigned long long ctl_xxh64(const unsigned char *p, unsigned long long len,
                             unsigned long long seed) {
    const unsigned char *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const unsigned char *limit = end - 32;
        do {
            v1 = xxh_round(v1, load64(p));
            v2 = xxh_round(v2, load64(p + 8));
            v3 = xxh_round(v3, load64(p + 16));
            v4 = xxh_round(v4, load64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        h ^= xxh_round(0, load64(p));
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)load32(p) * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P5;
        h = rotl64(h, 11) * P1;
        p++;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

void ctl_hash_pages(const unsigned char *pages, unsigned long long npages,
                    unsigned long long *out) {
    for (unsigned long long i = 0; i < npages; i++)
        out[i] = ctl_xxh64(pages + i * PS, PS, 0);
}

/* ---- zero and change detection ------------------------------------------ */

static inline int page_is_zero(const unsigned char *p) {
    /* OR-accumulate a block at a time so the loop vectorises, with an early
     * exit every 512 bytes for pages that are obviously not zero. */
    for (int blk = 0; blk < PS; blk += 512) {
        uint64_t acc = 0;
        for (int i = 0; i < 512; i += 8) acc |= load64(p + blk + i);
        if (acc) return 0;
    }
    return 1;
}

static inline int page_equal(const unsigned char *a, const unsigned char *b) {
    /* glibc's memcmp is vectorised and stops at the first difference. */
    return memcmp(a, b, PS) == 0;
}

unsigned long long ctl_zero_pages(const unsigned char *pages, unsigned long long npages,
                                  unsigned int *out) {
    unsigned long long n = 0;
    for (unsigned long long i = 0; i < npages; i++)
        if (page_is_zero(pages + i * PS)) out[n++] = (unsigned int)i;
    return n;
}

unsigned long long ctl_changed_pages(const unsigned char *old_pages,
                                     const unsigned char *new_pages,
                                     unsigned long long npages, unsigned int *out) {
    unsigned long long n = 0;
    for (unsigned long long i = 0; i < npages; i++)
        if (!page_equal(old_pages + i * PS, new_pages + i * PS)) out[n++] = (unsigned int)i;
    return n;
}

/* ---- ULEB128 ------------------------------------------------------------- */

static inline size_t put_uleb(unsigned char *out, uint32_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (unsigned char)v;
    return n;
}

/* Reads a ULEB128 of at most 32 bits. Returns bytes used, 0 if truncated,
 * or (size_t)-1 if overlong or out of range. */
static inline size_t get_uleb(const unsigned char *in, size_t avail, uint32_t *v) {
    uint64_t r = 0;
    for (size_t i = 0; i < 5; i++) {
        if (i >= avail) return 0;
        unsigned char b = in[i];
        r |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            /* Reject non-minimal encodings (a trailing zero group), so each
             * value has exactly one encoding, and values above 32 bits. */
            if (i > 0 && b == 0) return (size_t)-1;
            if (r > 0xffffffffULL) return (size_t)-1;
            *v = (uint32_t)r;
            return i + 1;
        }
    }
    return (size_t)-1;
}

/* ---- delta encode -------------------------------------------------------- */

/* Zero gaps shorter than this inside changed data are folded into the literal:
 * a separate run pair would cost at least two header bytes. */
#define MIN_ZERO_GAP 3

/* Length of the run of equal bytes starting at i (old == new), up to PS.
 * Works a word at a time: the first non-zero byte of old^new ends the run. */
static inline size_t equal_run(const unsigned char *o, const unsigned char *n, size_t i) {
    size_t j = i;
    while (j + 8 <= PS) {
        uint64_t x = load64(o + j) ^ load64(n + j);
        if (x) return j - i + (size_t)(__builtin_ctzll(x) >> 3);
        j += 8;
    }
    while (j < PS && o[j] == n[j]) j++;
    return j - i;
}

/* Length of the run of differing bytes starting at i (o[i] != n[i]). The
 * classic "has a zero byte" test finds the first equal byte in a word; its
 * lowest flagged byte is always exact. */
static inline size_t diff_run(const unsigned char *o, const unsigned char *n, size_t i) {
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    size_t j = i;
    while (j + 8 <= PS) {
        uint64_t x = load64(o + j) ^ load64(n + j);
        uint64_t z = (x - ones) & ~x & highs;
        if (z) return j - i + (size_t)(__builtin_ctzll(z) >> 3);
        j += 8;
    }
    while (j < PS && o[j] != n[j]) j++;
    return j - i;
}

/* Encodes new against old as (zero run, literal run, literal bytes)* into out.
 * Returns the payload length, or 0 if it would reach `bound` bytes (caller
 * falls back to raw). The page must differ from old. */
static size_t delta_page(const unsigned char *o, const unsigned char *n, unsigned char *out,
                         size_t bound) {
    size_t pos = 0, w = 0;
    while (pos < PS) {
        size_t z = equal_run(o, n, pos);
        if (pos + z >= PS) break; /* trailing zero run is omitted */
        size_t start = pos + z, end = start;
        /* Extend the literal over short equal gaps. */
        for (;;) {
            end += diff_run(o, n, end);
            if (end >= PS) break;
            size_t gap = equal_run(o, n, end);
            if (end + gap >= PS || gap >= MIN_ZERO_GAP) break;
            end += gap;
        }
        size_t lit = end - start;
        /* Worst case for this pair: two 2-byte ULEBs (values < 4096 need at
         * most 2 bytes) plus the literal. */
        if (w + 4 + lit >= bound) return 0;
        w += put_uleb(out + w, (uint32_t)z);
        w += put_uleb(out + w, (uint32_t)lit);
        memcpy(out + w, n + start, lit);
        w += lit;
        pos = end;
    }
    return w;
}

/* Number of differing bytes between two pages, a word at a time: a cheap test
 * that sends densely changed pages straight to raw instead of running the
 * byte-level delta encoder over them only to overflow. */
static inline size_t diff_bytes(const unsigned char *o, const unsigned char *n) {
    size_t count = 0;
    for (int i = 0; i < PS; i += 8) {
        uint64_t x = load64(o + i) ^ load64(n + i);
        x |= x >> 4;
        x |= x >> 2;
        x |= x >> 1;
        count += (size_t)__builtin_popcountll(x & 0x0101010101010101ULL);
    }
    return count;
}

int ctl_encode(const unsigned char *old_pages, const unsigned char *new_pages,
               unsigned long long npages, const unsigned int *indices,
               unsigned long long nindices, unsigned char *out, unsigned long long out_cap,
               ctl_encode_stats *st) {
    memset(st, 0, sizeof(*st));
    unsigned long long total = indices ? nindices : npages;
    unsigned long long next_idx = 0; /* index the next record would get for gap 0 */
    size_t w = 0;
    int rc = CTL_OK;
    for (unsigned long long k = 0; k < total; k++) {
        unsigned long long idx = indices ? indices[k] : k;
        if (idx >= npages) { rc = CTL_E_INDEX; break; }
        if (indices && k && idx <= indices[k - 1]) { rc = CTL_E_ORDER; break; }
        if (out_cap - w < CTL_MAX_RECORD) break;
        const unsigned char *o = old_pages + idx * PS, *n = new_pages + idx * PS;
        if (page_equal(o, n)) {
            st->unchanged++;
            st->consumed = k + 1;
            continue;
        }
        size_t hdr = put_uleb(out + w, (uint32_t)(idx - next_idx));
        next_idx = idx + 1;
        if (page_is_zero(n)) {
            w += hdr + put_uleb(out + w + hdr, CTL_KIND_ZERO);
            st->zero++;
        } else {
            /* The payload goes after a 2-byte kind slot (lengths up to 4093 need
             * at most two ULEB bytes) and is moved down if one byte sufficed. */
            unsigned char *payload = out + w + hdr + 2;
            size_t len = 0;
            /* Each literal byte costs a byte of payload, so a page with this many
             * differing bytes can never beat raw. */
            if (diff_bytes(o, n) < CTL_MAX_DELTA - 4)
                len = delta_page(o, n, payload, CTL_MAX_DELTA + 1);
            if (len) {
                size_t lb = put_uleb(out + w + hdr, (uint32_t)len);
                if (lb == 1) memmove(out + w + hdr + 1, payload, len);
                w += hdr + lb + len;
                st->delta++;
            } else {
                w += hdr + put_uleb(out + w + hdr, CTL_KIND_RAW);
                memcpy(out + w, n, PS);
                w += PS;
                st->raw++;
            }
        }
        st->consumed = k + 1;
    }
    st->out_len = w;
    return rc;
}

/* ---- delta decode (hostile input) ----------------------------------------- */

/* Checks a delta payload without applying it. */
static int check_delta(const unsigned char *in, size_t len) {
    size_t r = 0, pos = 0;
    int first = 1;
    if (len == 0) return CTL_E_LENGTH;
    while (r < len) {
        uint32_t z, l;
        size_t u = get_uleb(in + r, len - r, &z);
        if (u == 0) return CTL_E_TRUNCATED;
        if (u == (size_t)-1) return CTL_E_ULEB;
        r += u;
        if (z == 0 && !first) return CTL_E_EMPTY_RUN;
        if (z > PS - pos) return CTL_E_RUN;
        pos += z;
        u = get_uleb(in + r, len - r, &l);
        if (u == 0) return CTL_E_TRUNCATED;
        if (u == (size_t)-1) return CTL_E_ULEB;
        r += u;
        if (l == 0) return CTL_E_EMPTY_RUN;
        if (l > PS - pos) return CTL_E_RUN;
        if (l > len - r) return CTL_E_TRUNCATED;
        r += l;
        pos += l;
        first = 0;
    }
    return CTL_OK;
}

/* Applies a payload that check_delta accepted. */
static void apply_delta(unsigned char *page, const unsigned char *in, size_t len) {
    size_t r = 0, pos = 0;
    while (r < len) {
        uint32_t z = 0, l = 0;
        r += get_uleb(in + r, len - r, &z);
        pos += z;
        r += get_uleb(in + r, len - r, &l);
        memcpy(page + pos, in + r, l);
        r += l;
        pos += l;
    }
}

int ctl_decode(unsigned char *pages, unsigned long long npages, const unsigned char *in,
               unsigned long long in_len, ctl_decode_stats *st) {
    memset(st, 0, sizeof(*st));
    size_t r = 0;
    unsigned long long next_idx = 0;
    while (r < in_len) {
        st->error_offset = r;
        uint32_t gap, kind;
        size_t u = get_uleb(in + r, in_len - r, &gap);
        if (u == 0) return CTL_E_TRUNCATED;
        if (u == (size_t)-1) return CTL_E_ULEB;
        r += u;
        u = get_uleb(in + r, in_len - r, &kind);
        if (u == 0) return CTL_E_TRUNCATED;
        if (u == (size_t)-1) return CTL_E_ULEB;
        r += u;
        if (kind > CTL_MAX_DELTA && kind != CTL_KIND_RAW) return CTL_E_TYPE;
        unsigned long long idx = next_idx + gap;
        if (idx >= npages) return CTL_E_INDEX;
        unsigned char *page = pages + (size_t)idx * PS;
        if (kind == CTL_KIND_ZERO) {
            memset(page, 0, PS);
            st->zero++;
        } else if (kind == CTL_KIND_RAW) {
            if (in_len - r < PS) return CTL_E_TRUNCATED;
            memcpy(page, in + r, PS);
            r += PS;
            st->raw++;
        } else {
            if (kind > in_len - r) return CTL_E_TRUNCATED;
            int rc = check_delta(in + r, kind);
            if (rc) return rc;
            apply_delta(page, in + r, kind);
            r += kind;
            st->delta++;
        }
        next_idx = idx + 1;
        st->records++;
    }
    st->error_offset = 0;
    return CTL_OK;
}
