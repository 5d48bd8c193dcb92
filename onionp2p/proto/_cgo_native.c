/*
 * _cgo_native: the per-cell work of CGO (proposal 359) in C, for onionp2p/proto/cgo.py.
 *
 * Optional: cgo.py uses it when it was built and passes cgo.py's import self-test, and
 * falls back to its pure-Python reference otherwise (specs/cgo.md §8a). It computes
 * exactly what cgo.py's UIV / CgoCrypt compute; the tests run tor's vectors through both.
 *
 *  - AES-128: OpenSSL libcrypto (the library `cryptography` wraps). One EVP context per
 *    AES key (ET's, encrypt or decrypt; the PRF's, encrypt), made once per Crypt object and
 *    re-keyed in place on every UIV+ update (EVP_*Init_ex with a NULL cipher).
 *    The PRF's AES-CTR keystream is the ECB encryption of the counter blocks, as in cgo.py.
 *  - POLYVAL (RFC 8452 §3): dot(a, b) = a * b * x^-128 in GF(2)[x]/(x^128+x^127+x^126+x^121+1),
 *    with PCLMULQDQ when CPUID says the CPU has it (the function alone is compiled for it),
 *    else a portable constant-time carry-less multiply (masked integer multiplies, no
 *    table look-ups, no secret-dependent branches).
 *
 * State (keys, N, T') lives in the C object; a rekey happens inside C. Key bytes are
 * wiped (OPENSSL_cleanse) when replaced and when the object is freed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>

#if defined(__x86_64__) || defined(__i386__)
#define CGO_X86 1
#include <immintrin.h>
#endif

#define BODY_LEN 509
#define TAG_LEN 16
#define MSG_LEN (BODY_LEN - TAG_LEN) /* 493 */
#define UIV_KEY_LEN 64
#define DIR_KEY_LEN 80
#define T1_OFFSET 31
#define TWEAK_LEN 512 /* H[16] | cmd | X_R[493] | 00 00 */

/* ------------------------------------------------------------------------------------ */
/* POLYVAL */

typedef struct {
    uint64_t lo, hi; /* the little-endian 128-bit integer of a block */
} u128;

/* A POLYVAL key: h[0] = H and, for the aggregated CLMUL loop, h[1..3] = H^2, H^3, H^4 in the
 * dot algebra (h[k] = dot(h[k-1], H)), so that four Horner steps are
 * dot(S ^ X1, H^4) ^ dot(X2, H^3) ^ dot(X3, H^2) ^ dot(X4, H) with one reduction. */
typedef struct {
    u128 h[4];
} polykey;

static inline uint64_t load64_le(const uint8_t *p) {
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
           (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

static inline void store64_le(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Low 64 bits of the carry-less product x * y, constant time: the bits of each operand
 * are split into four classes with three-bit holes between them, so that the integer
 * products of the classes cannot carry into the bits that are kept (BearSSL's bmul64). */
static inline uint64_t bmul64(uint64_t x, uint64_t y) {
    const uint64_t m0 = 0x1111111111111111ULL, m1 = 0x2222222222222222ULL, m2 = 0x4444444444444444ULL,
                   m3 = 0x8888888888888888ULL;
    uint64_t x0 = x & m0, x1 = x & m1, x2 = x & m2, x3 = x & m3;
    uint64_t y0 = y & m0, y1 = y & m1, y2 = y & m2, y3 = y & m3;
    uint64_t z0 = (x0 * y0) ^ (x1 * y3) ^ (x2 * y2) ^ (x3 * y1);
    uint64_t z1 = (x0 * y1) ^ (x1 * y0) ^ (x2 * y3) ^ (x3 * y2);
    uint64_t z2 = (x0 * y2) ^ (x1 * y1) ^ (x2 * y0) ^ (x3 * y3);
    uint64_t z3 = (x0 * y3) ^ (x1 * y2) ^ (x2 * y1) ^ (x3 * y0);
    return (z0 & m0) | (z1 & m1) | (z2 & m2) | (z3 & m3);
}

static inline uint64_t rev64(uint64_t x) {
    x = ((x & 0x5555555555555555ULL) << 1) | ((x >> 1) & 0x5555555555555555ULL);
    x = ((x & 0x3333333333333333ULL) << 2) | ((x >> 2) & 0x3333333333333333ULL);
    x = ((x & 0x0F0F0F0F0F0F0F0FULL) << 4) | ((x >> 4) & 0x0F0F0F0F0F0F0F0FULL);
    return __builtin_bswap64(x);
}

/* The full 128-bit carry-less product of two 64-bit words: (lo, hi). The high half is the
 * bit-reversed low half of the bit-reversed operands, shifted by one. */
static inline void clmul64(uint64_t x, uint64_t y, uint64_t *lo, uint64_t *hi) {
    *lo = bmul64(x, y);
    *hi = rev64(bmul64(rev64(x), rev64(y))) >> 1;
}

/* One Montgomery fold: with lo = c mod x^64, (c ^ lo * P) / x^64 =
 * (c >> 64) ^ lo * (x^57 + x^62 + x^63 + x^64), on three words (w0, w1, w2) -> (w1', w2'). */
#define FOLD_LO(lo) (((lo) << 57) ^ ((lo) << 62) ^ ((lo) << 63))
#define FOLD_HI(lo) (((lo) >> 7) ^ ((lo) >> 2) ^ ((lo) >> 1) ^ (lo))

static u128 dot_portable(u128 a, u128 b) {
    /* Karatsuba: three 64x64 products */
    uint64_t l0, l1, h0, h1, m0, m1;
    clmul64(a.lo, b.lo, &l0, &l1);
    clmul64(a.hi, b.hi, &h0, &h1);
    clmul64(a.lo ^ a.hi, b.lo ^ b.hi, &m0, &m1);
    m0 ^= l0 ^ h0;
    m1 ^= l1 ^ h1;
    /* 256-bit product z0..z3 */
    uint64_t z0 = l0, z1 = l1 ^ m0, z2 = h0 ^ m1, z3 = h1;
    /* fold z0 into z1, z2 */
    z1 ^= FOLD_LO(z0);
    z2 ^= FOLD_HI(z0);
    /* fold z1 into z2, z3 */
    z2 ^= FOLD_LO(z1);
    z3 ^= FOLD_HI(z1);
    u128 r = {z2, z3};
    return r;
}

static void polyval_portable(const polykey *key, const uint8_t *data, size_t nblocks, uint8_t out[16]) {
    u128 s = {0, 0};
    for (size_t i = 0; i < nblocks; i++) {
        s.lo ^= load64_le(data + 16 * i);
        s.hi ^= load64_le(data + 16 * i + 8);
        s = dot_portable(s, key->h[0]);
    }
    store64_le(out, s.lo);
    store64_le(out + 8, s.hi);
}

#ifdef CGO_X86
__attribute__((target("pclmul,sse4.1"))) static inline __m128i dot_clmul(__m128i a, __m128i b) {
    const __m128i poly = _mm_set_epi64x((long long)0xC200000000000000ULL, 1);
    __m128i lo = _mm_clmulepi64_si128(a, b, 0x00);
    __m128i hi = _mm_clmulepi64_si128(a, b, 0x11);
    __m128i mid = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x10), _mm_clmulepi64_si128(a, b, 0x01));
    lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
    hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
    /* two folds: swap the halves (c >> 64 and lo << 64) and add lo * (x^57 + x^62 + x^63) */
    __m128i t = _mm_clmulepi64_si128(lo, poly, 0x10);
    lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4E), t);
    t = _mm_clmulepi64_si128(lo, poly, 0x10);
    lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4E), t);
    return _mm_xor_si128(hi, lo);
}

