/* ctlive native page-diff core: public declarations.
 *
 * This text is also the cffi cdef, so it stays within what cffi's C parser
 * accepts: plain declarations, integer constants, no #include or expressions.
 * Every function takes whole buffers; none is ever called once per page.
 * The record-stream format is specified in docs/pagediff.md.
 */

#define CTL_PAGE_SIZE 4096

/* The kind field of a record: 0 = zero page, 1..CTL_MAX_DELTA = delta payload
 * length, CTL_KIND_RAW = raw page follows. */
#define CTL_KIND_ZERO 0
#define CTL_MAX_DELTA 4093
#define CTL_KIND_RAW 4096

/* Worst-case size of one record: 5-byte index gap, 2-byte kind, raw page. */
#define CTL_MAX_RECORD 4103

/* Decoder error codes (all negative; 0 is success). */
#define CTL_OK 0
#define CTL_E_TRUNCATED -1   /* the stream ends inside a record */
#define CTL_E_TYPE -2        /* invalid kind field */
#define CTL_E_INDEX -3       /* page index outside the page array */
#define CTL_E_ULEB -4        /* overlong or overflowing ULEB128 */
#define CTL_E_RUN -5         /* a run goes past the end of the page */
#define CTL_E_EMPTY_RUN -6   /* zero-length literal, or zero-length zero run after offset 0 */
#define CTL_E_LENGTH -7      /* delta payload length inconsistent with its runs */
#define CTL_E_ORDER -8       /* encoder: indices not strictly increasing */

typedef struct {
    unsigned long long consumed;   /* indices (or pages, when scanning all) processed */
    unsigned long long zero;       /* zero records written */
    unsigned long long delta;      /* delta records written */
    unsigned long long raw;        /* raw records written */
    unsigned long long unchanged;  /* listed pages equal to their old version: no record */
    unsigned long long out_len;    /* bytes written to the output */
} ctl_encode_stats;

typedef struct {
    unsigned long long records;
    unsigned long long zero;
    unsigned long long delta;
    unsigned long long raw;
    unsigned long long error_offset;  /* byte offset of the failing record, on error */
} ctl_decode_stats;

/* XXH64 (seed 0) of every 4 KiB page. */
void ctl_hash_pages(const unsigned char *pages, unsigned long long npages,
                    unsigned long long *out);

/* XXH64 of an arbitrary buffer with a seed. */
unsigned long long ctl_xxh64(const unsigned char *data, unsigned long long len,
                             unsigned long long seed);

/* Writes the indices of all-zero pages to out (capacity npages); returns the count. */
unsigned long long ctl_zero_pages(const unsigned char *pages, unsigned long long npages,
                                  unsigned int *out);

/* Writes the indices of pages that differ between old and new; returns the count. */
unsigned long long ctl_changed_pages(const unsigned char *old_pages,
                                     const unsigned char *new_pages,
                                     unsigned long long npages, unsigned int *out);

/* Encodes the listed pages (indices == NULL: every page that differs) of new_pages
 * against old_pages into out. Indices must be strictly increasing. Stops before a
 * record that might not fit in out_cap; stats->consumed says how far it got.
 * Returns 0, CTL_E_INDEX for an index outside the arrays, or CTL_E_ORDER. */
int ctl_encode(const unsigned char *old_pages, const unsigned char *new_pages,
               unsigned long long npages, const unsigned int *indices,
               unsigned long long nindices, unsigned char *out, unsigned long long out_cap,
               ctl_encode_stats *stats);

/* Applies a record stream in place to pages. Validates each record fully before
 * touching its page, so a failing record leaves its page unchanged (records before
 * it stay applied). Returns 0 or a negative CTL_E_* code. */
int ctl_decode(unsigned char *pages, unsigned long long npages, const unsigned char *in,
               unsigned long long in_len, ctl_decode_stats *stats);
