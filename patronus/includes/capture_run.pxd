# Declarations of csrc/capture_run.h.

from libc.stdint cimport int32_t

from patronus.includes.capture cimport pn_capture
from patronus.includes.flowtable cimport pn_dp


cdef extern from "capture_run.h" nogil:
    ctypedef struct pn_caprun_result:
        int32_t *ids
        size_t n
        size_t skipped
        size_t snapped
        int status
        int threads

    void pn_capture_run(pn_capture *cap, pn_dp *dp, int threads, pn_caprun_result *res)