/* the unreduced product a * b added to (lo, mid, hi) */
#define CLMUL_ACC(a, b)                                                                             \
    do {                                                                                            \
        lo = _mm_xor_si128(lo, _mm_clmulepi64_si128((a), (b), 0x00));                               \
        hi = _mm_xor_si128(hi, _mm_clmulepi64_si128((a), (b), 0x11));                               \
        mid = _mm_xor_si128(mid, _mm_xor_si128(_mm_clmulepi64_si128((a), (b), 0x10),                \
                                               _mm_clmulepi64_si128((a), (b), 0x01)));              \
    } while (0)

__attribute__((target("pclmul,sse4.1"))) static void polyval_clmul(const polykey *key, const uint8_t *data,
                                                                  size_t nblocks, uint8_t out[16]) {
    const __m128i poly = _mm_set_epi64x((long long)0xC200000000000000ULL, 1);
    __m128i h1 = _mm_set_epi64x((long long)key->h[0].hi, (long long)key->h[0].lo);
    __m128i s = _mm_setzero_si128();
    size_t i = 0;
    if (nblocks >= 4) {
        __m128i h2 = _mm_set_epi64x((long long)key->h[1].hi, (long long)key->h[1].lo);
        __m128i h3 = _mm_set_epi64x((long long)key->h[2].hi, (long long)key->h[2].lo);
        __m128i h4 = _mm_set_epi64x((long long)key->h[3].hi, (long long)key->h[3].lo);
        for (; i + 4 <= nblocks; i += 4) {
            const __m128i *x = (const __m128i *)(data + 16 * i);
            __m128i lo = _mm_setzero_si128(), mid = _mm_setzero_si128(), hi = _mm_setzero_si128();
            CLMUL_ACC(_mm_xor_si128(s, _mm_loadu_si128(x)), h4);
            CLMUL_ACC(_mm_loadu_si128(x + 1), h3);
            CLMUL_ACC(_mm_loadu_si128(x + 2), h2);
            CLMUL_ACC(_mm_loadu_si128(x + 3), h1);
            lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
            hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
            __m128i t = _mm_clmulepi64_si128(lo, poly, 0x10); /* the two folds of dot_clmul */
            lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4E), t);
            t = _mm_clmulepi64_si128(lo, poly, 0x10);
            lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4E), t);
            s = _mm_xor_si128(hi, lo);
        }
    }
    for (; i < nblocks; i++) {
        s = _mm_xor_si128(s, _mm_loadu_si128((const __m128i *)(data + 16 * i)));
        s = dot_clmul(s, h1);
    }
    _mm_storeu_si128((__m128i *)out, s);
}

__attribute__((target("pclmul,sse4.1"))) static void powers_clmul(polykey *key) {
    __m128i h1 = _mm_set_epi64x((long long)key->h[0].hi, (long long)key->h[0].lo), p = h1;
    for (int k = 1; k < 4; k++) {
        p = dot_clmul(p, h1);
        _mm_storeu_si128((__m128i *)&key->h[k], p); /* u128 {lo, hi} is the little-endian layout */
    }
}
#endif

typedef void (*polyval_fn)(const polykey *, const uint8_t *, size_t, uint8_t *);
static polyval_fn polyval_impl = polyval_portable;
static const char *polyval_name = "portable";
static int have_clmul = 0; /* CPUID: PCLMULQDQ and SSE4.1 */

/* Set a key from 16 bytes; its powers only where CLMUL can run (the portable loop uses h[0]). */
static inline void polyval_key(polykey *key, const uint8_t k[16]) {
    key->h[0].lo = load64_le(k);
    key->h[0].hi = load64_le(k + 8);
#ifdef CGO_X86
    if (have_clmul) {
        powers_clmul(key);
        return;
    }
#endif
    memset(&key->h[1], 0, 3 * sizeof(u128));
}

/* ------------------------------------------------------------------------------------ */
/* AES through EVP */

