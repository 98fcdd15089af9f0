# Declarations of csrc/abi_layout.h: the layout and the integer constants of
# patronus_abi.h as the C compiler sees them (patronus._fast.abi_layout(),
# abi_constants()).

cdef extern from "abi_layout.h" nogil:
    enum:
        PN_LAYOUT_NSUM
        PN_LAYOUT_RULES

    struct pn_layout_entry:
        const char *type
        const char *field
        size_t offset
        size_t size

    # terminated by an entry whose type is NULL
    const pn_layout_entry pn_abi_layout[]

    struct pn_const_entry:
        const char *name
        unsigned long long value

    # terminated by an entry whose name is NULL
    const pn_const_entry pn_abi_constants[]
