# cython: language_level=3
"""Compiled core of patronus: ABI constants, checksum and prefix helpers,
and (csrc/) the packet parser, classifier and flow table.

Private: use patronus.abi, patronus.policy and patronus.dataplane.

The C declarations are in patronus/includes/: one .pxd per header of csrc/
(patronus_abi.h is abi.pxd) and consts.pxi for this module's own constants.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

from patronus.includes.abi cimport (
    PN_ABI_VERSION, PN_CHUNK_WORDS, PN_NO_PATH, PN_NREASONS, PN_PORTS, pn_bucket, pn_flow, pn_parsed,
    pn_policy_counter, pn_rule, pn_site_prefix, pn_xslot,
)
from patronus.includes.abi_layout cimport pn_abi_constants, pn_abi_layout
from patronus.includes.capture cimport (
    PN_CAP_END, PN_CAP_FORMAT_PCAPNG, PN_CAP_OK, pn_capture, pn_capture_format, pn_capture_open, pn_capture_strerror,
)
from patronus.includes.capture_run cimport pn_caprun_result, pn_capture_run
from patronus.includes.classify cimport (
    PN_F_DSCP, PN_F_PROTO, PN_F_SPORT, PN_NFIELDS, pn_classifier, pn_classifier_build, pn_classifier_free,
    pn_classify, pn_classify_linear, pn_field, pn_field_starts,
)
from patronus.includes.flowtable cimport (
    pn_cache, pn_cache_free, pn_cache_init, pn_cache_run, pn_dp, pn_dp_run, pn_ft_expire_idle, pn_ft_flush, pn_ft_free, pn_ft_init,
    pn_ft_snapshot,
)
from patronus.includes.ipfix cimport PN_IPFIX_HEAD, PN_IPFIX_REC_V4, PN_IPFIX_REC_V6, pn_ipfix_encode, pn_ipfix_send
from patronus.includes.parse cimport pn_parse
from patronus.includes.score cimport pn_score_select, pn_select_changes
from patronus.includes.sites cimport pn_site_of, pn_sites, pn_sites_build, pn_sites_free
from patronus.includes.util cimport pn_inet_checksum, pn_prefix_contains
from patronus.includes.xdptable cimport pn_xdp_count, pn_xdp_fold, pn_xdp_passed, pn_xdp_sums, pn_xdp_take

import numpy as np

include "includes/consts.pxi"

ABI_VERSION = PN_ABI_VERSION
NREASONS = PN_NREASONS
# classify modes of Classifier.classify_list / classify_buffer
MODE_CACHE, MODE_BITVEC, MODE_LINEAR = CLASSIFY_CACHE, CLASSIFY_BITVEC, CLASSIFY_LINEAR


def abi_constants():
    """{name: value} of every integer constant of patronus_abi.h Python reads
    (names without the PN_ prefix)."""
    out = {}
    cdef int i = 0
    while pn_abi_constants[i].name != NULL:
        out[pn_abi_constants[i].name.decode()[3:]] = int(pn_abi_constants[i].value)
        i += 1
    return out


def abi_layout():
    """{struct: {"size": n, field: (offset, size), ...}} as compiled from patronus_abi.h."""
    out = {}
    cdef int i = 0
    while pn_abi_layout[i].type != NULL:
        e = pn_abi_layout[i]
        t = e.type.decode()
        d = out.setdefault(t, {})
        if e.field == NULL:
            d["size"] = e.size
        else:
            d[e.field.decode()] = (e.offset, e.size)
        i += 1
    return out


def inet_checksum(const uint8_t[::1] data not None):
    """RFC 1071 Internet checksum of a bytes-like object."""
    if data.shape[0] == 0:
        return 0xFFFF
    return pn_inet_checksum(&data[0], data.shape[0])


def prefix_contains(const uint8_t[::1] net not None, unsigned plen, const uint8_t[::1] addr not None):
    """True when packed address `addr` lies in packed network `net`/`plen` (same family)."""
    if net.shape[0] != addr.shape[0] or net.shape[0] not in (4, 16):
        raise ValueError("net and addr must both be 4 or both be 16 bytes")
    return bool(pn_prefix_contains(&net[0], plen, &addr[0], addr.shape[0]))


cdef inline int frame_ptr(object f, const uint8_t **p, Py_ssize_t *n) except -1:
    """Pointer and length of one frame: bytes directly, anything else by buffer."""
    cdef const uint8_t[::1] mv
    if PyBytes_CheckExact(f):
        p[0] = <const uint8_t *>PyBytes_AS_STRING(f)
        n[0] = PyBytes_GET_SIZE(f)
        return 0
    mv = f
    n[0] = mv.shape[0]
    p[0] = &mv[0] if n[0] else <const uint8_t *>b""
    return 0


cdef const uint8_t *frames_base(const uint8_t[::1] buf, const int64_t[::1] offsets) except NULL:
    """Check that frames buf[offsets[i]:offsets[i+1]] lie in buf; return buf's start."""
    cdef Py_ssize_t i, n = offsets.shape[0] - 1
    if n > 0 and (offsets[0] < 0 or offsets[n] > buf.shape[0]):
        raise ValueError("offsets outside the buffer")
    for i in range(n):
        if offsets[i + 1] < offsets[i]:
            raise ValueError("offsets must not decrease")
    return &buf[0] if buf.shape[0] else <const uint8_t *>""


