/* dynamo_ext._native: the router's hot loops in C, each equal bit for bit to its Python
 * reference (dynamo_ext.hashing.token_block_hashes, router.indexer.KvIndex.find_matches'
 * GPU walk and store, router.ingest.stored_tokens_py); tests/router/test_native.py holds
 * them equal with hypothesis. MaskMap, the index's GPU tier, is held equal to the index
 * on a dict by tests/router/test_maskmap.py.
 *
 * Why C: the tokens-mode hash of a 4k-token prompt builds 256 tuples of 16 ints (~0.1 ms in
 * Python) and the index walk pays interpreter dispatch and a big-int AND per block. Here
 * the hash is CPython's own tuple hash (xxHash-style lanes over the items' hashes, see
 * Objects/tupleobject.c) computed without building tuples, and the walk keeps the
 * candidate mask as 64-bit words. A tokens-mode BlockStored is hashed from the msgpack
 * bytes of its token ids (msgspec.Raw): decoding them to a list first cost more than the
 * rest of its ingest.
 *
 * Plain CPython C API; no third-party build dependency. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifndef _WIN32
#include <sys/mman.h>
#endif

/* CPython's tuple hash constants (64-bit Py_uhash_t). */
#define XXPRIME_1 ((uint64_t)11400714785074694791ULL)
#define XXPRIME_2 ((uint64_t)14029467366897019727ULL)
#define XXPRIME_5 ((uint64_t)2870177450012600261ULL)
#define XXROTATE(x) (((x) << 31) | ((x) >> 33))
/* Python's int hash: x mod 2**61 - 1 for x >= 0. */
#define HASH_MODULUS (((uint64_t)1 << 61) - 1)

#if SIZEOF_VOID_P != 8
#error "dynamo_ext._native needs a 64-bit build (Py_hash_t of 64 bits)"
#endif

#define MAX_WORDS 64 /* router.indexer.MAX_WORKERS = 4096 bits */

static inline uint64_t tuple_finish(uint64_t acc, uint64_t len) {
    acc += len ^ (XXPRIME_5 ^ 3527539UL);
    if (acc == (uint64_t)-1) {
        return 1546275796;
    }
    return acc;
}

static inline uint64_t lane(uint64_t acc, uint64_t h) {
    acc += h * XXPRIME_2;
    acc = XXROTATE(acc);
    return acc * XXPRIME_1;
}

/* hash((prev, block)) where hash(prev) is prev_hash and block's tuple hash is inner. */
static inline uint64_t chain_step(uint64_t prev_hash, uint64_t inner) {
    uint64_t acc = XXPRIME_5;
    acc = lane(acc, prev_hash);
    acc = lane(acc, inner);
    return tuple_finish(acc, 2);
}

static int is_u32_format(const char *fmt) {
    if (fmt == NULL) {
        return 0; /* plain bytes: unsigned char, not uint32 */
    }
    if (*fmt == '@' || *fmt == '=' || *fmt == '<') {
        if (*fmt == '<' && !PY_LITTLE_ENDIAN) {
            return 0;
        }
        fmt++;
    }
    return (fmt[0] == 'I' || (fmt[0] == 'L' && sizeof(unsigned long) == 4)) && fmt[1] == 0;
}

/* hash(o) for an exact int in [0, 2**30) read in place (it is the int itself); 0 for any
 * other object (the caller asks PyObject_Hash, the reference). */
static inline int small_int_hash(PyObject *o, uint64_t *out) {
    if (!PyLong_CheckExact(o)) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)o)) {
        return 0;
    }
    Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)o);
    if (v < 0) {
        return 0;
    }
    *out = (uint64_t)v;
    return 1;
#else
    Py_ssize_t size = Py_SIZE(o);
    if (size == 0) {
        *out = 0;
        return 1;
    }
    if (size == 1) {
        *out = (uint64_t)((PyLongObject *)o)->ob_digit[0];
        return 1;
    }
    return 0;
#endif
}

#define FAST_TOKENS_HASHED 4096 /* token hashes on the stack; a longer prompt mallocs */
static void hash_blocks(const uint64_t *th, uint64_t nb, uint64_t bs, uint64_t *out);