static int aes_init(EVP_CIPHER_CTX *ctx, const uint8_t key[16], int encrypt, int first) {
    const EVP_CIPHER *c = first ? EVP_aes_128_ecb() : NULL;
    if (!EVP_CipherInit_ex(ctx, c, NULL, key, NULL, encrypt)) return -1;
    if (first) EVP_CIPHER_CTX_set_padding(ctx, 0);
    return 0;
}

static inline int aes_ecb(EVP_CIPHER_CTX *ctx, const uint8_t *in, uint8_t *out, int len) {
    int n = 0;
    return (EVP_CipherUpdate(ctx, out, &n, in, len) && n == len) ? 0 : -1;
}

/* out[i] = a[i] ^ b[i] for i < n, eight bytes at a time (a byte loop here was a third of a
 * UIV+ call: the compiler cannot widen it, as out may alias a or b). out may equal a or b;
 * no other overlap. */
static inline void xor_bytes(uint8_t *out, const uint8_t *a, const uint8_t *b, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        x ^= y;
        memcpy(out + i, &x, 8);
    }
    for (; i < n; i++) out[i] = a[i] ^ b[i];
}

/* ------------------------------------------------------------------------------------ */
/* UIV+ state and operations */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *et_aes;  /* KB: encrypt (relay) or decrypt (client) */
    EVP_CIPHER_CTX *prf_aes; /* K: always encrypt */
    polykey ku, b;           /* POLYVAL keys */
    uint8_t key[UIV_KEY_LEN]; /* J | S, for the `key` attribute */
    uint8_t nonce[TAG_LEN];
    uint8_t tprime[TAG_LEN];
    int relay;
} CryptObject;

static int set_keys(CryptObject *self, const uint8_t key[UIV_KEY_LEN], int first) {
    if (aes_init(self->et_aes, key, self->relay, first) < 0) return -1;
    if (aes_init(self->prf_aes, key + 32, 1, first) < 0) return -1;
    polyval_key(&self->ku, key + 16);
    polyval_key(&self->b, key + 48);
    if (self->key != key) {
        OPENSSL_cleanse(self->key, UIV_KEY_LEN);
        memcpy(self->key, key, UIV_KEY_LEN);
    }
    return 0;
}

/* The PRF: count blocks of AES-CTR keystream from block `first`, IV = POLYVAL(B, in) with
 * the low six bits of its last byte cleared (so the counter stays in that byte). */
static int prf_stream(CryptObject *self, const uint8_t in[16], int first, int count, uint8_t *out) {
    uint8_t iv[16];
    uint8_t blocks[64 * 16];
    polyval_impl(&self->b, in, 1, iv);
    iv[15] &= 0xC0;
    for (int i = 0; i < count; i++) {
        memcpy(blocks + 16 * i, iv, 15);
        blocks[16 * i + 15] = (uint8_t)(iv[15] + first + i);
    }
    return aes_ecb(self->prf_aes, blocks, out, 16 * count);
}

/* ET / ET^-1 of one block (direction fixed by et_aes) under the tweak h | cmd | x_r. */
static int et_apply(CryptObject *self, const uint8_t h[16], uint8_t cmd, const uint8_t *x_r,
                    const uint8_t in[16], uint8_t out[16]) {
    uint8_t tweak[TWEAK_LEN];
    uint8_t mask[16], tmp[16];
    memcpy(tweak, h, 16);
    tweak[16] = cmd;
    memcpy(tweak + 17, x_r, MSG_LEN);
    tweak[TWEAK_LEN - 2] = tweak[TWEAK_LEN - 1] = 0;
    polyval_impl(&self->ku, tweak, TWEAK_LEN / 16, mask);
    for (int i = 0; i < 16; i++) tmp[i] = in[i] ^ mask[i];
    if (aes_ecb(self->et_aes, tmp, tmp, 16) < 0) return -1;
    for (int i = 0; i < 16; i++) out[i] = tmp[i] ^ mask[i];
    return 0;
}

/* UIV+ encryption of x_l | x_r into out (509 bytes); x_l, x_r may alias nothing in out. */
static int uiv_enc(CryptObject *self, const uint8_t h[16], uint8_t cmd, const uint8_t *x_l,
                   const uint8_t *x_r, uint8_t *out) {
    uint8_t ks[T1_OFFSET * 16];
    if (et_apply(self, h, cmd, x_r, x_l, out) < 0) return -1;
    if (prf_stream(self, out, 0, T1_OFFSET, ks) < 0) return -1;
    xor_bytes(out + 16, x_r, ks, MSG_LEN);
    return 0;
}

static int uiv_dec(CryptObject *self, const uint8_t h[16], uint8_t cmd, const uint8_t *y_l,
                   const uint8_t *y_r, uint8_t *out) {
    uint8_t ks[T1_OFFSET * 16];
    if (prf_stream(self, y_l, 0, T1_OFFSET, ks) < 0) return -1;
    xor_bytes(out + 16, y_r, ks, MSG_LEN);
    return et_apply(self, h, cmd, out + 16, y_l, out);
}

/* UIV+ update: J | S | N' = PRF_S(nonce, t=1)[:80]; N' goes to next_nonce. */
static int uiv_update(CryptObject *self, const uint8_t nonce[16], uint8_t next_nonce[16]) {
    uint8_t fresh[DIR_KEY_LEN];
    int rc = prf_stream(self, nonce, T1_OFFSET, DIR_KEY_LEN / 16, fresh);
    if (rc == 0) rc = set_keys(self, fresh, 0);
    if (rc == 0) memcpy(next_nonce, fresh + UIV_KEY_LEN, 16);
    OPENSSL_cleanse(fresh, sizeof fresh);
    return rc;
}

/* ------------------------------------------------------------------------------------ */
/* Python glue */

static PyObject *raise_openssl(void) {
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES call failed");
    return NULL;
}

/* A cell command (0..255) from a Python int. */
static int get_cmd(PyObject *o, int *cmd) {
    long c = PyLong_AsLong(o);
    if (c == -1 && PyErr_Occurred()) return -1;
    if (c < 0 || c > 255) {
        PyErr_Format(PyExc_ValueError, "cell command must be 0..255, got %ld", c);
        return -1;
    }
    *cmd = (int)c;
    return 0;
}

