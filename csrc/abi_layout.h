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

/* Terminated by an entry whose type is NULL. */
extern const struct pn_layout_entry pn_abi_layout[];

#endif
