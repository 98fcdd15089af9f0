# Constants of patronus/_fast.pyx itself; the ones shared with C are declared
# from csrc/'s headers in the .pxd files next to this one. Compile-time DEFs
# (as uvloop's includes/consts.pxi): CHUNK is a range() step and an array size.

# frames handed to the C pipeline per call (stack arrays of pointers and lengths)
DEF CHUNK = 1024

# Classifier.classify_list/classify_buffer modes (PolicyTable.classify passes them)
DEF CLASSIFY_CACHE = 0       # cache, then bit vectors on a miss
DEF CLASSIFY_BITVEC = 1      # bit vectors only
DEF CLASSIFY_LINEAR = 2      # scan every rule (a baseline); so does any other mode

# values of the small classifier fields, each a direct lookup (struct pn_lut)
DEF NPROTO = 256             # 8-bit protocol number
DEF NDSCP = 64               # 6-bit DSCP

# Dataplane: most (policies + 1) x (sites + 1) route entries
DEF MAX_ROUTES = 1 << 26

# pcap/pcapng LINKTYPE_ETHERNET: the only link type the parser reads
DEF LINKTYPE_ETHERNET = 1

# process_capture: growing the result buffer failed (not a pn_cap_status)
DEF CAP_ERR_NOMEM = -100