static int get_cell(PyObject *const *args, Py_ssize_t nargs, int *cmd, Py_buffer *body) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (cmd, body)");
        return -1;
    }
    if (get_cmd(args[0], cmd) < 0) return -1;
    if (PyObject_GetBuffer(args[1], body, PyBUF_SIMPLE) < 0) return -1;
    if (body->len != BODY_LEN) {
        PyErr_Format(PyExc_ValueError, "relay cell body must be %d bytes, got %zd", BODY_LEN, body->len);
        PyBuffer_Release(body);
        return -1;
    }
    return 0;
}

static int need(CryptObject *self, int relay) {
    if (self->relay != relay) {
        PyErr_SetString(PyExc_ValueError, "CGO operation for the other side (client/relay)");
        return -1;
    }
    return 0;
}

static PyObject *new_body(uint8_t **p) {
    PyObject *o = PyBytes_FromStringAndSize(NULL, BODY_LEN);
    if (o) *p = (uint8_t *)PyBytes_AS_STRING(o);
    return o;
}

static PyObject *tag_bytes(const uint8_t *t) { return PyBytes_FromStringAndSize((const char *)t, TAG_LEN); }

/* Shared shape of the six cell operations. kind: 0 relay_forward, 1 relay_backward,
 * 2 relay_originate, 3 client_forward, 4 client_originate, 5 client_backward. */
static PyObject *cell_op(CryptObject *self, PyObject *const *args, Py_ssize_t nargs, int kind) {
    int cmd;
    Py_buffer buf;
    uint8_t *out;
    if (need(self, kind < 3) < 0) return NULL;
    if (get_cell(args, nargs, &cmd, &buf) < 0) return NULL;
    const uint8_t *in = buf.buf;
    PyObject *res = new_body(&out);
    if (!res) goto fail;
    uint8_t tag[TAG_LEN];
    int recognized = 0, rc = 0;
    switch (kind) {
    case 0: /* relay_forward */
        rc = uiv_enc(self, self->tprime, (uint8_t)cmd, in, in + 16, out);
        memcpy(self->tprime, out, 16);
        if (rc == 0 && CRYPTO_memcmp(out, self->nonce, 16) == 0) {
            recognized = 1;
            memcpy(tag, in, 16);
            rc = uiv_update(self, self->nonce, self->nonce);
        }
        break;
    case 1: /* relay_backward */
        rc = uiv_enc(self, self->tprime, (uint8_t)cmd, in, in + 16, out);
        memcpy(self->tprime, out, 16);
        break;
    case 2: /* relay_originate */
        rc = uiv_enc(self, self->tprime, (uint8_t)cmd, self->nonce, in + 16, out);
        memcpy(self->tprime, out, 16);
        memcpy(tag, out, 16);
        recognized = 1;
        if (rc == 0) rc = uiv_update(self, tag, self->nonce);
        break;
    case 3: /* client_forward */
        rc = uiv_dec(self, self->tprime, (uint8_t)cmd, in, in + 16, out);
        memcpy(self->tprime, in, 16);
        break;
    case 4: { /* client_originate */
        uint8_t n[16];
        memcpy(n, self->nonce, 16);
        rc = uiv_dec(self, self->tprime, (uint8_t)cmd, n, in + 16, out);
        memcpy(self->tprime, n, 16);
        memcpy(tag, out, 16);
        recognized = 1;
        if (rc == 0) rc = uiv_update(self, n, self->nonce);
        break;
    }
    default: /* client_backward */
        memcpy(tag, in, 16);
        rc = uiv_dec(self, self->tprime, (uint8_t)cmd, in, in + 16, out);
        memcpy(self->tprime, tag, 16);
        if (rc == 0 && CRYPTO_memcmp(out, self->nonce, 16) == 0) {
            recognized = 1;
            rc = uiv_update(self, tag, self->nonce);
        }
        break;
    }
    PyBuffer_Release(&buf);
    if (rc < 0) {
        Py_DECREF(res);
        return raise_openssl();
    }
    if (kind == 1 || kind == 3) return res;
    PyObject *t = recognized ? tag_bytes(tag) : Py_NewRef(Py_None);
    if (!t) {
        Py_DECREF(res);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, res, t);
    Py_DECREF(res);
    Py_DECREF(t);
    return pair;
fail:
    PyBuffer_Release(&buf);
    return NULL;
}

#define CELL_METHOD(name, kind)                                                                     \
    static PyObject *Crypt_##name(CryptObject *self, PyObject *const *args, Py_ssize_t nargs) {    \
        return cell_op(self, args, nargs, kind);                                                    \
    }
CELL_METHOD(relay_forward, 0)
CELL_METHOD(relay_backward, 1)
CELL_METHOD(relay_originate, 2)
CELL_METHOD(client_forward, 3)
CELL_METHOD(client_originate, 4)
CELL_METHOD(client_backward, 5)

/* Raw UIV+ (for cgo.UIV and the UIV vectors): uiv_enc / uiv_dec (h, cmd, body), uiv_update(nonce).
 * They do not touch N or T'. */
