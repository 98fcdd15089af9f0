/* The layout of every ABI struct as the C compiler sees it, for the test that
 * checks the numpy dtypes in patronus/abi.py against patronus_abi.h. */
#ifndef PATRONUS_ABI_LAYOUT_H
#define PATRONUS_ABI_LAYOUT_H

#include <stddef.h>

struct pn_layout_entry {
    const char *type;     /* struct name */
    const char *field;    /* NULL for the row giving sizeof(struct) */
    size_t offset;
    size_t size;
};

/* Terminated by an entry whose type is NULL. Structs sized by compile-time
 * capacities are laid out at PN_LAYOUT_NSUM summary words and
 * PN_LAYOUT_RULES rule slots. */
extern const struct pn_layout_entry pn_abi_layout[];

#define PN_LAYOUT_NSUM 3
#define PN_LAYOUT_RULES 8

/* Every integer constant of patronus_abi.h that Python reads, by name.
 * Terminated by an entry whose name is NULL. */
struct pn_const_entry {
    const char *name;
    unsigned long long value;
};
extern const struct pn_const_entry pn_abi_constants[];

#endif