static PyObject *
native_token_block_hashes(PyObject *self, PyObject *args) {
    PyObject *tokens;
    Py_ssize_t bs;
    PyObject *parent = NULL;
    if (!PyArg_ParseTuple(args, "On|O", &tokens, &bs, &parent)) {
        return NULL;
    }
    if (bs <= 0) {
        PyErr_SetString(PyExc_ValueError, "block_size must be > 0");
        return NULL;
    }
    uint64_t prev_hash = 0;
    if (parent != NULL) {
        Py_hash_t ph = PyObject_Hash(parent);
        if (ph == -1 && PyErr_Occurred()) {
            return NULL;
        }
        prev_hash = (uint64_t)ph;
    }
    Py_buffer view;
    int have_view = 0;
    PyObject *seq = NULL;
    Py_ssize_t n;
    const uint32_t *u32 = NULL;
    PyObject **items = NULL;
    if (PyObject_CheckBuffer(tokens) && !PyBytes_Check(tokens) && !PyByteArray_Check(tokens)) {
        if (PyObject_GetBuffer(tokens, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
            return NULL;
        }
        have_view = 1;
        if (view.itemsize == 4 && is_u32_format(view.format)) {
            u32 = (const uint32_t *)view.buf;
            n = view.len / 4;
        } else {
            PyBuffer_Release(&view);
            have_view = 0;
        }
    }
    if (u32 == NULL) {
        seq = PySequence_Fast(tokens, "token ids must be a sequence");
        if (seq == NULL) {
            return NULL;
        }
        n = PySequence_Fast_GET_SIZE(seq);
        items = PySequence_Fast_ITEMS(seq);
    }
    Py_ssize_t nblocks = n / bs;
    Py_ssize_t ntok = nblocks * bs;
    /* Every token's hash first (a compact int's is its value, read in place), then the
     * blocks four at a time (hash_blocks: independent chains in flight), then the chain. */
    uint64_t stack_th[FAST_TOKENS_HASHED];
    uint64_t stack_inner[FAST_TOKENS_HASHED]; /* nblocks <= ntok */
    uint64_t *th = stack_th, *inner = stack_inner;
    PyObject *out = NULL;
    if (ntok > FAST_TOKENS_HASHED) {
        th = PyMem_Malloc(sizeof(uint64_t) * (size_t)(ntok + nblocks));
        if (th == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        inner = th + ntok;
    }
    if (u32 != NULL) {
        for (Py_ssize_t i = 0; i < ntok; i++) {
            th[i] = (uint64_t)u32[i]; /* hash(int < 2**61) == int */
        }
    } else {
        for (Py_ssize_t i = 0; i < ntok; i++) {
            PyObject *o = items[i];
            if (!small_int_hash(o, &th[i])) {
                Py_hash_t h = PyObject_Hash(o);
                if (h == -1 && PyErr_Occurred()) {
                    goto fail;
                }
                th[i] = (uint64_t)h;
            }
        }
    }
    hash_blocks(th, (uint64_t)nblocks, (uint64_t)bs, inner);
    out = PyList_New(nblocks);
    if (out == NULL) {
        goto fail;
    }
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        uint64_t h = chain_step(prev_hash, inner[b]);
        PyObject *v = PyLong_FromUnsignedLongLong(h);
        if (v == NULL) {
            Py_CLEAR(out);
            goto fail;
        }
        PyList_SET_ITEM(out, b, v);
        prev_hash = h % HASH_MODULUS; /* hash() of the next block's parent int */
    }
fail: /* out is NULL unless every block was hashed */
    if (th != stack_th) {
        PyMem_Free(th);
    }
    if (have_view) {
        PyBuffer_Release(&view);
    }
    Py_XDECREF(seq);
    return out;
}

/* A non-negative int's low 64*nwords bits as little-endian words; -1 if it is wider or
 * negative (the caller falls back to Python). */
static int mask_words(PyObject *v, uint64_t *w, int nwords) {
    if (!PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "mask is not an int");
        return -1;
    }
    if (_PyLong_Sign(v) < 0) {
        PyErr_SetString(PyExc_ValueError, "negative mask");
        return -1;
    }
    size_t nbits = _PyLong_NumBits(v);
    if (nbits <= 64) {
        unsigned long long small = PyLong_AsUnsignedLongLong(v);
        if (small == (unsigned long long)-1 && PyErr_Occurred()) {
            return -1;
        }
        w[0] = small;
        if (nwords > 1) {
            memset(w + 1, 0, (size_t)(nwords - 1) * 8);
        }
        return 0;
    }
    if (nbits > (size_t)MAX_WORDS * 64) {
        PyErr_SetString(PyExc_OverflowError, "mask wider than the index's worker slots");
        return -1;
    }
    unsigned char buf[MAX_WORDS * 8];
    size_t nbytes = (nbits + 7) / 8;
#if PY_VERSION_HEX >= 0x030D0000
    if (_PyLong_AsByteArray((PyLongObject *)v, buf, nbytes, 1, 0, 1) < 0) {
#else
    if (_PyLong_AsByteArray((PyLongObject *)v, buf, nbytes, 1, 0) < 0) {
#endif
        return -1;
    }
    memset(buf + nbytes, 0, sizeof(buf) - nbytes);
    memcpy(w, buf, (size_t)nwords * 8);
    return 0;
}

/* out[key of slot] = len: the slot itself, or ``ids[slot]`` when ``ids`` (a list) is given
 * (the worker id a caller would otherwise map each slot to in a second pass). */
static int set_len(PyObject *out, int slot, Py_ssize_t len, PyObject *ids) {
    PyObject *k;
    if (ids != NULL) {
        if (slot >= PyList_GET_SIZE(ids)) {
            PyErr_SetString(PyExc_IndexError, "walk: a slot past the ids list");
            return -1;
        }
        k = PyList_GET_ITEM(ids, slot);
        Py_INCREF(k);
    } else {
        k = PyLong_FromLong(slot);
    }
    PyObject *v = PyLong_FromSsize_t(len);
    int rc = (k && v) ? PyDict_SetItem(out, k, v) : -1;
    Py_XDECREF(k);
    Py_XDECREF(v);
    return rc;
}

static int record_bits(PyObject *out, const uint64_t *bits, int nwords, Py_ssize_t len,
                       PyObject *ids) {
    for (int wi = 0; wi < nwords; wi++) {
        uint64_t x = bits[wi];
        while (x) {
            int b = __builtin_ctzll(x);
            if (set_len(out, wi * 64 + b, len, ids) < 0) {
                return -1;
            }
            x &= x - 1;
        }
    }
    return 0;
}

/* gpu_walk(d, hashes, alive) -> {slot: prefix_len}: the GPU part of
 * KvIndex.find_matches. ``d`` maps block hash -> worker bitmask, ``alive`` is the
 * candidate mask; a slot's prefix is the number of leading hashes whose mask holds it,
 * and slots with no leading hit are absent. */
static PyObject *
native_gpu_walk(PyObject *self, PyObject *args) {
    PyObject *d, *hashes, *alive_obj;
    if (!PyArg_ParseTuple(args, "O!OO", &PyDict_Type, &d, &hashes, &alive_obj)) {
        return NULL;
    }
    PyObject *out = PyDict_New();
    if (out == NULL) {
        return NULL;
    }
    uint64_t alive[MAX_WORDS];
    uint64_t m[MAX_WORDS];
    if (!PyLong_Check(alive_obj) || _PyLong_Sign(alive_obj) < 0) {
        PyErr_SetString(PyExc_ValueError, "alive must be a non-negative int");
        Py_DECREF(out);
        return NULL;
    }
    size_t abits = _PyLong_NumBits(alive_obj);
    int nwords = (int)((abits + 63) / 64);
    if (nwords == 0) {
        return out;
    }
    if (nwords > MAX_WORDS) {
        PyErr_SetString(PyExc_OverflowError, "mask wider than the index's worker slots");
        Py_DECREF(out);
        return NULL;
    }
    if (mask_words(alive_obj, alive, nwords) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(hashes, "hashes must be a sequence");
    if (seq == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *last = NULL; /* the last mask object whose AND left alive unchanged */
    Py_ssize_t i = 0;
    for (; i < n; i++) {
        PyObject *mo = PyDict_GetItemWithError(d, items[i]);
        if (mo == NULL) {
            if (PyErr_Occurred()) {
                goto fail;
            }
            /* no worker holds it: every alive worker stops here */
            if (i && record_bits(out, alive, nwords, i, NULL) < 0) {
                goto fail;
            }
            memset(alive, 0, (size_t)nwords * 8);
            break;
        }
        if (mo == last) {
            continue; /* the same int object as the previous block: same AND */
        }
        if (mask_words(mo, m, nwords) < 0) {
            goto fail;
        }
        uint64_t any = 0, changed = 0;
        for (int wi = 0; wi < nwords; wi++) {
            uint64_t nw = m[wi] & alive[wi];
            changed |= nw ^ alive[wi];
            m[wi] = alive[wi] ^ nw; /* dropped */
            alive[wi] = nw;
            any |= nw;
        }
        if (changed) {
            if (i && record_bits(out, m, nwords, i, NULL) < 0) {
                goto fail;
            }
            last = NULL;
            if (!any) {
                break;
            }
        } else {
            last = mo;
        }
    }
    if (i == n && record_bits(out, alive, nwords, n, NULL) < 0) {
        goto fail;
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_DECREF(seq);
    Py_DECREF(out);
    return NULL;
}

/* store_blocks(d, hashes, bit) -> added: the unbounded loop of KvIndex.store. Each hash's
 * mask gains ``bit`` (a worker's one-bit int); a block new to the index shares the ``bit``
 * object itself, as in Python. Returns how many blocks the worker did not hold before. */
static PyObject *
native_store_blocks(PyObject *self, PyObject *args) {
    PyObject *d, *hashes, *bit;
    if (!PyArg_ParseTuple(args, "O!OO!", &PyDict_Type, &d, &hashes, &PyLong_Type, &bit)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(hashes, "hashes must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t added = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = items[i];
        /* One probe for lookup and insert alike: a block new to the index (the common
         * case of a stream) is inserted by the lookup itself; the size says which. */
        Py_ssize_t size = PyDict_GET_SIZE(d);
        PyObject *old = PyDict_SetDefault(d, h, bit);
        if (old == NULL) {
            goto fail;
        }
        if (PyDict_GET_SIZE(d) != size) {
            added++;
            continue;
        }
        if (old == bit) {
            continue;
        }
        PyObject *both = PyNumber_And(old, bit);
        if (both == NULL) {
            goto fail;
        }
        int held = PyObject_IsTrue(both);
        Py_DECREF(both);
        if (held < 0) {
            goto fail;
        }
        if (held) {
            continue;
        }
        /* old is falsy (a 0 mask left by hand) or lacks the bit: old | b, or b itself */
        int truthy = PyObject_IsTrue(old);
        if (truthy < 0) {
            goto fail;
        }
        PyObject *m = truthy ? PyNumber_Or(old, bit) : (Py_INCREF(bit), bit);
        if (m == NULL) {
            goto fail;
        }
        int rc = PyDict_SetItem(d, h, m);
        Py_DECREF(m);
        if (rc < 0) {
            goto fail;
        }
        added++;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(added);
fail:
    Py_DECREF(seq);
    return NULL;
}

/* ---- big tables' memory ---------------------------------------------------------- */

/* A table's memory, zeroed. A big one is pages of its own (mmap), faulted in by the one
 * call (MAP_POPULATE): touched one by one, read before written as a probe does, each page
 * cost two faults, 4x the time; and freed, they go back to the system, where on the heap
 * the halves a doubling leaves behind, between the frames' buffers, stayed resident.
 * tracemalloc counts them as the heap they replace (bench heap, memory tests). */
#define TABLE_MMAP_BYTES (64 * 1024)
#define TABLE_TRACE_DOMAIN 0x6d6d
#if defined(MAP_ANONYMOUS) && defined(MAP_POPULATE)
#define TABLE_MMAP 1
#endif

static void *table_alloc(size_t bytes) {
#ifdef TABLE_MMAP
    if (bytes >= TABLE_MMAP_BYTES) {
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (p == MAP_FAILED) {
            return NULL;
        }
        PyTraceMalloc_Track(TABLE_TRACE_DOMAIN, (uintptr_t)p, bytes);
        return p;
    }
#endif
    return PyMem_Calloc(1, bytes);
}

static void table_free(void *p, size_t bytes) {
    if (p == NULL) {
        return;
    }
#ifdef TABLE_MMAP
    if (bytes >= TABLE_MMAP_BYTES) {
        PyTraceMalloc_Untrack(TABLE_TRACE_DOMAIN, (uintptr_t)p);
        munmap(p, bytes);
        return;
    }
#endif
    PyMem_Free(p);
}

/* ---- U64Map: the tokens-mode engine hash -> router hash map ------------------------- */

/* A dict[int, int] for the keys and values a KV stream has: ints in [0, 2**64), in an
 * open-addressing table of 16-byte slots (linear probing, backward-shift deletion) instead
 * of a dict entry plus a key int object per block: fewer cache misses per insert and a
 * third of the memory. Any other key or value (a negative int, bytes, ...) lives in a
 * plain dict beside the table, so that it behaves as a dict for everything. */
#define U64_EMPTY UINT64_MAX /* never a stored value: such a pair goes to ``other`` */

typedef struct {
    uint64_t key;
    uint64_t val;
} u64slot;

/* In U64_NSEG tables (a key's by the top bits of its mixed hash), each grown on its own:
 * a doubling rehashes a 64th of the map, in cache (one table: 8 ms at 370k blocks). */
#define U64_SEGBITS 6
#define U64_NSEG (1 << U64_SEGBITS)

typedef struct {
    u64slot *slots;
    size_t mask; /* capacity - 1; capacity is a power of two, 0 when slots is NULL */
    size_t used;
} u64seg;

typedef struct {
    PyObject_HEAD
    /* beside the header: len() of a worker's map (the scorer's probe of its active blocks,
     * most often empty) costs no miss past the one its type check takes */
    Py_ssize_t used;
    PyObject *other; /* dict, or NULL while empty */
    u64seg seg[U64_NSEG];
} U64Map;

static PyTypeObject U64MapType;
static uint64_t u64map_seed;

static inline uint64_t u64_mix(uint64_t k) {
    /* splitmix64's finalizer of a seeded key: a publisher cannot line its hashes up. */
    uint64_t z = k ^ u64map_seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline u64seg *u64_seg(U64Map *m, uint64_t z) { return &m->seg[z >> (64 - U64_SEGBITS)]; }

static inline void u64_prefetch_z(U64Map *m, uint64_t z) {
    u64seg *g = u64_seg(m, z);
    if (g->slots != NULL) {
        __builtin_prefetch(&g->slots[z & g->mask], 1);
    }
}

static inline void u64_prefetch(U64Map *m, uint64_t k) { u64_prefetch_z(m, u64_mix(k)); }

/* 1: ``o`` is an int in [0, 2**64) (in *out); 0: not one; -1: error. */
static int as_u64(PyObject *o, uint64_t *out) {
    if (!PyLong_Check(o)) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    /* 3.11's layout, read in place (three calls into libpython per key otherwise): ob_size
     * counts the 30-bit digits, low first, and is negative for a negative int. A normalized
     * int's top digit is nonzero: 4 digits are past 2**90. */
    {
        const digit *d = ((PyLongObject *)o)->ob_digit;
        switch (Py_SIZE(o)) {
        case 0:
            *out = 0;
            return 1;
        case 1:
            *out = d[0];
            return 1;
        case 2:
            *out = (uint64_t)d[0] | (uint64_t)d[1] << PyLong_SHIFT;
            return 1;
        case 3:
            if (d[2] >> (64 - 2 * PyLong_SHIFT)) {
                return 0;
            }
            *out = (uint64_t)d[0] | (uint64_t)d[1] << PyLong_SHIFT |
                   (uint64_t)d[2] << (2 * PyLong_SHIFT);
            return 1;
        default:
            return 0; /* negative, or past 2**64 */
        }
    }
#else
    if (_PyLong_Sign(o) < 0 || _PyLong_NumBits(o) > 64) {
        return 0;
    }
    /* In range, so the mask is the value (PyLong_AsUnsignedLongLong goes through a byte
     * array for every int past 30 bits). */
    unsigned long long v = PyLong_AsUnsignedLongLongMask(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *out = v;
    return 1;
#endif
}

static inline u64slot *u64_find(U64Map *m, uint64_t k) {
    uint64_t z = u64_mix(k);
    u64seg *g = u64_seg(m, z);
    if (g->slots == NULL) {
        return NULL;
    }
    for (size_t i = (size_t)z & g->mask;; i = (i + 1) & g->mask) {
        u64slot *s = &g->slots[i];
        if (s->val == U64_EMPTY) {
            return NULL;
        }
        if (s->key == k) {
            return s;
        }
    }
}

static int u64_grow(u64seg *g) {
    size_t cap = g->slots ? (g->mask + 1) * 2 : 16;
    u64slot *ns = table_alloc(cap * sizeof(u64slot));
    if (ns == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(ns, 0xff, cap * sizeof(u64slot)); /* every val U64_EMPTY */
    u64slot *old = g->slots;
    size_t oldcap = old ? g->mask + 1 : 0;
    g->slots = ns;
    g->mask = cap - 1;
    for (size_t i = 0; i < oldcap; i++) {
        if (old[i].val != U64_EMPTY) {
            size_t j = (size_t)u64_mix(old[i].key) & g->mask;
            while (ns[j].val != U64_EMPTY) {
                j = (j + 1) & g->mask;
            }
            ns[j] = old[i];
        }
    }
    table_free(old, oldcap * sizeof(u64slot));
    return 0;
}

/* Table insert of a representable pair (the caller has dropped the key from ``other``). */
static inline int u64_put(U64Map *m, uint64_t k, uint64_t v) {
    uint64_t z = u64_mix(k);
    u64seg *g = u64_seg(m, z);
    if (g->slots == NULL || (g->used + 1) * 10 > (g->mask + 1) * 7) {
        if (u64_grow(g) < 0) {
            return -1;
        }
    }
    size_t i = (size_t)z & g->mask;
    while (g->slots[i].val != U64_EMPTY) {
        if (g->slots[i].key == k) {
            g->slots[i].val = v;
            return 0;
        }
        i = (i + 1) & g->mask;
    }
    g->slots[i].key = k;
    g->slots[i].val = v;
    g->used++;
    m->used++;
    return 0;
}

static void u64_erase_in(U64Map *m, u64seg *g, u64slot *s) {
    size_t i = (size_t)(s - g->slots);
    size_t j = i;
    for (;;) {
        j = (j + 1) & g->mask;
        if (g->slots[j].val == U64_EMPTY) {
            break;
        }
        size_t h = (size_t)u64_mix(g->slots[j].key) & g->mask;
        /* move j back to the hole at i unless its home lies cyclically in (i, j] */
        int stay = (i <= j) ? (i < h && h <= j) : (i < h || h <= j);
        if (!stay) {
            g->slots[i] = g->slots[j];
            i = j;
        }
    }
    g->slots[i].val = U64_EMPTY;
    g->used--;
    m->used--;
}

static void u64_erase(U64Map *m, u64slot *s) { u64_erase_in(m, u64_seg(m, u64_mix(s->key)), s); }

static void u64_free_all(U64Map *m) {
    for (int gi = 0; gi < U64_NSEG; gi++) {
        u64seg *g = &m->seg[gi];
        table_free(g->slots, g->slots ? (g->mask + 1) * sizeof(u64slot) : 0);
    }
    memset(m->seg, 0, sizeof(m->seg));
    m->used = 0;
}

/* Drop key ``k`` from ``other`` if it is there (0), -1 on error. */
static int other_discard(U64Map *m, PyObject *k) {
    if (m->other == NULL || PyDict_GET_SIZE(m->other) == 0) {
        return 0;
    }
    PyObject *v = PyDict_GetItemWithError(m->other, k);
    if (v == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    return PyDict_DelItem(m->other, k);
}

static int u64map_set(U64Map *m, PyObject *k, PyObject *v) {
    uint64_t kk, vv;
    int rk = as_u64(k, &kk);
    if (rk < 0) {
        return -1;
    }
    int rv = rk ? as_u64(v, &vv) : 0;
    if (rv < 0) {
        return -1;
    }
    if (rk && rv && vv != U64_EMPTY) {
        if (other_discard(m, k) < 0) {
            return -1;
        }
        return u64_put(m, kk, vv);
    }
    if (PyObject_Hash(k) == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (rk) {
        u64slot *s = u64_find(m, kk);
        if (s != NULL) {
            u64_erase(m, s);
        }
    }
    if (m->other == NULL && (m->other = PyDict_New()) == NULL) {
        return -1;
    }
    return PyDict_SetItem(m->other, k, v);
}

/* The value of ``k`` as a new reference; NULL without an error when absent. */
static PyObject *u64map_lookup(U64Map *m, PyObject *k, u64slot **where) {
    uint64_t kk;
    int rk = as_u64(k, &kk);
    *where = NULL;
    if (rk < 0) {
        return NULL;
    }
    if (rk) {
        u64slot *s = u64_find(m, kk);
        if (s != NULL) {
            *where = s;
            return PyLong_FromUnsignedLongLong(s->val);
        }
    } else if (PyObject_Hash(k) == -1 && PyErr_Occurred()) {
        return NULL; /* unhashable, as a dict says */
    }
    if (m->other == NULL) {
        return NULL;
    }
    PyObject *v = PyDict_GetItemWithError(m->other, k);
    Py_XINCREF(v);
    return v;
}

static PyObject *u64map_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (!_PyArg_NoKeywords("U64Map", kwds) || !PyArg_ParseTuple(args, ":U64Map")) {
        return NULL;
    }
    return type->tp_alloc(type, 0); /* zeroed: every segment empty */
}

static int u64map_traverse(U64Map *m, visitproc visit, void *arg) {
    Py_VISIT(m->other);
    return 0;
}

static int u64map_clear_refs(U64Map *m) {
    Py_CLEAR(m->other);
    return 0;
}

static void u64map_dealloc(U64Map *m) {
    PyObject_GC_UnTrack(m);
    Py_CLEAR(m->other);
    u64_free_all(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t u64map_len(U64Map *m) {
    return m->used + (m->other ? PyDict_GET_SIZE(m->other) : 0);
}

static PyObject *u64map_getitem(U64Map *m, PyObject *k) {
    u64slot *s;
    PyObject *v = u64map_lookup(m, k, &s);
    if (v == NULL && !PyErr_Occurred()) {
        _PyErr_SetKeyError(k);
    }
    return v;
}

static int u64map_ass(U64Map *m, PyObject *k, PyObject *v) {
    if (v != NULL) {
        return u64map_set(m, k, v);
    }
    u64slot *s;
    PyObject *old = u64map_lookup(m, k, &s);
    if (old == NULL) {
        if (!PyErr_Occurred()) {
            _PyErr_SetKeyError(k);
        }
        return -1;
    }
    Py_DECREF(old);
    if (s != NULL) {
        u64_erase(m, s);
        return 0;
    }
    return PyDict_DelItem(m->other, k);
}

static int u64map_contains(U64Map *m, PyObject *k) {
    u64slot *s;
    PyObject *v = u64map_lookup(m, k, &s);
    if (v == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_DECREF(v);
    return 1;
}

static PyObject *u64map_get(U64Map *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    u64slot *s;
    PyObject *v = u64map_lookup(m, args[0], &s);
    if (v == NULL && !PyErr_Occurred()) {
        v = nargs == 2 ? args[1] : Py_None;
        Py_INCREF(v);
    }
    return v;
}

static PyObject *u64map_pop(U64Map *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    u64slot *s;
    PyObject *v = u64map_lookup(m, args[0], &s);
    if (v == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        if (nargs == 2) {
            Py_INCREF(args[1]);
            return args[1];
        }
        _PyErr_SetKeyError(args[0]);
        return NULL;
    }
    if (s != NULL) {
        u64_erase(m, s);
    } else if (PyDict_DelItem(m->other, args[0]) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    return v;
}

static PyObject *u64map_clear(U64Map *m, PyObject *unused) {
    u64_free_all(m);
    Py_CLEAR(m->other);
    Py_RETURN_NONE;
}

/* keys()/values()/items() of the maps below (kind 0/1/2), one entry at a time: append k,
 * v or (k, v) to ``out``, stealing k and v (NULL where not asked for, or on error). */
static int list_append_entry(PyObject *out, int kind, PyObject *k, PyObject *v) {
    PyObject *e = kind == 0 ? (Py_XINCREF(k), k) : kind == 1 ? (Py_XINCREF(v), v)
                                                             : (k && v ? PyTuple_Pack(2, k, v) : NULL);
    Py_XDECREF(k);
    Py_XDECREF(v);
    if (e == NULL || PyList_Append(out, e) < 0) {
        Py_XDECREF(e);
        return -1;
    }
    Py_DECREF(e);
    return 0;
}

/* The same of the plain dict beside a table (keys outside its range), appended to out. */
static int list_extend_other(PyObject *out, PyObject *other, int kind) {
    PyObject *rest = kind == 0 ? PyDict_Keys(other)
                     : kind == 1 ? PyDict_Values(other) : PyDict_Items(other);
    if (rest == NULL) {
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(out);
    int rc = PyList_SetSlice(out, n, n, rest);
    Py_DECREF(rest);
    return rc;
}

/* An iterator over a snapshot list (stolen; NULL passes the error on). */
static PyObject *iter_of_list(PyObject *list) {
    if (list == NULL) {
        return NULL;
    }
    PyObject *it = PyObject_GetIter(list);
    Py_DECREF(list);
    return it;
}

/* kind 0: keys, 1: values, 2: items, as a new list (a snapshot). */
static PyObject *u64map_list(U64Map *m, int kind) {
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (int gi = 0; gi < U64_NSEG; gi++) {
        u64seg *g = &m->seg[gi];
        size_t cap = g->slots ? g->mask + 1 : 0;
        for (size_t i = 0; i < cap; i++) {
            u64slot *s = &g->slots[i];
            if (s->val == U64_EMPTY) {
                continue;
            }
            PyObject *k = kind != 1 ? PyLong_FromUnsignedLongLong(s->key) : NULL;
            PyObject *v = kind != 0 ? PyLong_FromUnsignedLongLong(s->val) : NULL;
            if (list_append_entry(out, kind, k, v) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
    }
    if (m->other != NULL && list_extend_other(out, m->other, kind) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *u64map_keys(U64Map *m, PyObject *unused) { return u64map_list(m, 0); }
static PyObject *u64map_values(U64Map *m, PyObject *unused) { return u64map_list(m, 1); }
static PyObject *u64map_items(U64Map *m, PyObject *unused) { return u64map_list(m, 2); }

static PyObject *u64map_iter(U64Map *m) { return iter_of_list(u64map_list(m, 0)); }

/* update(pairs): a mapping (its items) or an iterable of (key, value) pairs. */
static PyObject *u64map_update(U64Map *m, PyObject *src) {
    PyObject *items = NULL;
    if (PyDict_Check(src)) {
        items = PyDict_Items(src);
    } else if (PyObject_TypeCheck(src, &U64MapType)) {
        items = u64map_list((U64Map *)src, 2);
    } else {
        Py_INCREF(src);
        items = src;
    }
    if (items == NULL) {
        return NULL;
    }
    PyObject *it = PyObject_GetIter(items);
    Py_DECREF(items);
    if (it == NULL) {
        return NULL;
    }
    PyObject *pair;
    while ((pair = PyIter_Next(it)) != NULL) {
        PyObject *fast = PySequence_Fast(pair, "update: each item must be a (key, value) pair");
        Py_DECREF(pair);
        if (fast == NULL) {
            goto fail;
        }
        if (PySequence_Fast_GET_SIZE(fast) != 2) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "update: each item must be a (key, value) pair");
            goto fail;
        }
        int rc = u64map_set(m, PySequence_Fast_GET_ITEM(fast, 0), PySequence_Fast_GET_ITEM(fast, 1));
        Py_DECREF(fast);
        if (rc < 0) {
            goto fail;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_RETURN_NONE;
fail:
    Py_DECREF(it);
    return NULL;
}

/* ---- U64Map as a counter: ActiveSequences' block_refs (hash -> requests holding it) --
 *
 * A route of a 4k-token prompt counts its 256 block hashes up on the chosen worker and its
 * finish counts them down: in Python, Counter's C loop (a dict insert and an int object per
 * block, and the dict's resizes from empty) and an interpreted loop of three dict
 * operations per block cost ~60 us of a route. The scorer's in-flight credit asks how far
 * a prompt runs through a worker's active blocks, Dynamo's cost how many are new to it.
 *
 * Each method equals its Python reference in router/sequences.py on a dict, error and
 * partial effect included (tests/router/test_native.py): keys are taken in order, and a
 * key that fails (count_down of an absent one: KeyError) leaves the keys before it done
 * and those after it untouched, as the loop would. Keys and values outside the table's
 * range go through ``other`` with Python's own arithmetic. */

/* Keys converted a batch at a time, so that their slots are prefetched while earlier keys
 * wait on theirs; one miss per key on a table out of cache otherwise. */
#define U64_BATCH 32

typedef struct {
    PyObject *fast; /* the keys (PySequence_Fast) */
    Py_ssize_t lo, hi; /* keys[lo:hi] are converted */
    uint64_t key[U64_BATCH], z[U64_BATCH]; /* keys[lo + j] and its mixed hash */
    char ok[U64_BATCH]; /* 0: keys[lo + j] is not an int in [0, 2**64) */
} u64batch;

static void u64_batch_load(U64Map *m, u64batch *b, Py_ssize_t i, Py_ssize_t size) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(b->fast);
    PyObject **items = PySequence_Fast_ITEMS(b->fast);
    b->lo = i;
    b->hi = n - i < size ? n : i + size;
    for (Py_ssize_t j = i; j < b->hi; j++) {
        uint64_t *k = &b->key[j - i];
        int r = as_u64(items[j], k);
        if (r < 0) {
            /* the slow path converts it again, in its turn: the error comes in order */
            PyErr_Clear();
            r = 0;
        }
        b->ok[j - i] = (char)r;
        if (r) {
            b->z[j - i] = u64_mix(*k);
            u64_prefetch_z(m, b->z[j - i]);
        }
    }
}

/* k's slot in its segment g (z: its mixed hash), else the empty slot that ends its probe
 * run (val U64_EMPTY); NULL while g has no table. */
static inline u64slot *u64_probe(u64seg *g, uint64_t k, uint64_t z) {
    if (g->slots == NULL) {
        return NULL;
    }
    for (size_t i = (size_t)z & g->mask;; i = (i + 1) & g->mask) {
        u64slot *s = &g->slots[i];
        if (s->val == U64_EMPTY || s->key == k) {
            return s;
        }
    }
}

static inline int u64_other_empty(U64Map *m) {
    return m->other == NULL || PyDict_GET_SIZE(m->other) == 0;
}

/* The slow path runs Python code (a value's __add__, a key's __hash__ or __eq__) that may
 * change the keys' list: take the key anew, hold it, and reconvert what follows. */
static PyObject *u64_batch_take(u64batch *b, Py_ssize_t i) {
    PyObject *k = PySequence_Fast_GET_ITEM(b->fast, i);
    Py_INCREF(k);
    b->hi = i + 1;
    return k;
}

static int u64_batch_open(u64batch *b, PyObject *keys, const char *what) {
    b->fast = PySequence_Fast(keys, what);
    b->lo = b->hi = 0;
    return b->fast == NULL ? -1 : 0;
}

/* refs[k] = refs.get(k, 0) + 1 (up) or c = refs[k] - 1; refs[k] = c if c else del refs[k],
 * for any key and value: 0 or -1 on error. */
static int u64map_count_slow(U64Map *m, PyObject *k, int up) {
    u64slot *s;
    PyObject *v = u64map_lookup(m, k, &s);
    if (v == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        if (!up) {
            _PyErr_SetKeyError(k);
            return -1;
        }
        v = PyLong_FromLong(0);
        if (v == NULL) {
            return -1;
        }
    }
    PyObject *one = PyLong_FromLong(1);
    if (one == NULL) {
        Py_DECREF(v);
        return -1;
    }
    PyObject *c = up ? PyNumber_Add(v, one) : PyNumber_Subtract(v, one);
    Py_DECREF(one);
    Py_DECREF(v);
    if (c == NULL) {
        return -1;
    }
    int rc, keep = up ? 1 : PyObject_IsTrue(c);
    if (keep < 0) {
        rc = -1;
    } else if (keep) {
        rc = u64map_set(m, k, c);
    } else {
        rc = u64map_ass(m, k, NULL); /* KeyError if the arithmetic above took it away */
    }
    Py_DECREF(c);
    return rc;
}

/* k in refs for a key batch-converted or not (rk): 1, 0, or -1 on error. */
static int u64map_has(U64Map *m, PyObject *k, int rk, uint64_t kk) {
    if (rk && u64_find(m, kk) != NULL) {
        return 1;
    }
    if (u64_other_empty(m)) {
        /* a dict refuses an unhashable key even when empty */
        return rk || PyObject_Hash(k) != -1 || !PyErr_Occurred() ? 0 : -1;
    }
    return PyDict_Contains(m->other, k);
}

static PyObject *u64map_count(U64Map *m, PyObject *const *args, Py_ssize_t nargs, int up) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, up ? "count_up(keys)" : "count_down(keys)");
        return NULL;
    }
    u64batch b;
    if (u64_batch_open(&b, args[0], "keys must be a sequence") < 0) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(b.fast); i++) {
        if (i >= b.hi) {
            u64_batch_load(m, &b, i, U64_BATCH);
        }
        Py_ssize_t j = i - b.lo;
        if (b.ok[j]) {
            uint64_t k = b.key[j];
            u64seg *g = u64_seg(m, b.z[j]);
            u64slot *s = u64_probe(g, k, b.z[j]);
            if (s == NULL || s->val == U64_EMPTY) {
                /* new, unless ``other`` holds it (with a value outside the table's range) */
                if (up && u64_other_empty(m)) {
                    if (s != NULL && (g->used + 1) * 10 <= (g->mask + 1) * 7) {
                        s->key = k; /* the end of its probe run: u64_put's slot */
                        s->val = 1;
                        g->used++;
                        m->used++;
                    } else if (u64_put(m, k, 1) < 0) { /* grows first */
                        goto fail;
                    }
                    continue;
                }
            } else if (up && s->val + 1 != U64_EMPTY) {
                s->val++;
                continue;
            } else if (!up && s->val > 1) {
                s->val--;
                continue;
            } else if (!up && s->val == 1) {
                u64_erase_in(m, g, s);
                continue;
            }
            /* else a count leaving the table's range (0 - 1, 2**64 - 2 + 1): the slow path */
        }
        PyObject *k = u64_batch_take(&b, i);
        int rc = u64map_count_slow(m, k, up);
        Py_DECREF(k);
        if (rc < 0) {
            goto fail;
        }
    }
    Py_DECREF(b.fast);
    Py_RETURN_NONE;
fail:
    Py_DECREF(b.fast);
    return NULL;
}

static PyObject *u64map_count_up(U64Map *m, PyObject *const *args, Py_ssize_t nargs) {
    return u64map_count(m, args, nargs, 1);
}

static PyObject *u64map_count_down(U64Map *m, PyObject *const *args, Py_ssize_t nargs) {
    return u64map_count(m, args, nargs, 0);
}

/* The first k in [start, min(stop, len(keys))) whose key is absent (``stop`` clamped when
 * all are there): 0..n, or -1 on error. ``absent`` instead counts the absent keys of all. */
static Py_ssize_t u64map_scan(U64Map *m, u64batch *b, Py_ssize_t start, Py_ssize_t stop,
                              int absent) {
    Py_ssize_t count = 0, i;
    for (i = start; i < stop && i < PySequence_Fast_GET_SIZE(b->fast); i++) {
        if (i >= b->hi) {
            /* a run mostly ends at its first key (the scorer's probe of a worker): convert
             * a few first, the rest once it goes on */
            u64_batch_load(m, b, i, i == start && !absent ? 4 : U64_BATCH);
        }
        Py_ssize_t j = i - b->lo;
        u64slot *s = b->ok[j] ? u64_probe(u64_seg(m, b->z[j]), b->key[j], b->z[j]) : NULL;
        int in = s != NULL && s->val != U64_EMPTY;
        if (!in && !(b->ok[j] && u64_other_empty(m))) {
            PyObject *k = u64_batch_take(b, i);
            in = u64map_has(m, k, b->ok[j], b->key[j]);
            Py_DECREF(k);
            if (in < 0) {
                return -1;
            }
        }
        if (!in) {
            if (!absent) {
                return i;
            }
            count++;
        }
    }
    return absent ? count : i;
}

static PyObject *u64map_run_in(U64Map *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "run_in(keys, start[, stop])");
        return NULL;
    }
    Py_ssize_t start = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t stop = PY_SSIZE_T_MAX;
    if (nargs == 3 && (stop = PyNumber_AsSsize_t(args[2], PyExc_OverflowError)) == -1 &&
        PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0 || stop < 0) {
        PyErr_SetString(PyExc_ValueError, "run_in: start and stop must be >= 0");
        return NULL;
    }
    u64batch b;
    if (u64_batch_open(&b, args[0], "keys must be a sequence") < 0) {
        return NULL;
    }
    Py_ssize_t k = u64map_scan(m, &b, start, stop, 0);
    Py_DECREF(b.fast);
    return k < 0 ? NULL : PyLong_FromSsize_t(k);
}

static PyObject *u64map_count_absent(U64Map *m, PyObject *keys) {
    u64batch b;
    if (u64_batch_open(&b, keys, "keys must be a sequence") < 0) {
        return NULL;
    }
    Py_ssize_t n = u64map_scan(m, &b, 0, PY_SSIZE_T_MAX, 1);
    Py_DECREF(b.fast);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

static PyMethodDef u64map_methods[] = {
    {"get", (PyCFunction)(void (*)(void))u64map_get, METH_FASTCALL, "get(key, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))u64map_pop, METH_FASTCALL, "pop(key[, default])"},
    {"clear", (PyCFunction)u64map_clear, METH_NOARGS, "Remove every entry."},
    {"keys", (PyCFunction)u64map_keys, METH_NOARGS, "The keys, as a list."},
    {"values", (PyCFunction)u64map_values, METH_NOARGS, "The values, as a list."},
    {"items", (PyCFunction)u64map_items, METH_NOARGS, "The (key, value) pairs, as a list."},
    {"update", (PyCFunction)u64map_update, METH_O, "update(mapping or iterable of pairs)"},
    {"count_up", (PyCFunction)(void (*)(void))u64map_count_up, METH_FASTCALL,
     "count_up(keys): for each key in turn, self[key] = self.get(key, 0) + 1."},
    {"count_down", (PyCFunction)(void (*)(void))u64map_count_down, METH_FASTCALL,
     "count_down(keys): for each key in turn, self[key] -= 1, deleted at 0; KeyError at an "
     "absent key, the keys before it taken."},
    {"run_in", (PyCFunction)(void (*)(void))u64map_run_in, METH_FASTCALL,
     "run_in(keys, start[, stop]): the first k >= start with keys[k] not in self, "
     "min(stop, len(keys)) when there is none (start if start is past it)."},
    {"count_absent", (PyCFunction)u64map_count_absent, METH_O,
     "count_absent(keys): how many of keys (duplicates each) are not in self."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods u64map_as_mapping = {
    (lenfunc)u64map_len, (binaryfunc)u64map_getitem, (objobjargproc)u64map_ass,
};

static PySequenceMethods u64map_as_sequence = {
    .sq_contains = (objobjproc)u64map_contains,
};

static PyTypeObject U64MapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dynamo_ext._native.U64Map",
    .tp_basicsize = sizeof(U64Map),
    .tp_dealloc = (destructor)u64map_dealloc,
    .tp_as_sequence = &u64map_as_sequence,
    .tp_as_mapping = &u64map_as_mapping,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "U64Map(): a dict[int, int], ints in [0, 2**64) kept in a flat table.",
    .tp_traverse = (traverseproc)u64map_traverse,
    .tp_clear = (inquiry)u64map_clear_refs,
    .tp_iter = (getiterfunc)u64map_iter,
    .tp_methods = u64map_methods,
    .tp_new = u64map_new,
};

/* ---- MaskMap: the GPU tier of KvIndex, block hash -> worker bitmask ----------------- */

/* What a dict[int, int] of hash -> mask cost per block: a dict entry, its index, and a key
 * int object (~100 bytes), and a resize of the whole dict every doubling. Here a block is
 * one 16-byte slot of an open-addressing table (linear probing, backward-shift deletion,
 * as U64Map): the key and the mask, encoded in one word:
 *   - 0: an empty slot (a mask of no worker is never stored: the key is deleted);
 *   - top bit 0: the mask itself, for workers of slots 0..62;
 *   - top bits 10: one worker of slot >= 63, its slot in the low bits;
 *   - top bits 11: an index into a pool of interned wide masks (refcounted), so that the
 *     thousands of blocks that the same workers hold share one copy.
 * The encoding is canonical (equal masks, equal words), which lets the walk skip the AND
 * of a block whose mask is the previous block's. A key that is not an int in [0, 2**64)
 * (a signed engine hash) lives in a plain dict beside the table. */
#define MM_KIND(v) ((v) >> 62)
#define MM_SINGLE ((uint64_t)2 << 62)
#define MM_POOL ((uint64_t)3 << 62)
#define MM_LOW ((((uint64_t)1) << 62) - 1)

typedef struct {
    uint64_t key;
    uint64_t val;
} mmslot;

typedef struct {
    uint64_t hash;
    uint64_t *w;
    uint32_t refs; /* 0: a free pool entry */
    uint32_t nwords;
} mmwide;

/* The table is MM_NSEG tables (a block's by the top bits of its mixed hash), each grown on
 * its own: a doubling rehashes 1/MM_NSEG of the blocks, in cache, instead of stalling the
 * event loop for all of them (30 ms at 700k blocks for one table). */
#define MM_SEGBITS 7
#define MM_NSEG (1 << MM_SEGBITS)
#define MM_SEG0 8 /* a segment's first capacity */

typedef struct {
    mmslot *slots;
    size_t mask; /* capacity - 1; 0 when slots is NULL */
    size_t used;
} mmseg;

typedef struct {
    PyObject_HEAD
    mmseg seg[MM_NSEG];
    Py_ssize_t used;
    mmwide *pool;
    uint32_t npool, pool_cap;
    uint32_t *freel;
    uint32_t nfree, free_cap;
    uint32_t *itab; /* intern table: pool index + 1, 0 empty */
    size_t imask;
    uint32_t iused;
    PyObject *other; /* dict of the keys outside [0, 2**64), or NULL */
} MaskMap;

static PyTypeObject MaskMapType;

static inline uint64_t mix64(uint64_t k) {
    uint64_t z = k ^ u64map_seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline mmseg *mm_seg(MaskMap *m, uint64_t z) { return &m->seg[z >> (64 - MM_SEGBITS)]; }

static inline uint32_t trim_words(const uint64_t *w, uint32_t n) {
    while (n && !w[n - 1]) {
        n--;
    }
    return n;
}

static uint64_t words_hash(const uint64_t *w, uint32_t n) {
    uint64_t acc = XXPRIME_5 + n;
    for (uint32_t i = 0; i < n; i++) {
        acc = lane(acc, w[i]);
    }
    return acc;
}

/* The pool entry of these words (trimmed, wider than inline, two bits or more), a new
 * reference to it; -1 on error. */
static int64_t mm_intern(MaskMap *m, const uint64_t *w, uint32_t n) {
    uint64_t h = words_hash(w, n);
    if (m->itab != NULL) {
        for (size_t i = (size_t)mix64(h) & m->imask;; i = (i + 1) & m->imask) {
            uint32_t e = m->itab[i];
            if (e == 0) {
                break;
            }
            mmwide *x = &m->pool[e - 1];
            if (x->hash == h && x->nwords == n && memcmp(x->w, w, (size_t)n * 8) == 0) {
                x->refs++;
                return e - 1;
            }
        }
    }
    if (m->itab == NULL || (size_t)(m->iused + 1) * 2 > m->imask + 1) {
        size_t cap = m->itab ? (m->imask + 1) * 2 : 64;
        uint32_t *nt = PyMem_Calloc(cap, sizeof(uint32_t));
        if (nt == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        size_t oldcap = m->itab ? m->imask + 1 : 0;
        for (size_t i = 0; i < oldcap; i++) {
            uint32_t e = m->itab[i];
            if (e) {
                size_t j = (size_t)mix64(m->pool[e - 1].hash) & (cap - 1);
                while (nt[j]) {
                    j = (j + 1) & (cap - 1);
                }
                nt[j] = e;
            }
        }
        PyMem_Free(m->itab);
        m->itab = nt;
        m->imask = cap - 1;
    }
    uint64_t *copy = PyMem_Malloc((size_t)n * 8);
    if (copy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(copy, w, (size_t)n * 8);
    uint32_t idx;
    if (m->nfree) {
        idx = m->freel[--m->nfree];
    } else {
        if (m->npool == m->pool_cap) {
            uint32_t cap = m->pool_cap ? m->pool_cap * 2 : 16;
            mmwide *np = PyMem_Realloc(m->pool, (size_t)cap * sizeof(mmwide));
            if (np == NULL) {
                PyMem_Free(copy);
                PyErr_NoMemory();
                return -1;
            }
            m->pool = np;
            m->pool_cap = cap;
        }
        idx = m->npool++;
    }
    mmwide *x = &m->pool[idx];
    x->hash = h;
    x->w = copy;
    x->refs = 1;
    x->nwords = n;
    size_t i = (size_t)mix64(h) & m->imask;
    while (m->itab[i]) {
        i = (i + 1) & m->imask;
    }
    m->itab[i] = idx + 1;
    m->iused++;
    return idx;
}

/* Drop one reference to what ``val`` encodes (a pool entry; nothing for the others). */
static void mm_release(MaskMap *m, uint64_t val) {
    if (MM_KIND(val) != 3) {
        return;
    }
    uint32_t idx = (uint32_t)(val & MM_LOW);
    mmwide *x = &m->pool[idx];
    if (--x->refs) {
        return;
    }
    /* out of the intern table (backward shift), its words freed, the entry reusable */
    size_t i = (size_t)mix64(x->hash) & m->imask;
    while (m->itab[i] != idx + 1) {
        i = (i + 1) & m->imask;
    }
    size_t j = i;
    for (;;) {
        j = (j + 1) & m->imask;
        uint32_t e = m->itab[j];
        if (e == 0) {
            break;
        }
        size_t hj = (size_t)mix64(m->pool[e - 1].hash) & m->imask;
        int stay = (i <= j) ? (i < hj && hj <= j) : (i < hj || hj <= j);
        if (!stay) {
            m->itab[i] = e;
            i = j;
        }
    }
    m->itab[i] = 0;
    m->iused--;
    PyMem_Free(x->w);
    x->w = NULL;
    if (m->nfree == m->free_cap) {
        uint32_t cap = m->free_cap ? m->free_cap * 2 : 16;
        uint32_t *nf = PyMem_Realloc(m->freel, (size_t)cap * sizeof(uint32_t));
        if (nf == NULL) {
            return; /* the entry is only lost for reuse */
        }
        m->freel = nf;
        m->free_cap = cap;
    }
    m->freel[m->nfree++] = idx;
}

/* The canonical word of a mask (n words, any trailing zeros), with a new pool reference
 * when it is a pool entry; 0 for the empty mask. -1 (all ones) on error. */
static uint64_t mm_encode(MaskMap *m, const uint64_t *w, uint32_t n) {
    n = trim_words(w, n);
    if (n == 0) {
        return 0;
    }
    if (n == 1 && !(w[0] >> 63)) {
        return w[0];
    }
    int bits = 0, at = 0;
    for (uint32_t i = 0; i < n && bits < 2; i++) {
        if (w[i]) {
            bits += __builtin_popcountll(w[i]);
            at = (int)i * 64 + __builtin_ctzll(w[i]);
        }
    }
    if (bits == 1) {
        return MM_SINGLE | (uint64_t)at;
    }
    int64_t idx = mm_intern(m, w, n);
    return idx < 0 ? (uint64_t)-1 : (MM_POOL | (uint64_t)idx);
}

/* The mask of ``val`` as words; returns how many (at most MAX_WORDS, none past them). */
static inline uint32_t mm_words(const MaskMap *m, uint64_t val, uint64_t *w) {
    switch (MM_KIND(val)) {
    case 2: {
        uint32_t s = (uint32_t)(val & MM_LOW);
        memset(w, 0, (size_t)(s / 64) * 8);
        w[s / 64] = (uint64_t)1 << (s % 64);
        return s / 64 + 1;
    }
    case 3: {
        const mmwide *x = &m->pool[val & MM_LOW];
        memcpy(w, x->w, (size_t)x->nwords * 8);
        return x->nwords;
    }
    default:
        w[0] = val;
        return 1;
    }
}

/* The first ``nwords`` words of the mask of ``val`` (zero past its width). */
static inline void mm_words_n(const MaskMap *m, uint64_t val, uint64_t *w, int nwords) {
    switch (MM_KIND(val)) {
    case 2: {
        uint32_t s = (uint32_t)(val & MM_LOW);
        memset(w, 0, (size_t)nwords * 8);
        if ((int)(s / 64) < nwords) {
            w[s / 64] = (uint64_t)1 << (s % 64);
        }
        return;
    }
    case 3: {
        const mmwide *x = &m->pool[val & MM_LOW];
        int k = (int)x->nwords < nwords ? (int)x->nwords : nwords;
        memcpy(w, x->w, (size_t)k * 8);
        if (k < nwords) {
            memset(w + k, 0, (size_t)(nwords - k) * 8);
        }
        return;
    }
    default:
        w[0] = val;
        if (nwords > 1) {
            memset(w + 1, 0, (size_t)(nwords - 1) * 8);
        }
    }
}

static inline int mm_has(const MaskMap *m, uint64_t val, uint32_t s) {
    switch (MM_KIND(val)) {
    case 2:
        return (uint32_t)(val & MM_LOW) == s;
    case 3: {
        const mmwide *x = &m->pool[val & MM_LOW];
        return s / 64 < x->nwords && ((x->w[s / 64] >> (s % 64)) & 1);
    }
    default:
        return s < 63 && ((val >> s) & 1);
    }
}

/* ``val`` with worker ``s`` added (set 1) or taken out (0): the new word, a new reference;
 * the caller releases the old one. -1 on error. */
static uint64_t mm_flip(MaskMap *m, uint64_t val, uint32_t s, int set) {
    if (MM_KIND(val) < 2 && s < 63) {
        return set ? (val | ((uint64_t)1 << s)) : (val & ~((uint64_t)1 << s));
    }
    if (val == 0) {
        return MM_SINGLE | s;
    }
    uint64_t w[MAX_WORDS];
    uint32_t n = mm_words(m, val, w);
    uint32_t need = s / 64 + 1;
    if (set && need > n) {
        memset(w + n, 0, (size_t)(need - n) * 8);
        n = need;
    }
    if (s / 64 < n) {
        if (set) {
            w[s / 64] |= (uint64_t)1 << (s % 64);
        } else {
            w[s / 64] &= ~((uint64_t)1 << (s % 64));
        }
    }
    return mm_encode(m, w, n);
}

static inline mmslot *mm_alloc(size_t cap) { return table_alloc(cap * sizeof(mmslot)); }
static inline void mm_free(mmslot *p, size_t cap) { table_free(p, cap * sizeof(mmslot)); }

static int mm_grow(mmseg *g) {
    size_t cap = g->slots ? (g->mask + 1) * 2 : MM_SEG0;
    mmslot *ns = mm_alloc(cap);
    if (ns == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    mmslot *old = g->slots;
    size_t oldcap = old ? g->mask + 1 : 0;
    g->slots = ns;
    g->mask = cap - 1;
    for (size_t i = 0; i < oldcap; i++) {
        if (old[i].val) {
            size_t j = (size_t)mix64(old[i].key) & g->mask;
            while (ns[j].val) {
                j = (j + 1) & g->mask;
            }
            ns[j] = old[i];
        }
    }
    mm_free(old, oldcap);
    return 0;
}

/* Room in segment ``g`` for one more block (load at most 0.7). */
static inline int mm_room(mmseg *g) {
    if (g->slots == NULL || (g->used + 1) * 10 > (g->mask + 1) * 7) {
        return mm_grow(g);
    }
    return 0;
}

static inline void mm_prefetch(MaskMap *m, uint64_t k, int write) {
    uint64_t z = mix64(k);
    mmseg *g = mm_seg(m, z);
    if (g->slots != NULL) {
        if (write) {
            __builtin_prefetch(&g->slots[z & g->mask], 1);
        } else {
            __builtin_prefetch(&g->slots[z & g->mask], 0);
        }
    }
}

static inline mmslot *mm_find(MaskMap *m, uint64_t k, mmseg **where) {
    uint64_t z = mix64(k);
    mmseg *g = mm_seg(m, z);
    *where = g;
    if (g->slots == NULL) {
        return NULL;
    }
    for (size_t i = (size_t)z & g->mask;; i = (i + 1) & g->mask) {
        mmslot *s = &g->slots[i];
        if (s->val == 0) {
            return NULL;
        }
        if (s->key == k) {
            return s;
        }
    }
}

static void mm_erase(MaskMap *m, mmseg *g, mmslot *s) {
    size_t i = (size_t)(s - g->slots);
    size_t j = i;
    for (;;) {
        j = (j + 1) & g->mask;
        if (g->slots[j].val == 0) {
            break;
        }
        size_t h = (size_t)mix64(g->slots[j].key) & g->mask;
        int stay = (i <= j) ? (i < h && h <= j) : (i < h || h <= j);
        if (!stay) {
            g->slots[i] = g->slots[j];
            i = j;
        }
    }
    g->slots[i].val = 0;
    g->used--;
    m->used--;
}

/* A new block ``k`` (absent) with mask word ``val``. */
static int mm_insert(MaskMap *m, uint64_t k, uint64_t val) {
    uint64_t z = mix64(k);
    mmseg *g = mm_seg(m, z);
    if (mm_room(g) < 0) {
        return -1;
    }
    size_t i = (size_t)z & g->mask;
    while (g->slots[i].val) {
        i = (i + 1) & g->mask;
    }
    g->slots[i].key = k;
    g->slots[i].val = val;
    g->used++;
    m->used++;
    return 0;
}

/* Worker ``s`` holds block ``k`` now: 1 if it did not before, 0 if it did, -1 on error. */
static inline int mm_set_bit(MaskMap *m, uint64_t k, uint32_t s) {
    uint64_t z = mix64(k);
    mmseg *g = mm_seg(m, z);
    if (mm_room(g) < 0) {
        return -1;
    }
    for (size_t i = (size_t)z & g->mask;; i = (i + 1) & g->mask) {
        mmslot *e = &g->slots[i];
        if (e->val == 0) {
            e->key = k;
            e->val = s < 63 ? ((uint64_t)1 << s) : (MM_SINGLE | s);
            g->used++;
            m->used++;
            return 1;
        }
        if (e->key == k) {
            if (mm_has(m, e->val, s)) {
                return 0;
            }
            uint64_t nv = mm_flip(m, e->val, s, 1);
            if (nv == (uint64_t)-1) {
                return -1;
            }
            mm_release(m, e->val);
            e->val = nv;
            return 1;
        }
    }
}

/* Worker ``s`` no longer holds the block in ``e`` (of segment ``g``): 1 if it did, 0 if
 * not, -1 on error. */
static int mm_clear_bit(MaskMap *m, mmseg *g, mmslot *e, uint32_t s) {
    if (!mm_has(m, e->val, s)) {
        return 0;
    }
    uint64_t nv = mm_flip(m, e->val, s, 0);
    if (nv == (uint64_t)-1) {
        return -1;
    }
    mm_release(m, e->val);
    if (nv == 0) {
        mm_erase(m, g, e);
    } else {
        e->val = nv;
    }
    return 1;
}

static PyObject *mm_to_int(const MaskMap *m, uint64_t val) {
    if (MM_KIND(val) < 2) {
        return PyLong_FromUnsignedLongLong(val);
    }
    uint64_t w[MAX_WORDS];
    uint32_t n = mm_words(m, val, w); /* words as little-endian bytes, as mask_words */
    return _PyLong_FromByteArray((const unsigned char *)w, (size_t)n * 8, 1, 0);
}

/* A mask given from Python: a positive int of at most MAX_WORDS words. */
static uint64_t mm_from_int(MaskMap *m, PyObject *v) {
    if (!PyLong_Check(v) || _PyLong_Sign(v) <= 0) {
        PyErr_SetString(PyExc_ValueError, "a worker mask is a positive int");
        return (uint64_t)-1;
    }
    uint64_t w[MAX_WORDS];
    size_t nbits = _PyLong_NumBits(v);
    int n = (int)((nbits + 63) / 64);
    if (n > MAX_WORDS) {
        PyErr_SetString(PyExc_OverflowError, "mask wider than the index's worker slots");
        return (uint64_t)-1;
    }
    if (mask_words(v, w, n) < 0) {
        return (uint64_t)-1;
    }
    return mm_encode(m, w, (uint32_t)n);
}

static int mm_other_dict(MaskMap *m) {
    if (m->other == NULL && (m->other = PyDict_New()) == NULL) {
        return -1;
    }
    return 0;
}

/* The one-bit int of worker ``s``. */
static PyObject *bit_int(uint32_t s) {
    PyObject *one = PyLong_FromLong(1), *sh = PyLong_FromUnsignedLong(s);
    PyObject *b = (one && sh) ? PyNumber_Lshift(one, sh) : NULL;
    Py_XDECREF(one);
    Py_XDECREF(sh);
    return b;
}

/* set (1) or clear (0) worker ``s``'s bit of ``k``, a key of ``other``: as mm_set_bit /
 * mm_clear_bit say. */
static int mm_other_flip(MaskMap *m, PyObject *k, uint32_t s, int set) {
    if (!set && (m->other == NULL || PyDict_GET_SIZE(m->other) == 0)) {
        return PyObject_Hash(k) == -1 && PyErr_Occurred() ? -1 : 0;
    }
    if (mm_other_dict(m) < 0) {
        return -1;
    }
    PyObject *old = PyDict_GetItemWithError(m->other, k); /* borrowed */
    if (old == NULL && PyErr_Occurred()) {
        return -1;
    }
    PyObject *b = bit_int(s);
    if (b == NULL) {
        return -1;
    }
    int rc;
    if (old == NULL) {
        rc = set ? (PyDict_SetItem(m->other, k, b) < 0 ? -1 : 1) : 0;
        Py_DECREF(b);
        return rc;
    }
    PyObject *both = PyNumber_And(old, b);
    int held = both ? PyObject_IsTrue(both) : -1;
    Py_XDECREF(both);
    if (held < 0 || held == set) {
        Py_DECREF(b);
        return held < 0 ? -1 : 0;
    }
    PyObject *nv;
    if (set) {
        nv = PyNumber_Or(old, b);
    } else {
        nv = PyNumber_Xor(old, b);
    }
    Py_DECREF(b);
    if (nv == NULL) {
        return -1;
    }
    int truthy = PyObject_IsTrue(nv);
    if (truthy > 0) {
        rc = PyDict_SetItem(m->other, k, nv);
    } else {
        rc = truthy < 0 ? -1 : PyDict_DelItem(m->other, k);
    }
    Py_DECREF(nv);
    return rc < 0 ? -1 : 1;
}

static int slot_arg(PyObject *o, uint32_t *s) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < 0 || v >= MAX_WORDS * 64) {
        PyErr_SetString(PyExc_ValueError, "worker slot out of range");
        return -1;
    }
    *s = (uint32_t)v;
    return 0;
}

#define MM_PF 8 /* blocks looked up ahead: their slots' cache lines are fetched meanwhile */

/* store(hashes, slot) -> added: KvIndex.store's unbounded loop, on this table. */
static PyObject *maskmap_store(MaskMap *m, PyObject *args) {
    PyObject *hashes, *slot_o;
    uint32_t s;
    if (!PyArg_ParseTuple(args, "OO", &hashes, &slot_o) || slot_arg(slot_o, &s) < 0) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(hashes, "hashes must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t added = 0;
    for (Py_ssize_t i = 0; i < n && i < MM_PF; i++) {
        uint64_t k;
        if (as_u64(items[i], &k) == 1) {
            mm_prefetch(m, k, 1);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t k;
        if (i + MM_PF < n && as_u64(items[i + MM_PF], &k) == 1) {
            mm_prefetch(m, k, 1);
        }
        int rk = as_u64(items[i], &k);
        int rc = rk < 0 ? -1 : rk ? mm_set_bit(m, k, s) : mm_other_flip(m, items[i], s, 1);
        if (rc < 0) {
            goto fail;
        }
        added += rc;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(added);
fail:
    Py_DECREF(seq);
    return NULL;
}

/* remove(hashes, slot) -> removed: KvIndex.remove's loop, on this table. */
static PyObject *maskmap_remove(MaskMap *m, PyObject *args) {
    PyObject *hashes, *slot_o;
    uint32_t s;
    if (!PyArg_ParseTuple(args, "OO", &hashes, &slot_o) || slot_arg(slot_o, &s) < 0) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(hashes, "hashes must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t removed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t k;
        int rk = as_u64(items[i], &k), rc = 0;
        if (rk < 0) {
            rc = -1;
        } else if (rk) {
            mmseg *g;
            mmslot *e = mm_find(m, k, &g);
            rc = e ? mm_clear_bit(m, g, e, s) : 0;
        } else {
            rc = mm_other_flip(m, items[i], s, 0);
        }
        if (rc < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        removed += rc;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(removed);
}

/* clear_slot(slot) -> cleared: worker ``slot`` holds nothing any more (O(table)). */
static PyObject *maskmap_clear_slot(MaskMap *m, PyObject *slot_o) {
    uint32_t s;
    if (slot_arg(slot_o, &s) < 0) {
        return NULL;
    }
    Py_ssize_t cleared = 0;
    for (int gi = 0; gi < MM_NSEG; gi++) {
        mmseg *g = &m->seg[gi];
        size_t cap = g->slots ? g->mask + 1 : 0, emptied = 0;
        for (size_t i = 0; i < cap; i++) {
            mmslot *e = &g->slots[i];
            if (e->val == 0 || !mm_has(m, e->val, s)) {
                continue;
            }
            uint64_t nv = mm_flip(m, e->val, s, 0);
            if (nv == (uint64_t)-1) {
                return NULL;
            }
            mm_release(m, e->val);
            e->val = nv; /* 0 breaks probe chains: the segment is rebuilt below */
            cleared++;
            emptied += nv == 0;
        }
        if (emptied) {
            mmslot *old = g->slots;
            mmslot *ns = mm_alloc(cap);
            if (ns == NULL) {
                return PyErr_NoMemory();
            }
            g->slots = ns;
            for (size_t i = 0; i < cap; i++) {
                if (old[i].val) {
                    size_t j = (size_t)mix64(old[i].key) & g->mask;
                    while (ns[j].val) {
                        j = (j + 1) & g->mask;
                    }
                    ns[j] = old[i];
                }
            }
            mm_free(old, cap);
            g->used -= emptied;
            m->used -= (Py_ssize_t)emptied;
        }
    }
    if (m->other != NULL && PyDict_GET_SIZE(m->other)) {
        PyObject *keys = PyDict_Keys(m->other);
        if (keys == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
            int rc = mm_other_flip(m, PyList_GET_ITEM(keys, i), s, 0);
            if (rc < 0) {
                Py_DECREF(keys);
                return NULL;
            }
            cleared += rc;
        }
        Py_DECREF(keys);
    }
    return PyLong_FromSsize_t(cleared);
}

/* slot_keys(slot) -> list[int]: every key worker ``slot`` holds (table order). */
static PyObject *maskmap_slot_keys(MaskMap *m, PyObject *slot_o) {
    uint32_t s;
    if (slot_arg(slot_o, &s) < 0) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (int gi = 0; gi < MM_NSEG; gi++) {
        mmseg *g = &m->seg[gi];
        size_t cap = g->slots ? g->mask + 1 : 0;
        for (size_t i = 0; i < cap; i++) {
            mmslot *e = &g->slots[i];
            if (e->val && mm_has(m, e->val, s)) {
                PyObject *k = PyLong_FromUnsignedLongLong(e->key);
                if (k == NULL || PyList_Append(out, k) < 0) {
                    Py_XDECREF(k);
                    Py_DECREF(out);
                    return NULL;
                }
                Py_DECREF(k);
            }
        }
    }
    if (m->other != NULL) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        PyObject *b = bit_int(s);
        if (b == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        while (PyDict_Next(m->other, &pos, &k, &v)) {
            PyObject *both = PyNumber_And(v, b);
            int held = both ? PyObject_IsTrue(both) : -1;
            Py_XDECREF(both);
            if (held < 0 || (held && PyList_Append(out, k) < 0)) {
                Py_DECREF(b);
                Py_DECREF(out);
                return NULL;
            }
        }
        Py_DECREF(b);
    }
    return out;
}

/* walk(hashes, alive) -> {slot: prefix_len}: gpu_walk on this table. */
static PyObject *maskmap_walk(MaskMap *m, PyObject *args) {
    PyObject *hashes, *alive_obj, *ids = Py_None;
    if (!PyArg_ParseTuple(args, "OO|O", &hashes, &alive_obj, &ids)) {
        return NULL;
    }
    if (ids == Py_None) {
        ids = NULL;
    } else if (!PyList_Check(ids)) {
        PyErr_SetString(PyExc_TypeError, "walk: ids must be a list or None");
        return NULL;
    }
    uint64_t alive[MAX_WORDS];
    uint64_t w[MAX_WORDS];
    if (!PyLong_Check(alive_obj) || _PyLong_Sign(alive_obj) < 0) {
        PyErr_SetString(PyExc_ValueError, "alive must be a non-negative int");
        return NULL;
    }
    size_t abits = _PyLong_NumBits(alive_obj);
    int nwords = (int)((abits + 63) / 64);
    if (nwords > MAX_WORDS) {
        PyErr_SetString(PyExc_OverflowError, "mask wider than the index's worker slots");
        return NULL;
    }
    PyObject *out = PyDict_New();
    if (out == NULL || nwords == 0) {
        return out;
    }
    if (mask_words(alive_obj, alive, nwords) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(hashes, "hashes must be a sequence");
    if (seq == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int have_other = m->other != NULL && PyDict_GET_SIZE(m->other) > 0;
    for (Py_ssize_t i = 0; i < n && i < MM_PF; i++) {
        uint64_t k;
        if (as_u64(items[i], &k) == 1) {
            mm_prefetch(m, k, 0);
        }
    }
    uint64_t last = 0; /* the last mask word whose AND left alive unchanged */
    Py_ssize_t i = 0;
    for (; i < n; i++) {
        uint64_t k, val = 0;
        if (i + MM_PF < n && as_u64(items[i + MM_PF], &k) == 1) {
            mm_prefetch(m, k, 0);
        }
        int rk = as_u64(items[i], &k);
        if (rk < 0) {
            goto fail;
        }
        if (rk) {
            mmseg *g;
            mmslot *e = mm_find(m, k, &g);
            val = e ? e->val : 0;
        } else {
            PyObject *mo = have_other ? PyDict_GetItemWithError(m->other, items[i]) : NULL;
            if (mo == NULL && PyErr_Occurred()) {
                goto fail;
            }
            if (mo == NULL && !have_other && PyObject_Hash(items[i]) == -1 && PyErr_Occurred()) {
                goto fail; /* unhashable, as a dict lookup says */
            }
            if (mo != NULL) {
                if (mask_words(mo, w, nwords) < 0) {
                    goto fail;
                }
                val = (uint64_t)-1; /* not an encoding: never equal to ``last`` */
            }
        }
        if (val == 0) {
            /* no worker holds it: every alive worker stops here */
            if (i && record_bits(out, alive, nwords, i, ids) < 0) {
                goto fail;
            }
            memset(alive, 0, (size_t)nwords * 8);
            break;
        }
        if (val == last) {
            continue;
        }
        if (val != (uint64_t)-1) {
            mm_words_n(m, val, w, nwords);
        }
        uint64_t any = 0, changed = 0;
        for (int wi = 0; wi < nwords; wi++) {
            uint64_t nw = w[wi] & alive[wi];
            changed |= nw ^ alive[wi];
            w[wi] = alive[wi] ^ nw; /* dropped */
            alive[wi] = nw;
            any |= nw;
        }
        if (changed) {
            if (i && record_bits(out, w, nwords, i, ids) < 0) {
                goto fail;
            }
            last = 0;
            if (!any) {
                break;
            }
        } else {
            last = val == (uint64_t)-1 ? 0 : val; /* a mask from ``other``: never skipped */
        }
    }
    if (i == n && record_bits(out, alive, nwords, n, ids) < 0) {
        goto fail;
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_DECREF(seq);
    Py_DECREF(out);
    return NULL;
}

/* ---- MaskMap as a dict[int, int] (the Python paths: bounded stores, references) ---- */

static PyObject *maskmap_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (!_PyArg_NoKeywords("MaskMap", kwds) || !PyArg_ParseTuple(args, ":MaskMap")) {
        return NULL;
    }
    MaskMap *m = (MaskMap *)type->tp_alloc(type, 0); /* zeroed */
    return (PyObject *)m;
}

static int maskmap_traverse(MaskMap *m, visitproc visit, void *arg) {
    Py_VISIT(m->other);
    return 0;
}

static int maskmap_clear_refs(MaskMap *m) {
    Py_CLEAR(m->other);
    return 0;
}

static void maskmap_free_all(MaskMap *m) {
    for (uint32_t i = 0; i < m->npool; i++) {
        PyMem_Free(m->pool[i].w);
    }
    PyMem_Free(m->pool);
    PyMem_Free(m->freel);
    PyMem_Free(m->itab);
    for (int gi = 0; gi < MM_NSEG; gi++) {
        mm_free(m->seg[gi].slots, m->seg[gi].slots ? m->seg[gi].mask + 1 : 0);
    }
    memset(m->seg, 0, sizeof(m->seg));
    m->pool = NULL;
    m->freel = NULL;
    m->itab = NULL;
    m->npool = m->pool_cap = m->nfree = m->free_cap = m->iused = 0;
    m->imask = 0;
    m->used = 0;
}

static void maskmap_dealloc(MaskMap *m) {
    PyObject_GC_UnTrack(m);
    Py_CLEAR(m->other);
    maskmap_free_all(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t maskmap_len(MaskMap *m) {
    return m->used + (m->other ? PyDict_GET_SIZE(m->other) : 0);
}

/* The mask of ``k`` as a new int; NULL without an error when absent. */
static PyObject *maskmap_lookup(MaskMap *m, PyObject *k, mmslot **where) {
    uint64_t kk;
    int rk = as_u64(k, &kk);
    *where = NULL;
    if (rk < 0) {
        return NULL;
    }
    if (rk) {
        mmseg *g;
        mmslot *e = mm_find(m, kk, &g);
        if (e == NULL) {
            return NULL;
        }
        *where = e;
        return mm_to_int(m, e->val);
    }
    if (PyObject_Hash(k) == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (m->other == NULL) {
        return NULL;
    }
    PyObject *v = PyDict_GetItemWithError(m->other, k);
    Py_XINCREF(v);
    return v;
}

static PyObject *maskmap_getitem(MaskMap *m, PyObject *k) {
    mmslot *e;
    PyObject *v = maskmap_lookup(m, k, &e);
    if (v == NULL && !PyErr_Occurred()) {
        _PyErr_SetKeyError(k);
    }
    return v;
}

static int maskmap_ass(MaskMap *m, PyObject *k, PyObject *v) {
    uint64_t kk;
    int rk = as_u64(k, &kk);
    if (rk < 0) {
        return -1;
    }
    if (v == NULL) {
        if (rk) {
            mmseg *g;
            mmslot *e = mm_find(m, kk, &g);
            if (e == NULL) {
                _PyErr_SetKeyError(k);
                return -1;
            }
            mm_release(m, e->val);
            mm_erase(m, g, e);
            return 0;
        }
        if (m->other == NULL) {
            if (PyObject_Hash(k) != -1 || !PyErr_Occurred()) {
                _PyErr_SetKeyError(k);
            }
            return -1;
        }
        return PyDict_DelItem(m->other, k);
    }
    if (!rk) {
        if (!PyLong_Check(v) || _PyLong_Sign(v) <= 0) {
            PyErr_SetString(PyExc_ValueError, "a worker mask is a positive int");
            return -1;
        }
        return mm_other_dict(m) < 0 ? -1 : PyDict_SetItem(m->other, k, v);
    }
    uint64_t nv = mm_from_int(m, v);
    if (nv == (uint64_t)-1) {
        return -1;
    }
    mmseg *g;
    mmslot *e = mm_find(m, kk, &g);
    if (e != NULL) {
        mm_release(m, e->val);
        e->val = nv;
        return 0;
    }
    if (mm_insert(m, kk, nv) < 0) {
        mm_release(m, nv);
        return -1;
    }
    return 0;
}

static int maskmap_contains(MaskMap *m, PyObject *k) {
    mmslot *e;
    PyObject *v = maskmap_lookup(m, k, &e);
    if (v == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_DECREF(v);
    return 1;
}

static PyObject *maskmap_get(MaskMap *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    mmslot *e;
    PyObject *v = maskmap_lookup(m, args[0], &e);
    if (v == NULL && !PyErr_Occurred()) {
        v = nargs == 2 ? args[1] : Py_None;
        Py_INCREF(v);
    }
    return v;
}

static PyObject *maskmap_clear(MaskMap *m, PyObject *unused) {
    maskmap_free_all(m);
    Py_CLEAR(m->other);
    Py_RETURN_NONE;
}

/* kind 0: keys, 1: values, 2: items, as a new list (a snapshot). */
static PyObject *maskmap_list(MaskMap *m, int kind) {
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (int gi = 0; gi < MM_NSEG; gi++) {
        mmseg *g = &m->seg[gi];
        size_t cap = g->slots ? g->mask + 1 : 0;
        for (size_t i = 0; i < cap; i++) {
            mmslot *s = &g->slots[i];
            if (s->val == 0) {
                continue;
            }
            PyObject *k = kind != 1 ? PyLong_FromUnsignedLongLong(s->key) : NULL;
            PyObject *v = kind != 0 ? mm_to_int(m, s->val) : NULL;
            if (list_append_entry(out, kind, k, v) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
    }
    if (m->other != NULL && list_extend_other(out, m->other, kind) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *maskmap_keys(MaskMap *m, PyObject *unused) { return maskmap_list(m, 0); }
static PyObject *maskmap_values(MaskMap *m, PyObject *unused) { return maskmap_list(m, 1); }
static PyObject *maskmap_items(MaskMap *m, PyObject *unused) { return maskmap_list(m, 2); }

static PyObject *maskmap_iter(MaskMap *m) { return iter_of_list(maskmap_list(m, 0)); }

static PyObject *maskmap_wide_masks(MaskMap *m, PyObject *unused) {
    return PyLong_FromUnsignedLong(m->iused);
}

static PyMethodDef maskmap_methods[] = {
    {"store", (PyCFunction)maskmap_store, METH_VARARGS,
     "store(hashes, slot) -> int: blocks newly marked held by worker slot."},
    {"remove", (PyCFunction)maskmap_remove, METH_VARARGS,
     "remove(hashes, slot) -> int: blocks worker slot held and no longer does."},
    {"clear_slot", (PyCFunction)maskmap_clear_slot, METH_O,
     "clear_slot(slot) -> int: worker slot holds nothing; how many it held."},
    {"slot_keys", (PyCFunction)maskmap_slot_keys, METH_O,
     "slot_keys(slot) -> list[int]: the keys worker slot holds."},
    {"walk", (PyCFunction)maskmap_walk, METH_VARARGS,
     "walk(hashes, alive, ids=None) -> dict: slot (or ids[slot]) -> prefix length (gpu_walk)."},
    {"wide_masks", (PyCFunction)maskmap_wide_masks, METH_NOARGS,
     "wide_masks() -> int: distinct interned masks of two or more workers past slot 62."},
    {"get", (PyCFunction)(void (*)(void))maskmap_get, METH_FASTCALL, "get(key, default=None)"},
    {"clear", (PyCFunction)maskmap_clear, METH_NOARGS, "Remove every entry."},
    {"keys", (PyCFunction)maskmap_keys, METH_NOARGS, "The keys, as a list."},
    {"values", (PyCFunction)maskmap_values, METH_NOARGS, "The masks, as a list."},
    {"items", (PyCFunction)maskmap_items, METH_NOARGS, "The (key, mask) pairs, as a list."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods maskmap_as_mapping = {
    (lenfunc)maskmap_len, (binaryfunc)maskmap_getitem, (objobjargproc)maskmap_ass,
};

static PySequenceMethods maskmap_as_sequence = {
    .sq_contains = (objobjproc)maskmap_contains,
};

static PyTypeObject MaskMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dynamo_ext._native.MaskMap",
    .tp_basicsize = sizeof(MaskMap),
    .tp_dealloc = (destructor)maskmap_dealloc,
    .tp_as_sequence = &maskmap_as_sequence,
    .tp_as_mapping = &maskmap_as_mapping,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "MaskMap(): dict[int, int] of block hash -> worker mask in a flat table.",
    .tp_traverse = (traverseproc)maskmap_traverse,
    .tp_clear = (inquiry)maskmap_clear_refs,
    .tp_iter = (getiterfunc)maskmap_iter,
    .tp_methods = maskmap_methods,
    .tp_new = maskmap_new,
};

/* ---- tokens-mode BlockStored straight from its msgpack bytes ------------------------ */

/* hash() of a msgpack int, as CPython's long_hash gives it (x mod 2**61 - 1, sign kept,
 * -1 is -2). */
static inline uint64_t mod_mersenne61(uint64_t v) {
    /* v = hi * 2**61 + lo and 2**61 = 1 (mod 2**61 - 1): no division per token. */
    uint64_t r = (v & HASH_MODULUS) + (v >> 61);
    return r >= HASH_MODULUS ? r - HASH_MODULUS : r;
}
static inline uint64_t hash_u64(uint64_t v) { return mod_mersenne61(v); }
static inline uint64_t hash_i64(int64_t v) {
    if (v >= 0) {
        return mod_mersenne61((uint64_t)v);
    }
    uint64_t mag = (uint64_t)(-(v + 1)) + 1; /* |v| without overflow at INT64_MIN */
    int64_t h = -(int64_t)mod_mersenne61(mag);
    return (uint64_t)(h == -1 ? -2 : h);
}

static inline uint64_t be_read(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* One msgpack int at p (end: one past the buffer) into *h (its Python hash); returns the
 * bytes it took, 0 when the item is not an int, -1 when the buffer ends inside it. */
static inline int read_int_hash(const unsigned char *p, const unsigned char *end, uint64_t *h) {
    unsigned char t = *p;
    if (t <= 0x7f) {
        *h = t;
        return 1;
    }
    if (t >= 0xe0) {
        *h = hash_i64((int8_t)t);
        return 1;
    }
    int n;
    switch (t) {
    case 0xcc: case 0xd0: n = 1; break;
    case 0xcd: case 0xd1: n = 2; break;
    case 0xce: case 0xd2: n = 4; break;
    case 0xcf: case 0xd3: n = 8; break;
    default: return 0;
    }
    if (end - p < 1 + n) {
        return -1;
    }
    uint64_t v = be_read(p + 1, n);
    if (t >= 0xd0) { /* signed: sign-extend from n bytes */
        int shift = 64 - 8 * n;
        *h = hash_i64((int64_t)(v << shift) >> shift);
    } else {
        *h = hash_u64(v);
    }
    return 1 + n;
}

/* stored_tokens(raw, block_size, parent, hashes, xlat) -> list[int]: a tokens-mode
 * BlockStored's router hashes, from ``token_ids`` left undecoded (the msgpack bytes of an
 * array of ints, msgspec.Raw), the chain starting at ``parent``; ``xlat`` (engine hash ->
 * router hash) gains hashes[i] -> result[i]. Equal to router.ingest.stored_tokens_py:
 * ValueError, and xlat untouched, when the bytes are not one msgpack array of len(hashes)
 * * block_size ints. */
static PyObject *
native_stored_tokens(PyObject *self, PyObject *args) {
    PyObject *raw, *parent, *hashes, *xlat;
    Py_ssize_t bs;
    if (!PyArg_ParseTuple(args, "OnOOO", &raw, &bs, &parent, &hashes, &xlat)) {
        return NULL;
    }
    int is_map = PyObject_TypeCheck(xlat, &U64MapType);
    if (!is_map && !PyDict_Check(xlat)) {
        PyErr_SetString(PyExc_TypeError, "xlat must be a dict or a U64Map");
        return NULL;
    }
    if (bs <= 0) {
        PyErr_SetString(PyExc_ValueError, "block_size must be > 0");
        return NULL;
    }
    Py_hash_t ph = PyObject_Hash(parent);
    if (ph == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(hashes, "block hashes must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    PyObject *out = NULL;
    Py_ssize_t nblocks = PySequence_Fast_GET_SIZE(seq);
    const unsigned char *p = (const unsigned char *)view.buf;
    const unsigned char *end = p + view.len;
    uint64_t count;
    if (p == end) {
        PyErr_SetString(PyExc_ValueError, "token_ids missing");
        goto done;
    }
    if (*p >= 0x90 && *p <= 0x9f) {
        count = *p & 0x0f;
        p += 1;
    } else if (*p == 0xdc && end - p >= 3) {
        count = be_read(p + 1, 2);
        p += 3;
    } else if (*p == 0xdd && end - p >= 5) {
        count = be_read(p + 1, 4);
        p += 5;
    } else {
        PyErr_SetString(PyExc_ValueError, "token_ids is not an array");
        goto done;
    }
    if (count != (uint64_t)nblocks * (uint64_t)bs) {
        PyErr_Format(PyExc_ValueError, "%llu token ids for %zd blocks of %zd",
                     (unsigned long long)count, nblocks, bs);
        goto done;
    }
    out = PyList_New(nblocks);
    if (out == NULL) {
        goto done;
    }
    uint64_t prev_hash = (uint64_t)ph;
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        uint64_t acc = XXPRIME_5;
        for (Py_ssize_t i = 0; i < bs; i++) {
            uint64_t th;
            int took = p < end ? read_int_hash(p, end, &th) : -1;
            if (took <= 0) {
                PyErr_SetString(PyExc_ValueError, took == 0 ? "token id is not an int"
                                                            : "token_ids truncated");
                goto fail;
            }
            p += took;
            acc = lane(acc, th);
        }
        uint64_t h = chain_step(prev_hash, tuple_finish(acc, (uint64_t)bs));
        PyObject *v = PyLong_FromUnsignedLongLong(h);
        if (v == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(out, b, v);
        prev_hash = mod_mersenne61(h);
    }
    if (p != end) {
        PyErr_SetString(PyExc_ValueError, "trailing bytes after token_ids");
        goto fail;
    }
    /* Only a whole valid event reaches xlat; an unhashable engine hash is refused before
     * any of its blocks does. */
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        if (PyObject_Hash(items[b]) == -1 && PyErr_Occurred()) {
            goto fail;
        }
    }
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        PyObject *k = items[b], *v = PyList_GET_ITEM(out, b);
        int rc;
        if (!is_map) {
            rc = PyDict_SetItem(xlat, k, v);
        } else {
            uint64_t kk;
            U64Map *m = (U64Map *)xlat;
            int rk = as_u64(k, &kk);
            if (rk == 1 && (m->other == NULL || PyDict_GET_SIZE(m->other) == 0)) {
                /* the stream's case: no call, no object; the value is < 2**64 - 1 */
                rc = u64_put(m, kk, PyLong_AsUnsignedLongLongMask(v));
            } else {
                rc = rk < 0 ? -1 : u64map_set(m, k, v);
            }
        }
        if (rc < 0) {
            goto fail;
        }
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyBuffer_Release(&view);
    Py_DECREF(seq);
    return out;
}

/* ---- a whole live KVEventBatch of tokens-mode GPU BlockStored events ---------------- */

/* A cursor over msgpack bytes. The readers return 1 when the next item is of the asked
 * kind (and consume it), 0 otherwise (nothing consumed): the caller then gives the frame
 * back to the Python decoder, which is the reference for every frame this path declines. */
typedef struct {
    const unsigned char *p, *end;
} mpcur;

static int mp_nil(mpcur *c) {
    if (c->p < c->end && *c->p == 0xc0) {
        c->p++;
        return 1;
    }
    return 0;
}

static int mp_len(mpcur *c, unsigned char fix_lo, unsigned char fix_hi, unsigned char t16,
                  uint64_t *n) {
    if (c->p >= c->end) {
        return 0;
    }
    unsigned char t = *c->p;
    if (t >= fix_lo && t <= fix_hi) {
        *n = t & (fix_hi - fix_lo);
        c->p += 1;
    } else if (t == t16 && c->end - c->p >= 3) {
        *n = be_read(c->p + 1, 2);
        c->p += 3;
    } else if (t == t16 + 1 && c->end - c->p >= 5) {
        *n = be_read(c->p + 1, 4);
        c->p += 5;
    } else {
        return 0;
    }
    return 1;
}
#define mp_array(c, n) mp_len((c), 0x90, 0x9f, 0xdc, (n))
#define mp_map(c, n) mp_len((c), 0x80, 0x8f, 0xde, (n))

/* Any msgpack int (msgspec's int); *neg says whether it is below 0. */
static int mp_int(mpcur *c, uint64_t *v, int *neg) {
    if (c->p >= c->end) {
        return 0;
    }
    unsigned char t = *c->p;
    *neg = 0;
    if (t <= 0x7f) {
        *v = t;
        c->p += 1;
        return 1;
    }
    if (t >= 0xe0) {
        *v = (uint64_t)(int64_t)(int8_t)t;
        *neg = 1;
        c->p += 1;
        return 1;
    }
    int n;
    switch (t) {
    case 0xcc: case 0xd0: n = 1; break;
    case 0xcd: case 0xd1: n = 2; break;
    case 0xce: case 0xd2: n = 4; break;
    case 0xcf: case 0xd3: n = 8; break;
    default: return 0;
    }
    if (c->end - c->p < 1 + n) {
        return 0;
    }
    uint64_t x = be_read(c->p + 1, n);
    if (t >= 0xd0) {
        int shift = 64 - 8 * n;
        int64_t sx = (int64_t)(x << shift) >> shift;
        *neg = sx < 0;
        x = (uint64_t)sx;
    }
    *v = x;
    c->p += 1 + n;
    return 1;
}

/* A non-negative int below 2**64 (a vLLM int block hash). */
static int mp_u64(mpcur *c, uint64_t *v) {
    mpcur save = *c;
    int neg;
    if (!mp_int(c, v, &neg)) {
        return 0;
    }
    if (neg) {
        *c = save;
        return 0;
    }
    return 1;
}

/* A str whose bytes are all ASCII (so valid UTF-8 whatever msgspec checks). */
static int mp_ascii(mpcur *c, const unsigned char **s, uint64_t *len) {
    mpcur save = *c;
    uint64_t n;
    if (c->p >= c->end) {
        return 0;
    }
    unsigned char t = *c->p;
    if (t >= 0xa0 && t <= 0xbf) {
        n = t & 0x1f;
        c->p += 1;
    } else if (t == 0xd9 && c->end - c->p >= 2) {
        n = c->p[1];
        c->p += 2;
    } else if (t == 0xda && c->end - c->p >= 3) {
        n = be_read(c->p + 1, 2);
        c->p += 3;
    } else {
        return 0;
    }
    if ((uint64_t)(c->end - c->p) < n) {
        *c = save;
        return 0;
    }
    for (uint64_t i = 0; i < n; i++) {
        if (c->p[i] & 0x80) {
            *c = save;
            return 0;
        }
    }
    *s = c->p;
    *len = n;
    c->p += n;
    return 1;
}

/* Skip a value of a field StoredHashes ignores: nil, bool, int, float, ASCII str, or
 * arrays and str-keyed maps of those, a few levels deep. Anything else declines. */
static int mp_skip(mpcur *c, int depth) {
    if (c->p >= c->end || depth > 4) {
        return 0;
    }
    unsigned char t = *c->p;
    uint64_t n, v;
    int neg;
    const unsigned char *s;
    if (t == 0xc0 || t == 0xc2 || t == 0xc3) {
        c->p++;
        return 1;
    }
    if (t == 0xca || t == 0xcb) {
        int w = t == 0xca ? 5 : 9;
        if (c->end - c->p < w) {
            return 0;
        }
        c->p += w;
        return 1;
    }
    if (mp_int(c, &v, &neg) || mp_ascii(c, &s, &n)) {
        return 1;
    }
    mpcur save = *c;
    if (mp_array(c, &n)) {
        for (uint64_t i = 0; i < n; i++) {
            if (!mp_skip(c, depth + 1)) {
                *c = save;
                return 0;
            }
        }
        return 1;
    }
    if (mp_map(c, &n)) {
        for (uint64_t i = 0; i < n; i++) {
            if (!mp_ascii(c, &s, &v) || !mp_skip(c, depth + 1)) {
                *c = save;
                return 0;
            }
        }
        return 1;
    }
    return 0;
}

#define KEYIS(s, n, lit) ((n) == sizeof(lit) - 1 && memcmp((s), (lit), (n)) == 0)
#define FAST_EVENTS 64

#define FAST_BLOCKS 2048
static PyObject *str_GPU; /* the GPU tier's key in a stream's maps (interned) */
#define FAST_TOKENS 4096 /* token ids read ahead of hashing (ingest_stored's stack) */

/* The tuple hash of each of ``nb`` blocks of ``bs`` token hashes (``th``, block after
 * block) into ``out``: the lanes of token_block_hashes, four blocks at a time. */
static void hash_blocks(const uint64_t *th, uint64_t nb, uint64_t bs, uint64_t *out) {
    uint64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const uint64_t *t0 = th + b * bs, *t1 = t0 + bs, *t2 = t1 + bs, *t3 = t2 + bs;
        uint64_t a0 = XXPRIME_5, a1 = XXPRIME_5, a2 = XXPRIME_5, a3 = XXPRIME_5;
        for (uint64_t i = 0; i < bs; i++) {
            a0 = lane(a0, t0[i]);
            a1 = lane(a1, t1[i]);
            a2 = lane(a2, t2[i]);
            a3 = lane(a3, t3[i]);
        }
        out[b] = tuple_finish(a0, bs);
        out[b + 1] = tuple_finish(a1, bs);
        out[b + 2] = tuple_finish(a2, bs);
        out[b + 3] = tuple_finish(a3, bs);
    }
    for (; b < nb; b++) {
        const uint64_t *t0 = th + b * bs;
        uint64_t a0 = XXPRIME_5;
        for (uint64_t i = 0; i < bs; i++) {
            a0 = lane(a0, t0[i]);
        }
        out[b] = tuple_finish(a0, bs);
    }
}

typedef struct {
    uint64_t first;              /* its blocks' index in eng[] and inner[] */
    uint64_t nblocks;
    uint64_t parent;
    int has_parent;
} fast_event;

/* The router hash of an engine hash held by the stream's maps: GPU first, then every tier
 * in the order of ``tiers`` (``_store_tokens``' search). */
static u64slot *find_parent(U64Map *gpu, PyObject *tiers, uint64_t k) {
    u64slot *s = u64_find(gpu, k);
    if (s != NULL) {
        return s;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *val;
    while (PyDict_Next(tiers, &pos, &key, &val)) {
        s = u64_find((U64Map *)val, k);
        if (s != NULL) {
            return s;
        }
    }
    return NULL;
}

/* ingest_stored(payload, block_size, tiers[, table, slot]) -> (router_hashes, events,
 * orphans) | None.
 * One live tokens-mode KVEventBatch payload applied to the stream's engine hash -> router
 * hash maps (``tiers``: the stream's ``xlat``, a "GPU" U64Map among them) in one pass, as
 * ``KvIngest.decode`` + ``apply`` would: every event a BlockStored of int hashes, of this
 * block size, on the GPU tier, with ``len(hashes) * block_size`` int token ids. Returns the
 * router hashes to store (every event's, in order), how many events the batch held, and
 * how many were orphans (parent unknown: skipped, as ``_store_tokens`` does). None, with
 * nothing changed, for any payload outside that shape, valid or not: the caller decodes
 * it in Python, the reference for every frame declined here (and for what is malformed).
 * With ``table`` (the index's GPU MaskMap, from KvIndex.ingest_table) the router hashes
 * are stored there as held by worker ``slot`` instead, as KvIndex.store would, and the
 * first item is how many blocks were new to the worker (no int object per block).
 * Why: msgspec's decode built a Struct, two lists and an int object per block hash before
 * the maps saw any of it, and the map inserts are cache misses each, which this issues
 * together (prefetch) instead of one after the other. */
static PyObject *
native_ingest_stored(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer view;
    Py_ssize_t bs;
    PyObject *tiers, *table_o = NULL, *slot_o = NULL;
    MaskMap *table = NULL;
    uint32_t wslot = 0;
    /* fastcall, parsed by hand: this runs once per KV batch of the stream */
    if (nargs < 3 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "ingest_stored(payload, block_size, tiers[, table, slot])");
        return NULL;
    }
    bs = PyLong_AsSsize_t(args[1]);
    if (bs == -1 && PyErr_Occurred()) {
        return NULL;
    }
    tiers = args[2];
    if (!PyDict_Check(tiers)) {
        PyErr_SetString(PyExc_TypeError, "ingest_stored: tiers must be a dict");
        return NULL;
    }
    table_o = nargs > 3 ? args[3] : NULL;
    slot_o = nargs > 4 ? args[4] : NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (table_o != NULL && table_o != Py_None) {
        if (!PyObject_TypeCheck(table_o, &MaskMapType) || slot_o == NULL) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_TypeError, "ingest_stored: index tier must be a MaskMap, with a slot");
            return NULL;
        }
        if (slot_arg(slot_o, &wslot) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        table = (MaskMap *)table_o;
    }
    PyObject *out = NULL, *res = NULL;
    Py_ssize_t added = 0;
    fast_event evs[FAST_EVENTS];
    /* per block of the batch: the engine hash and the tuple hash of its tokens */
    uint64_t eng[FAST_BLOCKS], inner[FAST_BLOCKS], toks[FAST_TOKENS];
    uint64_t top, nev, v, total = 0;
    int neg;
    const unsigned char *s;
    mpcur c = {(const unsigned char *)view.buf, (const unsigned char *)view.buf + view.len};
    PyObject *gpu_obj = PyDict_GetItemWithError(tiers, str_GPU); /* borrowed */
    if (gpu_obj == NULL && PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (bs <= 0 || gpu_obj == NULL) {
        goto decline;
    }
    {
        Py_ssize_t pos = 0;
        PyObject *key, *val;
        while (PyDict_Next(tiers, &pos, &key, &val)) {
            /* a map holding a key of another type (``other``) is the Python path's */
            if (!PyObject_TypeCheck(val, &U64MapType) ||
                (((U64Map *)val)->other != NULL && PyDict_GET_SIZE(((U64Map *)val)->other))) {
                goto decline;
            }
        }
    }
    U64Map *gpu = (U64Map *)gpu_obj;
    /* ---- parse and check the whole batch; nothing changes before it passes ---- */
    if (!mp_array(&c, &top) || top < 2 || top > 3) { /* [ts, events(, dp_rank)] */
        goto decline;
    }
    if (c.p < c.end && (*c.p == 0xca || *c.p == 0xcb)) {
        int w = *c.p == 0xca ? 5 : 9;
        if (c.end - c.p < w) {
            goto decline;
        }
        c.p += w;
    } else if (!mp_int(&c, &v, &neg)) {
        goto decline;
    }
    if (!mp_array(&c, &nev) || nev > FAST_EVENTS) {
        goto decline;
    }
    for (uint64_t e = 0; e < nev; e++) {
        uint64_t nkeys, ntok = 0;
        fast_event *fe = &evs[e];
        int seen_type = 0, seen_hashes = 0, seen_parent = 0, seen_bs = 0, seen_tokens = 0;
        int seen_medium = 0, seen_locality = 0;
        if (!mp_map(&c, &nkeys)) {
            goto decline;
        }
        for (uint64_t k = 0; k < nkeys; k++) {
            uint64_t klen;
            if (!mp_ascii(&c, &s, &klen)) {
                goto decline;
            }
            if (KEYIS(s, klen, "type")) {
                const unsigned char *tv;
                uint64_t tl;
                if (seen_type++ || !mp_ascii(&c, &tv, &tl) || !KEYIS(tv, tl, "BlockStored")) {
                    goto decline;
                }
            } else if (KEYIS(s, klen, "block_hashes")) {
                if (seen_hashes++ || !mp_array(&c, &fe->nblocks)) {
                    goto decline;
                }
                if (fe->nblocks > FAST_BLOCKS - total) {
                    goto decline;
                }
                for (uint64_t i = 0; i < fe->nblocks; i++) {
                    if (!mp_u64(&c, &eng[total + i])) {
                        goto decline;
                    }
                }
            } else if (KEYIS(s, klen, "parent_block_hash")) {
                if (seen_parent++) {
                    goto decline;
                }
                fe->parent = 0;
                if (mp_nil(&c)) {
                    fe->has_parent = 0;
                } else if (mp_u64(&c, &fe->parent)) {
                    fe->has_parent = 1;
                } else {
                    goto decline;
                }
            } else if (KEYIS(s, klen, "block_size")) {
                if (seen_bs++ || !mp_int(&c, &v, &neg) || neg || v != (uint64_t)bs) {
                    goto decline;
                }
            } else if (KEYIS(s, klen, "token_ids")) {
                if (seen_tokens++ || !mp_array(&c, &ntok)) {
                    goto decline;
                }
                /* hashed as read: block_hashes comes first in what vLLM sends; a
                 * batch sending token_ids first, or another count, is declined */
                if (!seen_hashes || ntok != fe->nblocks * (uint64_t)bs) {
                    goto decline;
                }
                /* In chunks of whole blocks: the token ids' hashes read first, then the
                 * blocks hashed four at a time (each block's lanes are one serial chain
                 * of multiplies; four chains overlap) */
                uint64_t per = (uint64_t)(FAST_TOKENS / bs);
                if (per == 0) {
                    goto decline; /* blocks this long: the Python path's */
                }
                for (uint64_t b0 = 0; b0 < fe->nblocks; b0 += per) {
                    uint64_t nb = fe->nblocks - b0 < per ? fe->nblocks - b0 : per;
                    uint64_t nt = nb * (uint64_t)bs;
                    for (uint64_t t = 0; t < nt; t++) {
                        const unsigned char *q = c.p;
                        if (c.end - q >= 5 && *q == 0xce) { /* uint32: most token ids */
                            toks[t] = be_read(q + 1, 4);
                            c.p += 5;
                        } else {
                            int took = q < c.end ? read_int_hash(q, c.end, &toks[t]) : -1;
                            if (took <= 0) {
                                goto decline;
                            }
                            c.p += took;
                        }
                    }
                    hash_blocks(toks, nb, (uint64_t)bs, inner + total + b0);
                }
            } else if (KEYIS(s, klen, "medium")) {
                const unsigned char *mv;
                uint64_t ml;
                if (seen_medium++ ||
                    (!mp_nil(&c) && !(mp_ascii(&c, &mv, &ml) && KEYIS(mv, ml, "GPU")))) {
                    goto decline;
                }
            } else if (KEYIS(s, klen, "locality")) {
                if (seen_locality++ || !mp_nil(&c)) {
                    goto decline;
                }
            } else if (!mp_skip(&c, 0)) { /* a BlockStored field StoredHashes ignores */
                goto decline;
            }
        }
        if (!seen_type || !seen_hashes || !seen_parent || !seen_bs || !seen_tokens ||
            ntok != fe->nblocks * (uint64_t)bs) {
            goto decline;
        }
        fe->first = total;
        total += fe->nblocks;
    }
    if (top == 3 && !mp_nil(&c) && !mp_int(&c, &v, &neg)) {
        goto decline;
    }
    if (c.p != c.end) {
        goto decline;
    }
    /* ---- apply: chain, map, then store into the index tier (or collect) ---- */
    if (table == NULL) {
        out = PyList_New((Py_ssize_t)total);
        if (out == NULL) {
            goto error;
        }
    }
    Py_ssize_t filled = 0, orphans = 0;
    for (uint64_t e = 0; e < nev; e++) {
        fast_event *fe = &evs[e];
        uint64_t nb = fe->nblocks, prev = 0;
        if (fe->has_parent) {
            u64slot *ps = find_parent(gpu, tiers, fe->parent);
            if (ps == NULL) {
                orphans++;
                continue;
            }
            prev = mod_mersenne61(ps->val); /* hash() of the parent's router hash */
        }
        uint64_t *eh = eng + fe->first, *rh = inner + fe->first;
        for (uint64_t b = 0; b < nb; b++) {
            u64_prefetch(gpu, eh[b]);
        }
        for (uint64_t b = 0; b < nb; b++) {
            uint64_t h = chain_step(prev, rh[b]);
            rh[b] = h;
            prev = mod_mersenne61(h);
            if (table != NULL) {
                mm_prefetch(table, h, 1);
            }
        }
        if (table != NULL) {
            /* KvIndex.store of these router hashes, without an int object for any; the
             * map inserts first, while the table's lines arrive */
            for (uint64_t b = 0; b < nb; b++) {
                if (u64_put(gpu, eh[b], rh[b]) < 0) {
                    goto error;
                }
            }
            for (uint64_t b = 0; b < nb; b++) {
                int rc = mm_set_bit(table, rh[b], wslot);
                if (rc < 0) {
                    goto error;
                }
                added += rc;
            }
            filled += (Py_ssize_t)nb;
            continue;
        }
        for (uint64_t b = 0; b < nb; b++) {
            PyObject *o = PyLong_FromUnsignedLongLong(rh[b]);
            if (o == NULL || u64_put(gpu, eh[b], rh[b]) < 0) {
                Py_XDECREF(o);
                goto error;
            }
            PyList_SET_ITEM(out, filled++, o);
        }
    }
    if (table != NULL) {
        res = PyTuple_New(3);
        if (res != NULL) {
            PyObject *a = PyLong_FromSsize_t(added), *b = PyLong_FromSsize_t((Py_ssize_t)nev),
                     *o = PyLong_FromSsize_t(orphans);
            if (a == NULL || b == NULL || o == NULL) {
                Py_XDECREF(a);
                Py_XDECREF(b);
                Py_XDECREF(o);
                Py_CLEAR(res);
            } else {
                PyTuple_SET_ITEM(res, 0, a);
                PyTuple_SET_ITEM(res, 1, b);
                PyTuple_SET_ITEM(res, 2, o);
            }
        }
        goto error; /* not one: the common exit */
    }
    if (filled != (Py_ssize_t)total) {
        PyObject *cut = PyList_GetSlice(out, 0, filled);
        if (cut == NULL) {
            goto error;
        }
        Py_SETREF(out, cut);
    }
    res = Py_BuildValue("(Nnn)", out, (Py_ssize_t)nev, orphans);
    out = NULL;
error: /* and the exit of every call that changed something */
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return res;
decline:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}


/* ------------------------------------------------------------------ kv_pick
 * kv_pick(gpu, pos, base, order, ow, ow_n, hashes, holders, cands) -> (lo, ties) | None.
 * The cost loop of router.scorer.Scorer._kv_pick for a fleet with no full cache and no
 * offload hit (the caller's condition): the same float operations in the same order.
 * ``gpu``: worker id -> GPU prefix blocks; ``pos``: worker id -> candidate index; ``base``:
 * the candidates' base costs (floats); ``order``: (base, index) ascending; ``ow``/``ow_n``:
 * the overlap weight and it times the prompt's blocks; ``hashes``: the prompt's block
 * hashes or None (no in-flight credit); ``holders``: the workers running a request that
 * starts with hashes[0] (a dict, or None); ``cands``: the candidates (``.load.block_refs``).
 * Returns the lowest cost and the candidates at it (those with a cost of their own first,
 * then the rest in ``order``); the caller breaks ties. None for anything it does not take
 * as the reference does (a NaN, a value of another type): the caller runs the reference. */
#define PICK_MAX 4096
static PyObject *str_load, *str_block_refs;

/* Candidate j gets a cost of its own, starting at base[j] + ow_n (the reference's
 * ``base[j] + ow_n if c is None``); 0 when base[j] is not a float (the caller declines). */
static int pick_own(PyObject *base, Py_ssize_t j, double ow_n, double *own, unsigned char *has,
                    Py_ssize_t *touched, Py_ssize_t *nt) {
    PyObject *b = PyList_GET_ITEM(base, j);
    if (!PyFloat_CheckExact(b)) {
        return 0;
    }
    own[j] = PyFloat_AS_DOUBLE(b) + ow_n;
    has[j] = 1;
    touched[(*nt)++] = j;
    return 1;
}

static int pick_index(PyObject *pos, PyObject *wid, Py_ssize_t n, Py_ssize_t *out) {
    PyObject *jo = PyDict_GetItemWithError(pos, wid);
    if (jo == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_ssize_t j = PyLong_AsSsize_t(jo);
    if (j == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (j < 0 || j >= n) {
        return 2; /* not an index of base: decline */
    }
    *out = j;
    return 1;
}

static PyObject *
native_kv_pick(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "kv_pick takes 9 arguments");
        return NULL;
    }
    PyObject *gpu = args[0], *pos = args[1], *base = args[2], *order = args[3];
    PyObject *hashes = args[6], *holders = args[7], *cands = args[8];
    if (!PyDict_Check(gpu) || !PyDict_Check(pos) || !PyList_Check(base) ||
        !PyList_Check(order) || !PyList_Check(cands) ||
        (hashes != Py_None && !PyList_Check(hashes)) ||
        (holders != Py_None && !PyDict_Check(holders))) {
        Py_RETURN_NONE;
    }
    double ow = PyFloat_AsDouble(args[4]);
    if (ow == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    double ow_n = PyFloat_AsDouble(args[5]);
    if (ow_n == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t nc = PyList_GET_SIZE(base);
    if (nc > PICK_MAX || PyList_GET_SIZE(cands) != nc || isnan(ow) || isnan(ow_n)) {
        Py_RETURN_NONE;
    }
    double own[PICK_MAX];
    unsigned char has[PICK_MAX];
    Py_ssize_t touched[PICK_MAX]; /* indices with a cost of their own, in insertion order */
    Py_ssize_t nt = 0;
    memset(has, 0, (size_t)nc);
    Py_ssize_t it = 0;
    PyObject *wid, *gv;
    /* own[j] = (base[j] + ow_n if new else own[j]) - ow * g, for each GPU hit */
    while (PyDict_Next(gpu, &it, &wid, &gv)) {
        Py_ssize_t j;
        int r = pick_index(pos, wid, nc, &j);
        if (r < 0) {
            return NULL;
        }
        if (r == 2) {
            Py_RETURN_NONE;
        }
        if (r == 0) {
            continue;
        }
        long g = PyLong_AsLong(gv);
        if (g == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (!has[j] && !pick_own(base, j, ow_n, own, has, touched, &nt)) {
            Py_RETURN_NONE;
        }
        own[j] = own[j] - ow * (double)g;
    }
    Py_ssize_t nh = hashes == Py_None ? 0 : PyList_GET_SIZE(hashes);
    if (nh > 0) {
        /* probe: the GPU hits, then the holders of the first block not among them */
        for (int pass = 0; pass < 2; pass++) {
            PyObject *src = pass == 0 ? gpu : holders;
            if (src == Py_None) {
                continue;
            }
            it = 0;
            PyObject *v;
            while (PyDict_Next(src, &it, &wid, &v)) {
                if (pass == 1) {
                    int in = PyDict_Contains(gpu, wid);
                    if (in < 0) {
                        return NULL;
                    }
                    if (in) {
                        continue; /* visited in the first pass */
                    }
                }
                Py_ssize_t j;
                int r = pick_index(pos, wid, nc, &j);
                if (r < 0) {
                    return NULL;
                }
                if (r == 2) {
                    Py_RETURN_NONE;
                }
                if (r == 0) {
                    continue;
                }
                PyObject *load = PyObject_GetAttr(PyList_GET_ITEM(cands, j), str_load);
                if (load == NULL) {
                    return NULL;
                }
                PyObject *refs = PyObject_GetAttr(load, str_block_refs);
                Py_DECREF(load);
                if (refs == NULL) {
                    return NULL;
                }
                /* a dict, or the U64Map that ActiveSequences keeps where this module runs */
                int is_map = PyObject_TypeCheck(refs, &U64MapType);
                if (!is_map && !PyDict_Check(refs)) {
                    Py_DECREF(refs);
                    Py_RETURN_NONE;
                }
                if ((is_map ? u64map_len((U64Map *)refs) : PyDict_GET_SIZE(refs)) == 0) {
                    Py_DECREF(refs);
                    continue;
                }
                long g = 0;
                PyObject *go = PyDict_GetItemWithError(gpu, wid);
                if (go != NULL) {
                    g = PyLong_AsLong(go);
                    if (g == -1 && PyErr_Occurred()) {
                        Py_DECREF(refs);
                        return NULL;
                    }
                } else if (PyErr_Occurred()) {
                    Py_DECREF(refs);
                    return NULL;
                }
                if (g < 0) {
                    Py_DECREF(refs);
                    Py_RETURN_NONE;
                }
                Py_ssize_t k = (Py_ssize_t)g;
                if (is_map) {
                    u64batch kb;
                    if (u64_batch_open(&kb, hashes, "hashes must be a sequence") < 0) {
                        Py_DECREF(refs);
                        return NULL;
                    }
                    k = u64map_scan((U64Map *)refs, &kb, k, nh, 0);
                    Py_DECREF(kb.fast);
                    if (k < 0) {
                        Py_DECREF(refs);
                        return NULL;
                    }
                }
                while (!is_map && k < nh) {
                    int in = PyDict_Contains(refs, PyList_GET_ITEM(hashes, k));
                    if (in < 0) {
                        Py_DECREF(refs);
                        return NULL;
                    }
                    if (!in) {
                        break;
                    }
                    k++;
                }
                Py_DECREF(refs);
                if (k > g) {
                    if (!has[j] && !pick_own(base, j, ow_n, own, has, touched, &nt)) {
                        Py_RETURN_NONE;
                    }
                    own[j] = own[j] - ow * (double)(k - g);
                }
            }
        }
    }
    double lo = INFINITY;
    for (Py_ssize_t t = 0; t < nt; t++) {
        double c = own[touched[t]];
        if (isnan(c)) {
            Py_RETURN_NONE;
        }
        if (c < lo) {
            lo = c;
        }
    }
    PyObject *ties = PyList_New(0);
    if (ties == NULL) {
        return NULL;
    }
    for (Py_ssize_t t = 0; t < nt; t++) {
        if (own[touched[t]] == lo) {
            PyObject *jo = PyLong_FromSsize_t(touched[t]);
            if (jo == NULL || PyList_Append(ties, jo) < 0) {
                Py_XDECREF(jo);
                Py_DECREF(ties);
                return NULL;
            }
            Py_DECREF(jo);
        }
    }
    Py_ssize_t no = PyList_GET_SIZE(order);
    for (Py_ssize_t q = 0; q < no; q++) {
        PyObject *pair = PyList_GET_ITEM(order, q);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyFloat_CheckExact(PyTuple_GET_ITEM(pair, 0))) {
            Py_DECREF(ties);
            Py_RETURN_NONE;
        }
        Py_ssize_t j = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1));
        if (j == -1 && PyErr_Occurred()) {
            Py_DECREF(ties);
            return NULL;
        }
        if (j < 0 || j >= nc) {
            Py_DECREF(ties);
            Py_RETURN_NONE;
        }
        if (has[j]) {
            continue;
        }
        double b = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(pair, 0));
        double x = b + ow_n;
        if (isnan(x)) {
            Py_DECREF(ties);
            Py_RETURN_NONE;
        }
        if (x > lo) {
            break;
        }
        if (x < lo) {
            lo = x;
            /* rest = [j]: the ties of own (all above x now) and the rest so far go */
            if (PyList_SetSlice(ties, 0, PyList_GET_SIZE(ties), NULL) < 0) {
                Py_DECREF(ties);
                return NULL;
            }
        }
        PyObject *jo = PyTuple_GET_ITEM(pair, 1);
        if (PyList_Append(ties, jo) < 0) {
            Py_DECREF(ties);
            return NULL;
        }
    }
    PyObject *lo_o = PyFloat_FromDouble(lo);
    if (lo_o == NULL) {
        Py_DECREF(ties);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(2, lo_o, ties);
    Py_DECREF(lo_o);
    Py_DECREF(ties);
    return out;
}

static PyMethodDef methods[] = {
    {"store_blocks", native_store_blocks, METH_VARARGS,
     "store_blocks(tier, hashes, bit) -> int: blocks newly marked held by the worker of bit."},
    {"kv_pick", (PyCFunction)(void (*)(void))native_kv_pick, METH_FASTCALL,
     "kv_pick(gpu, pos, base, order, ow, ow_n, hashes, holders, cands) -> (lo, ties) | None: "
     "router.scorer.Scorer._kv_pick's cost loop, for no full cache and no offload hit"},
    {"token_block_hashes", native_token_block_hashes, METH_VARARGS,
     "token_block_hashes(tokens, block_size, parent=0) -> list[int]: the tokens-mode "
     "chain of dynamo_ext.hashing, from a uint32 buffer or a sequence of ints."},
    {"gpu_walk", native_gpu_walk, METH_VARARGS,
     "gpu_walk(tier, hashes, alive) -> dict[int, int]: slot -> GPU prefix length."},
    {"ingest_stored", (PyCFunction)(void (*)(void))native_ingest_stored, METH_FASTCALL,
     "ingest_stored(payload, block_size, tiers, table=None, slot=0) -> (router_hashes, "
     "events, orphans) | None: a live tokens-mode batch of GPU BlockStored events applied "
     "to the stream's maps; with an index tier (MaskMap) its blocks are stored there as "
     "held by worker slot and the first item is how many were new. None (nothing changed) "
     "for any other payload."},
    {"stored_tokens", native_stored_tokens, METH_VARARGS,
     "stored_tokens(raw, block_size, parent, hashes, xlat) -> list[int]: a tokens-mode "
     "BlockStored's router hashes from its undecoded token_ids; xlat gains hash -> ours."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dynamo_ext._native", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&U64MapType) < 0 || PyType_Ready(&MaskMapType) < 0) {
        return NULL;
    }
    str_load = PyUnicode_InternFromString("load");
    str_block_refs = PyUnicode_InternFromString("block_refs");
    if (str_load == NULL || str_block_refs == NULL) {
        return NULL;
    }
    str_GPU = PyUnicode_InternFromString("GPU");
    if (str_GPU == NULL) {
        return NULL;
    }
    /* U64Map's probe seed: per process, so a publisher cannot aim hashes at one slot. */
    u64map_seed = ((uint64_t)(uintptr_t)&u64map_seed * XXPRIME_1) ^
                  (uint64_t)_Py_HashSecret.siphash.k0 ^ (uint64_t)_Py_HashSecret.siphash.k1;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) {
        return NULL;
    }
    Py_INCREF(&U64MapType);
    if (PyModule_AddObject(mod, "U64Map", (PyObject *)&U64MapType) < 0) {
        Py_DECREF(&U64MapType);
        Py_DECREF(mod);
        return NULL;
    }
    Py_INCREF(&MaskMapType);
    if (PyModule_AddObject(mod, "MaskMap", (PyObject *)&MaskMapType) < 0) {
        Py_DECREF(&MaskMapType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