static int get_fixed(PyObject *o, Py_buffer *b, Py_ssize_t n, const char *what) {
    if (PyObject_GetBuffer(o, b, PyBUF_SIMPLE) < 0) return -1;
    if (b->len != n) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd bytes, got %zd", what, n, b->len);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static PyObject *uiv_raw(CryptObject *self, PyObject *const *args, Py_ssize_t nargs, int enc) {
    Py_buffer h, body;
    int cmd;
    uint8_t *out;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "expected (h, cmd, body)");
        return NULL;
    }
    if (need(self, enc) < 0) return NULL;
    if (get_fixed(args[0], &h, 16, "tweak H") < 0) return NULL;
    if (get_cell(args + 1, 2, &cmd, &body) < 0) {
        PyBuffer_Release(&h);
        return NULL;
    }
    PyObject *res = new_body(&out);
    int rc = 0;
    if (res) {
        const uint8_t *in = body.buf;
        rc = enc ? uiv_enc(self, h.buf, (uint8_t)cmd, in, in + 16, out)
                 : uiv_dec(self, h.buf, (uint8_t)cmd, in, in + 16, out);
    }
    PyBuffer_Release(&h);
    PyBuffer_Release(&body);
    if (res && rc < 0) {
        Py_DECREF(res);
        return raise_openssl();
    }
    return res;
}

static PyObject *Crypt_uiv_enc(CryptObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return uiv_raw(self, args, nargs, 1);
}

static PyObject *Crypt_uiv_dec(CryptObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return uiv_raw(self, args, nargs, 0);
}

static PyObject *Crypt_uiv_update(CryptObject *self, PyObject *arg) {
    Py_buffer n;
    uint8_t in[16], next[16];
    if (get_fixed(arg, &n, 16, "nonce") < 0) return NULL;
    memcpy(in, n.buf, 16);
    PyBuffer_Release(&n);
    if (uiv_update(self, in, next) < 0) return raise_openssl();
    return tag_bytes(next);
}

/* et(h, cmd, x_r, block) -> 16 bytes: ET (relay objects) or ET^-1 (client objects) under J's
 * first half; prf(input, first, count) -> count blocks of PRF keystream from block first. Tests. */
static PyObject *Crypt_et(CryptObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer h, x_r, block;
    uint8_t out[16];
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "expected (h, cmd, x_r, block)");
        return NULL;
    }
    int cmd;
    if (get_cmd(args[1], &cmd) < 0) return NULL;
    if (get_fixed(args[0], &h, 16, "tweak H") < 0) return NULL;
    if (get_fixed(args[2], &x_r, MSG_LEN, "tweak X_R") < 0) {
        PyBuffer_Release(&h);
        return NULL;
    }
    if (get_fixed(args[3], &block, 16, "ET block") < 0) {
        PyBuffer_Release(&h);
        PyBuffer_Release(&x_r);
        return NULL;
    }
    int rc = et_apply(self, h.buf, (uint8_t)cmd, x_r.buf, block.buf, out);
    PyBuffer_Release(&h);
    PyBuffer_Release(&x_r);
    PyBuffer_Release(&block);
    if (rc < 0) return raise_openssl();
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *Crypt_prf(CryptObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer in;
    uint8_t out[64 * 16];
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "expected (input, first, count)");
        return NULL;
    }
    long first = PyLong_AsLong(args[1]), count = PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (first < 0 || count < 0 || first + count > 64) {
        PyErr_SetString(PyExc_ValueError, "the PRF yields blocks 0..63");
        return NULL;
    }
    if (get_fixed(args[0], &in, 16, "PRF input") < 0) return NULL;
    int rc = count ? prf_stream(self, in.buf, (int)first, (int)count, out) : 0;
    PyBuffer_Release(&in);
    if (rc < 0) return raise_openssl();
    return PyBytes_FromStringAndSize((const char *)out, 16 * count);
}

static int Crypt_init(CryptObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key_material", "relay", "tprime", NULL};
    Py_buffer km, tp = {0};
    int relay = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|$py*", kwlist, &km, &relay, &tp)) return -1;
    int rc = -1;
    if (relay < 0) {
        PyErr_SetString(PyExc_TypeError, "Crypt() needs relay=True or relay=False");
        goto done;
    }
    if (km.len != DIR_KEY_LEN) {
        PyErr_Format(PyExc_ValueError, "CGO key material for one direction must be %d bytes, got %zd",
                     DIR_KEY_LEN, km.len);
        goto done;
    }
    if (tp.obj && tp.len != TAG_LEN) {
        PyErr_Format(PyExc_ValueError, "T' must be %d bytes, got %zd", TAG_LEN, tp.len);
        goto done;
    }
    int first = self->et_aes == NULL;
    if (first) {
        self->et_aes = EVP_CIPHER_CTX_new();
        self->prf_aes = EVP_CIPHER_CTX_new();
        if (!self->et_aes || !self->prf_aes) {
            PyErr_NoMemory();
            goto done;
        }
    }
    self->relay = relay;
    /* a re-__init__ may switch direction: give the contexts their cipher and direction again */
    if (set_keys(self, km.buf, 1) < 0) {
        raise_openssl();
        goto done;
    }
    memcpy(self->nonce, (const uint8_t *)km.buf + UIV_KEY_LEN, TAG_LEN);
    if (tp.obj)
        memcpy(self->tprime, tp.buf, TAG_LEN);
    else
        memset(self->tprime, 0, TAG_LEN);
    rc = 0;
done:
    PyBuffer_Release(&km);
    if (tp.obj) PyBuffer_Release(&tp);
    return rc;
}

static void Crypt_dealloc(CryptObject *self) {
    EVP_CIPHER_CTX_free(self->et_aes); /* frees and wipes the key schedule */
    EVP_CIPHER_CTX_free(self->prf_aes);
    OPENSSL_cleanse(&self->ku, sizeof self->ku);
    OPENSSL_cleanse(&self->b, sizeof self->b);
    OPENSSL_cleanse(self->key, sizeof self->key);
    OPENSSL_cleanse(self->nonce, sizeof self->nonce);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *get16(uint8_t *field) { return tag_bytes(field); }

static int set16(uint8_t *field, PyObject *value, const char *what) {
    Py_buffer b;
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", what);
        return -1;
    }
    if (get_fixed(value, &b, 16, what) < 0) return -1;
    memcpy(field, b.buf, 16);
    PyBuffer_Release(&b);
    return 0;
}