cdef inline void slice_frames(const uint8_t *base, const int64_t *offsets, Py_ssize_t m,
                              const uint8_t **ptrs, size_t *lens) noexcept nogil:
    """Pointers and lengths of frames base[offsets[j]:offsets[j+1]], j < m."""
    cdef Py_ssize_t j
    for j in range(m):
        ptrs[j] = base + offsets[j]
        lens[j] = offsets[j + 1] - offsets[j]


cdef int list_frames(list frames, Py_ssize_t start, Py_ssize_t m, const uint8_t **ptrs, size_t *lens) except -1:
    """Pointers and lengths of frames[start:start + m]."""
    cdef Py_ssize_t j, ln
    for j in range(m):
        frame_ptr(frames[start + j], &ptrs[j], &ln)
        lens[j] = ln
    return 0


IPFIX_RECORD_SIZES = (PN_IPFIX_REC_V4, PN_IPFIX_REC_V6)   # bytes of a data record: templates 256 and 257


def ipfix_export(int fd, const uint8_t[::1] flows not None, int family, reasons, int reason, int64_t offset_ns,
                 int template_id, uint32_t export_time, uint32_t seq0, uint32_t domain, Py_ssize_t per):
    """Encode the ``family`` rows of ``flows`` (``abi.FLOW_DTYPE`` bytes) as
    IPFIX data messages of at most ``per`` records (csrc/ipfix.c) and send
    them on the connected socket ``fd`` (sendmmsg). ``reasons``: a uint8
    array, one code per row, or None for ``reason``. Returns (records,
    messages, messages sent, errors, last errno)."""
    cdef size_t n = flows.shape[0] // sizeof(pn_flow)
    if n * sizeof(pn_flow) != <size_t>flows.shape[0]:
        raise ValueError("flows is not a whole number of flow records")
    if per < 1:
        raise ValueError("per must be at least 1")
    cdef const uint8_t[::1] why
    cdef const uint8_t *why_p = NULL
    if reasons is not None:
        why = reasons
        if <size_t>why.shape[0] != n:
            raise ValueError("reasons is not one code per flow")
        if n:
            why_p = &why[0]
    cdef size_t rsize = PN_IPFIX_REC_V4 if family == 4 else PN_IPFIX_REC_V6
    cdef size_t cap_msgs = (n + <size_t>per - 1) // <size_t>per
    if n == 0:
        return 0, 0, 0, 0, 0
    cdef uint8_t *out = <uint8_t *>malloc(cap_msgs * (PN_IPFIX_HEAD + <size_t>per * rsize))
    cdef uint32_t *lens = <uint32_t *>malloc(cap_msgs * sizeof(uint32_t))
    cdef size_t records = 0, msgs = 0, sent = 0, errors = 0
    cdef int last_errno = 0
    if out == NULL or lens == NULL:
        free(out)
        free(lens)
        raise MemoryError()
    try:
        with nogil:
            msgs = pn_ipfix_encode(out, lens, <const pn_flow *>&flows[0], n, family, why_p, <uint8_t>reason,
                                   offset_ns, <uint16_t>template_id, export_time, seq0, domain, <size_t>per,
                                   &records)
            sent = pn_ipfix_send(fd, out, lens, msgs, &errors, &last_errno)
    finally:
        free(out)
        free(lens)
    return records, msgs, sent, errors, last_errno