static PyObject *Crypt_get_nonce(CryptObject *self, void *c) { return get16(self->nonce); }
static int Crypt_set_nonce(CryptObject *self, PyObject *v, void *c) { return set16(self->nonce, v, "nonce"); }
static PyObject *Crypt_get_tprime(CryptObject *self, void *c) { return get16(self->tprime); }
static int Crypt_set_tprime(CryptObject *self, PyObject *v, void *c) { return set16(self->tprime, v, "T'"); }
static PyObject *Crypt_get_key(CryptObject *self, void *c) {
    return PyBytes_FromStringAndSize((const char *)self->key, UIV_KEY_LEN);
}
static PyObject *Crypt_get_relay(CryptObject *self, void *c) { return PyBool_FromLong(self->relay); }

static PyGetSetDef Crypt_getset[] = {
    {"nonce", (getter)Crypt_get_nonce, (setter)Crypt_set_nonce, "N: the tag that marks a cell as ours", NULL},
    {"tprime", (getter)Crypt_get_tprime, (setter)Crypt_set_tprime, "T': the tag of the last cell", NULL},
    {"key", (getter)Crypt_get_key, NULL, "the current UIV+ keys J | S (64 bytes)", NULL},
    {"relay", (getter)Crypt_get_relay, NULL, "True: UIV+ encryption (a relay); False: decryption", NULL},
    {NULL},
};

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))Crypt_##name, METH_FASTCALL, doc}
static PyMethodDef Crypt_methods[] = {
    FAST(relay_forward, "(cmd, body) -> (body, tag or None); unchecked form of CgoCrypt.relay_forward"),
    FAST(relay_backward, "(cmd, body) -> body"),
    FAST(relay_originate, "(cmd, body) -> (body, tag)"),
    FAST(client_forward, "(cmd, body) -> body"),
    FAST(client_originate, "(cmd, body) -> (body, tag)"),
    FAST(client_backward, "(cmd, body) -> (body, tag or None)"),
    FAST(uiv_enc, "(h, cmd, body) -> UIV+ encryption (relay objects)"),
    FAST(uiv_dec, "(h, cmd, body) -> UIV+ decryption (client objects)"),
    FAST(et, "(h, cmd, x_r, block) -> ET (relay objects) or ET^-1 (client objects) of one block"),
    FAST(prf, "(input, first, count) -> count blocks of PRF_S keystream from block first"),
    {"uiv_update", (PyCFunction)Crypt_uiv_update, METH_O, "(nonce) -> next nonce; replaces J | S"},
    {NULL},
};

static PyType_Slot Crypt_slots[] = {
    {Py_tp_doc, "One direction of CGO for one hop (keys, N, T') in C: Crypt(key80, *, relay, tprime=zeros)."},
    {Py_tp_init, Crypt_init},
    {Py_tp_dealloc, Crypt_dealloc},
    {Py_tp_methods, Crypt_methods},
    {Py_tp_getset, Crypt_getset},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec Crypt_spec = {
    .name = "onionp2p.proto._cgo_native.Crypt",
    .basicsize = sizeof(CryptObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = Crypt_slots,
};

/* polyval(key, data) -> 16 bytes, data zero-padded to whole blocks; for the tests. */
static PyObject *mod_polyval(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer k, d;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (key, data)");
        return NULL;
    }
    if (get_fixed(args[0], &k, 16, "POLYVAL key") < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &d, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&k);
        return NULL;
    }
    polykey h;
    polyval_key(&h, k.buf);
    PyBuffer_Release(&k);
    size_t n = (size_t)d.len, full = n / 16;
    uint8_t s[16] = {0};
    if (full) polyval_impl(&h, d.buf, full, s);
    if (n % 16) {
        uint8_t last[16] = {0};
        memcpy(last, (const uint8_t *)d.buf + 16 * full, n % 16);
        for (int i = 0; i < 16; i++) last[i] ^= s[i];
        polyval_impl(&h, last, 1, s);
    }
    PyBuffer_Release(&d);
    return PyBytes_FromStringAndSize((const char *)s, 16);
}

/* use_polyval("clmul" | "portable"): pick the POLYVAL implementation (tests). */
static PyObject *mod_use_polyval(PyObject *m, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (strcmp(name, "portable") == 0) {
        polyval_impl = polyval_portable;
        polyval_name = "portable";
    }
#ifdef CGO_X86
    else if (strcmp(name, "clmul") == 0 && have_clmul) {
        polyval_impl = polyval_clmul;
        polyval_name = "clmul";
    }
#endif
    else {
        PyErr_Format(PyExc_ValueError, "POLYVAL implementation %s unavailable", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *mod_polyval_impl(PyObject *m, PyObject *unused) { return PyUnicode_FromString(polyval_name); }

/* The client's hops (a non-empty tuple of client-side Crypt objects): their number, or -1
 * with an exception set. */
static Py_ssize_t check_client_hops(PyObject *m, PyObject *hops) {
    Py_ssize_t nh = PyTuple_GET_SIZE(hops);
    if (nh == 0) {
        PyErr_SetString(PyExc_ValueError, "a circuit with no hops");
        return -1;
    }
    PyObject *crypt_type = PyObject_GetAttrString(m, "Crypt");
    if (!crypt_type) return -1;
    for (Py_ssize_t k = 0; k < nh; k++) {
        PyObject *h = PyTuple_GET_ITEM(hops, k);
        if (!PyObject_TypeCheck(h, (PyTypeObject *)crypt_type) || ((CryptObject *)h)->relay) {
            Py_DECREF(crypt_type);
            PyErr_SetString(PyExc_TypeError, "hops must be client-side Crypt objects");
            return -1;
        }
    }
    Py_DECREF(crypt_type);
    return nh;
}

/* Peel one inbound body (in x; y is scratch of the same size) hop by hop (client_backward
 * of hops[0], hops[1], ...) until a hop recognizes it: that hop's index, with *res pointing
 * at the plaintext (x or y) and tag holding the cell's tag; -1 if no hop does (the hops'
 * states have taken the body, as with single calls); -2 with an exception set. */
static Py_ssize_t peel(PyObject *hops, Py_ssize_t nh, uint8_t cmd, uint8_t *x, uint8_t *y,
                       uint8_t **res_out, uint8_t tag[TAG_LEN]) {
    uint8_t *in = x, *res = y;
    for (Py_ssize_t k = 0; k < nh; k++) {
        CryptObject *c = (CryptObject *)PyTuple_GET_ITEM(hops, k);
        int found = 0;
        memcpy(tag, in, TAG_LEN);
        int rc = uiv_dec(c, c->tprime, cmd, in, in + 16, res);
        memcpy(c->tprime, tag, TAG_LEN);
        if (rc == 0 && CRYPTO_memcmp(res, c->nonce, TAG_LEN) == 0) {
            found = 1;
            rc = uiv_update(c, tag, c->nonce);
        }
        if (rc < 0) {
            raise_openssl();
            return -2;
        }
        if (found) {
            *res_out = res;
            return k;
        }
        uint8_t *t = in;
        in = res;
        res = t;
    }
    return -1;
}

/* client_backward_many(hops, bodies, cmd) -> [(hop, body, tag)]: the client's inbound cells
 * of one circuit, each peeled hop by hop (client_backward of hops[0], hops[1], ...) until a
 * hop recognizes it; one C call for every layer of a run of cells. hops: a tuple of client
 * Crypt objects (the backward direction of each hop); bodies: a list of 509-byte buffers.
 * Stops at a body that no hop recognizes, so the list is then shorter than ``bodies`` (the
 * caller closes the circuit); the hops' states have taken that body, as with single calls. */
static PyObject *mod_client_backward_many(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "expected (hops, bodies, cmd)");
        return NULL;
    }
    PyObject *hops = args[0], *bodies = args[1];
    if (!PyTuple_Check(hops) || !PyList_Check(bodies)) {
        PyErr_SetString(PyExc_TypeError, "hops must be a tuple and bodies a list");
        return NULL;
    }
    int cmd;
    if (get_cmd(args[2], &cmd) < 0) return NULL;
    Py_ssize_t nh = check_client_hops(m, hops);
    if (nh < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    uint8_t x[BODY_LEN], y[BODY_LEN];
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(bodies); i++) {
        Py_buffer buf;
        if (PyObject_GetBuffer(PyList_GET_ITEM(bodies, i), &buf, PyBUF_SIMPLE) < 0) goto fail;
        if (buf.len != BODY_LEN) {
            PyErr_Format(PyExc_ValueError, "relay cell body must be %d bytes, got %zd", BODY_LEN, buf.len);
            PyBuffer_Release(&buf);
            goto fail;
        }
        memcpy(x, buf.buf, BODY_LEN);
        PyBuffer_Release(&buf);
        uint8_t *res, tag[TAG_LEN];
        Py_ssize_t found = peel(hops, nh, (uint8_t)cmd, x, y, &res, tag);
        if (found == -2) goto fail;
        if (found < 0) break;
        PyObject *item = Py_BuildValue("(ny#y#)", found, (const char *)res, (Py_ssize_t)BODY_LEN,
                                       (const char *)tag, (Py_ssize_t)TAG_LEN);
        if (!item) goto fail;
        int rc = PyList_Append(out, item);
        Py_DECREF(item);
        if (rc < 0) goto fail;
    }
    OPENSSL_cleanse(x, sizeof x);
    OPENSSL_cleanse(y, sizeof y);
    return out;
fail:
    OPENSSL_cleanse(x, sizeof x);
    OPENSSL_cleanse(y, sizeof y);
    Py_DECREF(out);
    return NULL;
}


/* client_backward_runs(hops, cmd, layout, buf, start, count) -> (items, done, unrecognized):
 * the cells of one circuit at buf[start + i * 514] (4-byte circuit ID, command, 509-byte
 * body), i < count, peeled as client_backward_many peels them, stopping before the first
 * cell whose command is not ``cmd`` (RELAY: the caller refuses a RELAY_EARLY) or after the
 * first that no hop recognizes (unrecognized = 1; the caller closes the circuit). done: the
 * cells taken. items, in order:
 *   (hop, sid, data, tags, lengths) for a run of consecutive DATA messages from one hop for
 *       one stream: their data concatenated, their tags (16 bytes each) and lengths (native
 *       uint16 each) - so that the caller's per-cell work is per run;
 *   (hop, body, tag) for any other cell (the caller parses it).
 * layout = (V1_TAG_LEN, V1_DATA_OFFSET, DATA) from relaycell.py: a DATA message is a
 * recognized v1 body whose command (at V1_TAG_LEN) is DATA, with a non-zero stream ID
 * (u16 at V1_TAG_LEN + 3) and a length (u16 at V1_TAG_LEN + 1) that fits after
 * V1_DATA_OFFSET; anything else - a malformed DATA message too - goes out as a body, for
 * relaycell.parse_v1_header to judge (tests/test_cgo.py compares the two on every kind). */
static PyObject *mod_client_backward_runs(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "expected (hops, cmd, layout, buf, start, count)");
        return NULL;
    }
    PyObject *hops = args[0];
    if (!PyTuple_Check(hops) || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 3) {
        PyErr_SetString(PyExc_TypeError, "hops and layout must be tuples (layout of 3)");
        return NULL;
    }
    Py_ssize_t nh = check_client_hops(m, hops);
    if (nh < 0) return NULL;
    Py_ssize_t start = PyLong_AsSsize_t(args[4]), count = PyLong_AsSsize_t(args[5]);
    long tag_len = PyLong_AsLong(PyTuple_GET_ITEM(args[2], 0));
    long data_off = PyLong_AsLong(PyTuple_GET_ITEM(args[2], 1));
    long data_cmd = PyLong_AsLong(PyTuple_GET_ITEM(args[2], 2));
    int cmd;
    if (PyErr_Occurred() || get_cmd(args[1], &cmd) < 0) return NULL;
    if (tag_len < 0 || tag_len + 5 > data_off || data_off > BODY_LEN) {
        PyErr_SetString(PyExc_ValueError, "bad layout");
        return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[3], &buf, PyBUF_SIMPLE) < 0) return NULL;
    const Py_ssize_t cell_len = 5 + BODY_LEN;
    if (start < 0 || count < 0 || count > (buf.len - start) / cell_len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "cells out of the buffer");
        return NULL;
    }
    const size_t data_max = (size_t)(BODY_LEN - data_off);
    uint8_t *dat = PyMem_Malloc(count * data_max + 1), *tags = PyMem_Malloc(count * TAG_LEN + 1);
    uint16_t *lens = PyMem_Malloc(count * sizeof(uint16_t) + 1);
    PyObject *items = PyList_New(0);
    uint8_t x[BODY_LEN], y[BODY_LEN];
    Py_ssize_t done = 0, run_n = 0, run_hop = 0;
    size_t dpos = 0;
    unsigned run_sid = 0;
    int unrecognized = 0;
    PyObject *result = NULL;
    if (!dat || !tags || !lens || !items) {
        if (items) PyErr_NoMemory();
        goto out;
    }