def xdp_take(uint8_t[::1] table not None, uint8_t[::1] out not None, int mode, uint64_t now_ns=0,
             uint64_t idle_ns=0):
    """Copy (mode PN_TAKE_COPY) or take (PN_TAKE_ALL, PN_TAKE_IDLE: those idle
    since now_ns - idle_ns) live flows of the mapped XDP flow table
    (pn_bucket) into out (bytes of pn_flow records); returns the count."""
    cdef size_t n
    if table.shape[0] % sizeof(pn_bucket) or out.shape[0] % sizeof(pn_flow):
        raise ValueError("buffers must hold whole buckets and flow records")
    with nogil:
        n = pn_xdp_take(<pn_bucket *>&table[0], table.shape[0] // sizeof(pn_bucket), <pn_flow *>&out[0],
                        out.shape[0] // sizeof(pn_flow), mode, now_ns, idle_ns)
    return n


def xdp_count(uint8_t[::1] table not None):
    """Live flows in the mapped XDP flow table."""
    cdef size_t n
    with nogil:
        n = pn_xdp_count(<const pn_bucket *>&table[0], table.shape[0] // sizeof(pn_bucket))
    return n


def xdp_sums(uint8_t[::1] table not None, uint64_t[:, ::1] sums not None):
    """Add each live flow's (packets, bytes) of the mapped XDP flow table to
    row policy + 1 of sums; returns the number of live flows."""
    cdef size_t n
    if sums.shape[1] != 2:
        raise ValueError("sums must be (policies + 1, 2)")
    with nogil:
        n = pn_xdp_sums(<const pn_bucket *>&table[0], table.shape[0] // sizeof(pn_bucket), &sums[0, 0],
                        sums.shape[0])
    return n


def xdp_passed(uint8_t[::1] table not None):
    """Sum of the buckets' passed counts in the mapped XDP flow table."""
    return pn_xdp_passed(<const pn_bucket *>&table[0], table.shape[0] // sizeof(pn_bucket))


def xdp_fold(const uint8_t[::1] slots not None, uint8_t[::1] out not None):
    """Slots the program copied out (pn_xslot bytes) as pn_flow records in out."""
    cdef size_t n = slots.shape[0] // sizeof(pn_xslot)
    if slots.shape[0] % sizeof(pn_xslot) or <size_t>out.shape[0] != n * sizeof(pn_flow):
        raise ValueError("slots must be whole pn_xslot records and out room for as many flows")
    if n:
        with nogil:
            pn_xdp_fold(<const pn_xslot *>&slots[0], n, <pn_flow *>&out[0])
    return n


def score_select(const double[::1] rtt not None, const double[::1] jit not None, const double[::1] loss not None,
                 const uint8_t[::1] alive not None, bw, const float[:, ::1] wmat not None,
                 const float[:, ::1] lim not None, const float[:, ::1] wn not None,
                 const int64_t[::1] gstart not None, const int64_t[::1] members not None,
                 float[:, ::1] scores not None, int64_t[:, ::1] best not None):
    """Scores [profile, path] and the best path per [profile, group] (csrc/score.c)."""
    cdef Py_ssize_t n = rtt.shape[0], nc = wmat.shape[0], ng = gstart.shape[0] - 1
    cdef const double[::1] bwv
    cdef const double *bwp = NULL
    if not (jit.shape[0] == loss.shape[0] == alive.shape[0] == n == members.shape[0] == scores.shape[1]):
        raise ValueError("per-path arrays differ in length")
    if not (wmat.shape[1] == 4 and lim.shape[0] == wn.shape[0] == nc == scores.shape[0] == best.shape[0]
            and lim.shape[1] == wn.shape[1] == 3 and best.shape[1] == ng):
        raise ValueError("profile arrays disagree")
    if bw is not None:
        bwv = bw
        if bwv.shape[0] != n:
            raise ValueError("bandwidth array differs in length")
        bwp = &bwv[0] if n else NULL
    if n == 0:
        return
    with nogil:
        pn_score_select(n, nc, &rtt[0], &jit[0], &loss[0], &alive[0], bwp, &wmat[0, 0], &lim[0, 0], &wn[0, 0],
                        ng, &gstart[0], &members[0], &scores[0, 0], &best[0, 0] if ng else NULL)


def select_changes(const float[:, ::1] scores not None, const int64_t[:, ::1] best not None,
                   const int64_t[:, ::1] cur not None, const double[:, ::1] since not None, double margin,
                   double hold_s, double now, uint8_t[:, ::1] change not None, uint8_t[:, ::1] forced not None):
    """The selector's move rule for every [profile, group] (csrc/score.c)."""
    cdef Py_ssize_t nc = best.shape[0], ng = best.shape[1]
    if not (cur.shape[0] == since.shape[0] == change.shape[0] == forced.shape[0] == scores.shape[0] == nc
            and cur.shape[1] == since.shape[1] == change.shape[1] == forced.shape[1] == ng):
        raise ValueError("selection arrays disagree")
    if nc == 0 or ng == 0:
        return
    with nogil:
        pn_select_changes(scores.shape[1], nc, ng, &scores[0, 0], &best[0, 0], &cur[0, 0], &since[0, 0], margin,
                          hold_s, now, &change[0, 0], &forced[0, 0])


cdef class Classifier:
    """Compiled rule table (bit vectors) plus a set-associative classification cache."""
    cdef pn_classifier c
    cdef pn_cache cache
    cdef object rules
    cdef const uint8_t[::1] rule_bytes
    cdef uint64_t _malformed[PN_NREASONS]

    def __cinit__(self, rules not None, cache_size=1 << 17):
        # private API, but a bad argument must be an error, not a crash: the
        # cache is PN_CACHE_WAYS-way set associative over cache_size entries
        # (>= 2, a power of two), and the rules are read as struct pn_rule
        from .abi import RULE_DTYPE

        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or not 2 <= cache_size <= 1 << 31 \
                or cache_size & (cache_size - 1):
            raise ValueError(f"cache_size {cache_size!r} is not a power of two in [2, 2**31]")
        if not isinstance(rules, np.ndarray) or rules.ndim != 1 or rules.dtype != RULE_DTYPE \
                or rules.dtype.itemsize != sizeof(pn_rule):
            raise ValueError(f"rules must be a 1-d numpy array of abi.RULE_DTYPE ({sizeof(pn_rule)} bytes a rule), "
                             f"not {type(rules).__name__}"
                             + (f" of {rules.dtype} with shape {rules.shape}" if isinstance(rules, np.ndarray) else ""))
        if len(rules) >= 1 << 31:
            raise ValueError(f"rules: {len(rules)} rules is too many")
        self.rules = np.ascontiguousarray(rules)
        self.rule_bytes = self.rules.view(np.uint8).reshape(-1) if len(self.rules) else np.zeros(1, np.uint8)
        if pn_classifier_build(&self.c, <const pn_rule *>&self.rule_bytes[0], <uint32_t>len(self.rules)):
            raise MemoryError("rule table too large to compile")
        if pn_cache_init(&self.cache, <uint32_t>cache_size):
            pn_classifier_free(&self.c)
            raise MemoryError("classification cache")
        memset(self._malformed, 0, sizeof(self._malformed))

    def __dealloc__(self):
        pn_classifier_free(&self.c)
        pn_cache_free(&self.cache)

    @property
    def memory(self):
        """Bytes the compiled bit vectors take."""
        return self.c.memory

    @property
    def cache_stats(self):
        return {"hits": self.cache.hits, "misses": self.cache.misses}

    def malformed(self):
        """Counts of frames that did not parse, by reason index (1..)."""
        return [self._malformed[i] for i in range(1, PN_NREASONS)]

    def export(self):
        """The compiled bit vectors as numpy arrays, for loading into BPF maps.

        Per field (src4, dst4, src6, dst6, sport, dport, proto, dscp): "sums"
        (nrows x nsum uint64 summary words), "chunk" (nrows x nsum uint32: the
        id of the 64-word chunk of the row's bitmap under each summary word)
        and "row_of" (prefix fields: per interval, with "start_hi"/"start_lo";
        small fields: per value). "chunks" (nchunks x 64 uint64) holds each
        distinct chunk once, for all fields; chunk 0 is all zeros."""
        cdef pn_field *f
        cdef Py_ssize_t k
        cdef size_t nvals
        names = ("src4", "dst4", "src6", "dst6", "sport", "dport", "proto", "dscp")
        out = {"nrules": self.c.nrules, "nwords": self.c.nwords, "nsum": self.c.nsum,
               "noport_row": (self.c.noport_row[0], self.c.noport_row[1]),
               "rule_policy": np.array([self.c.rule_policy[i] for i in range(self.c.nrules)], dtype=np.int32)}
        cdef uint64_t[::1] hi, lo, words
        cdef uint32_t[::1] ro, ids
        cdef size_t ns = self.c.nsum
        chunks = np.empty(<size_t>self.c.nchunks * PN_CHUNK_WORDS, dtype=np.uint64)
        words = chunks
        memcpy(&words[0], self.c.chunks, <size_t>self.c.nchunks * PN_CHUNK_WORDS * sizeof(uint64_t))
        out["chunks"] = chunks.reshape(self.c.nchunks, PN_CHUNK_WORDS)
        for k in range(PN_NFIELDS):  # enum pn_field_id: the four prefix fields, then the small ones
            f = &self.c.f[k]
            if k < PN_F_SPORT:
                nvals = f.nintervals
            elif k < PN_F_PROTO:
                nvals = PN_PORTS
            elif k == PN_F_PROTO:
                nvals = NPROTO
            else:
                nvals = NDSCP
            row_of = np.empty(nvals, dtype=np.uint32)
            ro = row_of
            memcpy(&ro[0], f.row_of, nvals * sizeof(uint32_t))
            sums = np.empty(<size_t>f.nrows * ns, dtype=np.uint64)  # every field has a row at least
            cids = np.empty(<size_t>f.nrows * ns, dtype=np.uint32)
            words = sums
            ids = cids
            memcpy(&words[0], f.sums, f.nrows * ns * sizeof(uint64_t))
            memcpy(&ids[0], f.chunk, f.nrows * ns * sizeof(uint32_t))
            d = {"row_of": row_of, "sums": sums.reshape(f.nrows, ns), "chunk": cids.reshape(f.nrows, ns)}
            if k < PN_F_SPORT:
                sh = np.empty(f.nintervals, dtype=np.uint64)
                sl = np.empty(f.nintervals, dtype=np.uint64)
                hi = sh
                lo = sl
                pn_field_starts(f, &hi[0], &lo[0])
                d["start_hi"] = sh
                d["start_lo"] = sl
            out[names[k]] = d
        return out

    def clear_cache(self):
        self.cache.generation += 1

    def classify_list(self, list frames not None, int32_t[::1] out not None, int mode=CLASSIFY_CACHE):
        """mode 0 (CLASSIFY_CACHE): cache + bit vectors; 1 (CLASSIFY_BITVEC): bit
        vectors only; 2 (CLASSIFY_LINEAR): linear scan (baseline)."""
        cdef Py_ssize_t i, m, n = len(frames)
        cdef const uint8_t *ptrs[CHUNK]
        cdef size_t lens[CHUNK]
        if out.shape[0] < n:
            raise ValueError("out too short")
        for i in range(0, n, CHUNK):
            m = min(CHUNK, n - i)
            list_frames(frames, i, m, ptrs, lens)
            self._run(ptrs, lens, &out[i], m, mode)

    def classify_buffer(self, const uint8_t[::1] buf not None, const int64_t[::1] offsets not None,
                        int32_t[::1] out not None, int mode=CLASSIFY_CACHE):
        """Frames are buf[offsets[i]:offsets[i+1]]; mode as for classify_list."""
        cdef Py_ssize_t i, m, n = offsets.shape[0] - 1
        cdef const uint8_t *ptrs[CHUNK]
        cdef size_t lens[CHUNK]
        cdef const uint8_t *base
        if n < 0 or out.shape[0] < n:
            raise ValueError("need len(offsets) - 1 <= len(out)")
        base = frames_base(buf, offsets)
        with nogil:
            for i in range(0, n, CHUNK):
                m = min(<Py_ssize_t>CHUNK, n - i)
                slice_frames(base, &offsets[i], m, ptrs, lens)
                self._run(ptrs, lens, &out[i], m, mode)

    cdef void _run(self, const uint8_t **ptrs, size_t *lens, int32_t *out, Py_ssize_t m, int mode) noexcept nogil:
        cdef Py_ssize_t j
        if mode == CLASSIFY_CACHE:
            pn_cache_run(&self.cache, &self.c, ptrs, lens, out, m, self._malformed)
        else:
            for j in range(m):
                out[j] = self._one(ptrs[j], lens[j], mode)

    cdef inline int32_t _one(self, const uint8_t *p, Py_ssize_t n, int mode) noexcept nogil:
        """One frame without the cache: bit vectors (CLASSIFY_BITVEC) or a linear scan (any other mode)."""
        cdef pn_parsed parsed
        cdef int reason
        memset(&parsed, 0, sizeof(parsed))
        reason = pn_parse(p, p + n, &parsed)
        if reason:
            self._malformed[reason] += 1
            return -1
        if mode == CLASSIFY_BITVEC:
            return pn_classify(&self.c, &parsed)
        return pn_classify_linear(<const pn_rule *>&self.rule_bytes[0], self.c.nrules, &parsed)


cdef class Sites:
    """Destination sites: longest-prefix match of the destination address
    over site subnets (csrc/sites.c), from a struct pn_site_prefix array."""
    cdef pn_sites s
    cdef readonly uint32_t nsites

    def __cinit__(self, prefixes not None, uint32_t nsites):
        cdef const uint8_t[::1] raw
        arr = np.ascontiguousarray(prefixes)
        if arr.ndim != 1 or arr.dtype.itemsize != sizeof(pn_site_prefix):
            raise ValueError("prefixes must be a 1-d array of struct pn_site_prefix (abi.SITE_PREFIX_DTYPE)")
        raw = arr.view(np.uint8).reshape(-1) if len(arr) else np.zeros(1, np.uint8)
        if pn_sites_build(&self.s, <const pn_site_prefix *>&raw[0], <uint32_t>len(arr)):
            raise ValueError("site prefixes: out of memory, or a prefix with a bad family, length or site")
        if self.s.nsites > nsites:
            pn_sites_free(&self.s)
            raise ValueError("a prefix names a site past nsites")
        self.nsites = nsites

    def __dealloc__(self):
        pn_sites_free(&self.s)

    def lookup(self, list frames not None):
        """Destination site per frame (0: outside every site, -1: malformed)."""
        cdef pn_parsed parsed
        cdef const uint8_t *p
        cdef Py_ssize_t i, n = len(frames)
        out = np.empty(n, dtype=np.int32)
        cdef int32_t[::1] o = out
        for i in range(n):
            f = frames[i]
            if not PyBytes_CheckExact(f):
                f = bytes(f)
            p = <const uint8_t *>PyBytes_AS_STRING(f)
            memset(&parsed, 0, sizeof(parsed))
            if pn_parse(p, p + PyBytes_GET_SIZE(f), &parsed):
                o[i] = -1
            else:
                o[i] = pn_site_of(&self.s, &parsed)
        return out


cdef class Dataplane:
    """Parse, classify and account frames into a fixed-capacity flow table."""
    cdef pn_dp dp
    cdef Classifier cls
    cdef Sites sites
    cdef public object flow_dtype

    def __cinit__(self, Classifier cls not None, Sites sites not None, uint32_t npolicies, uint32_t capacity,
                  int64_t idle_ns=0, int64_t active_ns=0, flow_dtype=None):
        cdef size_t nroutes = (<size_t>npolicies + 1) * (<size_t>sites.nsites + 1)
        memset(&self.dp, 0, sizeof(self.dp))
        if pn_ft_init(&self.dp.ft, capacity, idle_ns, active_ns):
            raise MemoryError(f"flow table of {capacity} flows")
        if nroutes > MAX_ROUTES:
            raise ValueError("more than 2**26 routes: (policies + 1) x (sites + 1)")
        self.dp.ncols = sites.nsites + 1
        self.dp.route = <uint32_t *>malloc(nroutes * sizeof(uint32_t))
        self.dp.pcount = <pn_policy_counter *>calloc(npolicies + 1, sizeof(pn_policy_counter))
        if not self.dp.route or not self.dp.pcount:
            raise MemoryError("route table and policy counters")
        for i in range(nroutes):
            self.dp.route[i] = PN_NO_PATH
        self.dp.npolicies = npolicies
        self.dp.generation = 1
        self.cls = cls
        self.dp.cls = &cls.c
        self.sites = sites
        self.dp.sites = &sites.s
        self.flow_dtype = flow_dtype

    def __dealloc__(self):
        pn_ft_free(&self.dp.ft)
        free(self.dp.route)
        free(self.dp.pcount)

    def set_classifier(self, Classifier cls not None, Sites sites not None, uint32_t npolicies, routes=None):
        """Swap the rule table and the site prefixes; flows keep their counters
        and are re-classified on their next packet. `routes`: the new route
        table ((policies + 1) x (sites + 1) uint32), needed when the number of
        sites changes."""
        cdef uint32_t[:, ::1] rv
        cdef uint32_t *nr
        if npolicies != self.dp.npolicies:
            raise ValueError("a new table must keep the number of policies (counters are per policy)")
        if routes is None and sites.nsites + 1 != self.dp.ncols:
            raise ValueError("a new number of sites needs a new route table")
        if routes is not None:
            rv = np.ascontiguousarray(routes, dtype=np.uint32)
            if rv.shape[0] != npolicies + 1 or rv.shape[1] != sites.nsites + 1:
                raise ValueError("routes must be (policies + 1) x (sites + 1)")
            nr = <uint32_t *>malloc(rv.shape[0] * rv.shape[1] * sizeof(uint32_t))
            if not nr:
                raise MemoryError("route table")
            memcpy(nr, &rv[0, 0], rv.shape[0] * rv.shape[1] * sizeof(uint32_t))
            free(self.dp.route)
            self.dp.route = nr
            self.dp.ncols = sites.nsites + 1
        self.cls = cls
        self.dp.cls = &cls.c
        self.sites = sites
        self.dp.sites = &sites.s
        self.dp.generation += 1

    def set_path(self, int32_t policy, uint32_t site, uint32_t path):
        """Point (`policy` (-1 = default), destination `site`) at path slot `path`: one array write."""
        if policy < -1 or policy >= <int32_t>self.dp.npolicies:
            raise IndexError(policy)
        if site >= self.dp.ncols:
            raise IndexError(site)
        self.dp.route[(policy + 1) * self.dp.ncols + site] = path

    def path_of(self, int32_t policy, uint32_t site):
        if policy < -1 or policy >= <int32_t>self.dp.npolicies:
            raise IndexError(policy)
        if site >= self.dp.ncols:
            raise IndexError(site)
        return self.dp.route[(policy + 1) * self.dp.ncols + site]

    def routes(self):
        """The route table as a (policies + 1, sites + 1) uint32 array (a copy)."""
        out = np.empty(((self.dp.npolicies + 1), self.dp.ncols), dtype=np.uint32)
        cdef uint32_t[:, ::1] v = out
        memcpy(&v[0, 0], self.dp.route, (self.dp.npolicies + 1) * self.dp.ncols * sizeof(uint32_t))
        return out

    def process_list(self, list frames not None, const uint64_t[::1] ts not None, int32_t[::1] out not None,
                     uint32_t[::1] where=None):
        """where, if given: 2 entries per frame, its destination site and path slot."""
        cdef Py_ssize_t i, m, n = len(frames)
        cdef const uint8_t *ptrs[CHUNK]
        cdef size_t lens[CHUNK]
        if ts.shape[0] < n or out.shape[0] < n or (where is not None and where.shape[0] < 2 * n):
            raise ValueError("ts and out need one entry per frame, where two")
        for i in range(0, n, CHUNK):
            m = min(CHUNK, n - i)
            list_frames(frames, i, m, ptrs, lens)
            pn_dp_run(&self.dp, ptrs, lens, &ts[i], &out[i], NULL if where is None else &where[2 * i], m)

    def process_buffer(self, const uint8_t[::1] buf not None, const int64_t[::1] offsets not None,
                       const uint64_t[::1] ts not None, int32_t[::1] out not None, uint32_t[::1] where=None):
        cdef Py_ssize_t i, m, n = offsets.shape[0] - 1
        cdef const uint8_t *ptrs[CHUNK]
        cdef size_t lens[CHUNK]
        cdef const uint8_t *base
        cdef uint32_t *w = NULL
        if n < 0 or ts.shape[0] < n or out.shape[0] < n or (where is not None and where.shape[0] < 2 * n):
            raise ValueError("ts and out need len(offsets) - 1 entries, where twice that")
        if where is not None and n:
            w = &where[0]
        base = frames_base(buf, offsets)
        with nogil:
            for i in range(0, n, CHUNK):
                m = min(<Py_ssize_t>CHUNK, n - i)
                slice_frames(base, &offsets[i], m, ptrs, lens)
                pn_dp_run(&self.dp, ptrs, lens, &ts[i], &out[i], NULL if w == NULL else w + 2 * i, m)

    def flows(self):
        arr = np.zeros(self.dp.ft.count, dtype=self.flow_dtype)
        cdef uint8_t[::1] v
        if self.dp.ft.count:
            v = arr.view(np.uint8).reshape(-1)
            pn_ft_snapshot(&self.dp.ft, <pn_flow *>&v[0])
        return arr

    def expire_idle(self, uint64_t now_ns, int64_t idle_ns):
        """Move flows idle for idle_ns or more at now_ns into the export
        buffer (counted as expired_idle); returns how many."""
        return pn_ft_expire_idle(&self.dp.ft, now_ns, idle_ns)

    def drain(self, bint flush=False):
        """Return the export buffer (evicted and expired flows) and empty it.
        flush=True first moves every live flow there too."""
        if flush:
            pn_ft_flush(&self.dp.ft)
        n = self.dp.ft.exp_len
        arr = np.zeros(n, dtype=self.flow_dtype)
        cdef uint8_t[::1] v
        if n:
            v = arr.view(np.uint8).reshape(-1)
            memcpy(&v[0], self.dp.ft.exp, n * arr.dtype.itemsize)
        self.dp.ft.exp_len = 0
        return arr

    def raw_counters(self):
        pp = [(self.dp.pcount[i].packets, self.dp.pcount[i].bytes) for i in range(self.dp.npolicies + 1)]
        return {
            "policy": pp,
            "malformed": [self.dp.malformed[i] for i in range(1, PN_NREASONS)],
            "flows": self.dp.ft.count,
            "capacity": self.dp.ft.capacity,
            "evicted": self.dp.ft.evicted,
            "expired_idle": self.dp.ft.expired_idle,
            "expired_active": self.dp.ft.expired_active,
            "export_pending": self.dp.ft.exp_len,
            "export_lost": self.dp.ft.export_lost,
            "cache_hits": self.dp.cache_hits,
            "cache_misses": self.dp.cache_misses,
        }

    def process_capture(self, const uint8_t[::1] buf not None, threads=None):
        """Account every packet of a pcap/pcapng file held in buf (an mmap).
        Returns (policy ids, info dict). Non-Ethernet packets are skipped and counted.
        ``threads`` 2: a reader thread walks the records while this one
        accounts them (the same result as 1); None: 2 from 4 MiB up, else 1."""
        cdef pn_capture cap
        cdef pn_caprun_result res
        cdef int st
        cdef int nthreads
        if threads is not None and threads not in (1, 2):
            raise ValueError("threads must be 1 or 2")
        if buf.shape[0] == 0:
            return np.empty(0, np.int32), {"format": None, "packets": 0, "skipped_linktype": 0,
                                           "error": "empty file", "status": -1, "threads": 0}
        st = pn_capture_open(&cap, &buf[0], buf.shape[0])
        if st != PN_CAP_OK:
            return np.empty(0, np.int32), {"format": None, "packets": 0, "skipped_linktype": 0,
                                           "error": pn_capture_strerror(st).decode(), "status": st, "threads": 0}
        fmt = "pcapng" if pn_capture_format(&cap) == PN_CAP_FORMAT_PCAPNG else "pcap"
        nthreads = (2 if buf.shape[0] >= (4 << 20) else 1) if threads is None else threads
        cdef int32_t[::1] out
        try:
            with nogil:
                pn_capture_run(&cap, &self.dp, nthreads, &res)
            st = res.status
            if st == CAP_ERR_NOMEM:
                raise MemoryError("capture results")
            ids = np.empty(res.n, dtype=np.int32)
            if res.n:
                out = ids
                memcpy(&out[0], res.ids, res.n * sizeof(int32_t))
        finally:
            free(res.ids)
        err = None if st == PN_CAP_END else pn_capture_strerror(st).decode()
        return ids, {"format": fmt, "packets": res.n, "skipped_linktype": res.skipped, "error": err, "status": st,
                     "threads": res.threads, "snapped": res.snapped}