#define EMIT_RUN()                                                                                   \
    do {                                                                                             \
        PyObject *it_ = Py_BuildValue("(nIy#y#y#)", run_hop, run_sid, (const char *)dat, (Py_ssize_t)dpos, \
                                      (const char *)tags, run_n * TAG_LEN, (const char *)lens,       \
                                      run_n * (Py_ssize_t)sizeof(uint16_t));                         \
        if (!it_ || PyList_Append(items, it_) < 0) {                                                 \
            Py_XDECREF(it_);                                                                         \
            goto out;                                                                                \
        }                                                                                            \
        Py_DECREF(it_);                                                                              \
        run_n = 0;                                                                                   \
        dpos = 0;                                                                                    \
    } while (0)
    for (; done < count; done++) {
        const uint8_t *cell = (const uint8_t *)buf.buf + start + done * cell_len;
        if (cell[4] != cmd) break;
        memcpy(x, cell + 5, BODY_LEN);
        uint8_t *res, tag[TAG_LEN];
        Py_ssize_t found = peel(hops, nh, (uint8_t)cmd, x, y, &res, tag);
        if (found == -2) goto out;
        if (found < 0) {
            unrecognized = 1;
            done++;
            break;
        }
        unsigned c = res[tag_len], length = (unsigned)res[tag_len + 1] << 8 | res[tag_len + 2];
        unsigned sid = (unsigned)res[tag_len + 3] << 8 | res[tag_len + 4];
        if (c == (unsigned)data_cmd && sid != 0 && length <= data_max) {
            if (run_n && (found != run_hop || sid != run_sid)) EMIT_RUN();
            run_hop = found;
            run_sid = sid;
            memcpy(dat + dpos, res + data_off, length);
            dpos += length;
            memcpy(tags + run_n * TAG_LEN, tag, TAG_LEN);
            lens[run_n++] = (uint16_t)length;
            continue;
        }
        if (run_n) EMIT_RUN();
        PyObject *it = Py_BuildValue("(ny#y#)", found, (const char *)res, (Py_ssize_t)BODY_LEN,
                                     (const char *)tag, (Py_ssize_t)TAG_LEN);
        if (!it || PyList_Append(items, it) < 0) {
            Py_XDECREF(it);
            goto out;
        }
        Py_DECREF(it);
    }
    if (run_n) EMIT_RUN();
#undef EMIT_RUN
    result = Py_BuildValue("(Oni)", items, done, unrecognized);
out:
    PyBuffer_Release(&buf);
    OPENSSL_cleanse(x, sizeof x);
    OPENSSL_cleanse(y, sizeof y);
    if (dat) {
        OPENSSL_cleanse(dat, count * data_max + 1);
        PyMem_Free(dat);
    }
    PyMem_Free(tags);
    PyMem_Free(lens);
    Py_XDECREF(items);
    return result;
}

static PyMethodDef module_methods[] = {
    {"polyval", (PyCFunction)(void (*)(void))mod_polyval, METH_FASTCALL, "polyval(key, data) -> 16 bytes"},
    {"use_polyval", (PyCFunction)mod_use_polyval, METH_O, "use_polyval('clmul' | 'portable')"},
    {"polyval_impl", (PyCFunction)mod_polyval_impl, METH_NOARGS, "the POLYVAL implementation in use"},
    {"client_backward_many", (PyCFunction)(void (*)(void))mod_client_backward_many, METH_FASTCALL,
     "(hops, bodies, cmd) -> [(hop, body, tag)]: every layer of a run of inbound cells, in one call"},
    {"client_backward_runs", (PyCFunction)(void (*)(void))mod_client_backward_runs, METH_FASTCALL,
     "(hops, cmd, layout, buf, start, count) -> (items, done, unrecognized): client_backward_many "
     "over raw cells, with runs of DATA messages for one stream gathered (see the source)"},
    {NULL},
};

static int module_exec(PyObject *m) {
#ifdef CGO_X86
    __builtin_cpu_init();
    have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    if (have_clmul) {
        polyval_impl = polyval_clmul;
        polyval_name = "clmul";
    }
#endif
    PyObject *t = PyType_FromModuleAndSpec(m, &Crypt_spec, NULL);
    if (!t) return -1;
    if (PyModule_AddObject(m, "Crypt", t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION));
}

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "onionp2p.proto._cgo_native",
    .m_doc = "CGO (proposal 359) per-cell crypto in C; see onionp2p/proto/cgo.py and specs/cgo.md.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__cgo_native(void) { return PyModuleDef_Init(&module_def); }
