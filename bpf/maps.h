/* nodemesh eBPF capture: the maps and record layouts shared by every program.
 *
 * Compiled by bcc (python3-bpfcc) together with connect4.c, sockops.c,
 * getsockopt.c and getpeername4.c into one module, so all programs share
 * these maps. nodeagent/capture/ebpf.py mirrors each struct with ctypes;
 * tests/unit/test_ebpf_layout.py checks that mirror against the types bcc
 * derived from this file when it compiled the programs.
 */
#ifndef NODEMESH_BPF_MAPS_H
#define NODEMESH_BPF_MAPS_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

/* SO_ORIGINAL_DST from <linux/netfilter_ipv4.h>: the option the proxy reads. */
#define NM_SO_ORIGINAL_DST 80
#define NM_SOL_IP 0
#define NM_AF_INET 2
#define NM_SOCK_STREAM 1
#define NM_PAGE_SIZE 4096

/* failure_policy values in struct nm_config. */
#define NM_POLICY_OPEN 0
#define NM_POLICY_CLOSED 1

/* Indexes of nm_counters (per-CPU u64 each). Keep in step with
 * ebpf.py COUNTERS; the layout test checks the count. */
#define NM_CTR_REDIRECTED 0       /* connects sent to the proxy */
#define NM_CTR_BYPASS_STALE 1     /* proxy not live, policy open: sent directly */
#define NM_CTR_REFUSED_STALE 2    /* proxy not live, policy closed: EPERM */
#define NM_CTR_SKIP_EXCLUDED 3    /* destination in the exclusion trie */
#define NM_CTR_SKIP_LOOPBACK 4    /* destination 127.0.0.0/8 */
#define NM_CTR_ORIGDST_ANSWERED 5 /* SO_ORIGINAL_DST answered for the proxy */
#define NM_CTR_ORIGDST_MISS 6     /* SO_ORIGINAL_DST asked, no record found */
#define NM_CTR_PEER_REWRITTEN 7   /* getpeername showed the dialled peer */
#define NM_CTR_SKIP_PROXY_MARK 8  /* the proxy's own (marked) socket */
#define NM_COUNTERS 9

/* Written once by the agent at install (slot 0). */
struct nm_config {
    __u64 netns_cookie;        /* only sockets of this network namespace are touched */
    __u64 liveness_timeout_ns; /* older heartbeat than this = proxy not live */
    __u32 proxy_ip4;           /* network order: the outbound listener, 127.0.0.1 */
    __u32 proxy_mark;          /* SO_MARK of the proxy's own sockets */
    __u16 proxy_port;          /* host order: 15001 */
    __u8 failure_policy;       /* NM_POLICY_* */
    __u8 enabled;              /* 0 = every program passes everything through */
    __u32 _pad;
};

/* What a workload dialled, and which cgroup it dialled from. */
struct nm_orig_dst {
    __u64 cgroup_id;
    __u32 ip4;  /* network order */
    __u16 port; /* network order */
    __u16 _pad;
};

/* The workload end of a redirected connection, as the proxy sees its peer. */
struct nm_tuple {
    __u32 ip4;  /* network order */
    __u16 port; /* host order */
    __u16 _pad;
};

/* LPM trie key of the exclusion list (control plane, excludeCidrs). */
struct nm_cidr_key {
    __u32 prefixlen;
    __u32 ip4; /* network order */
};

BPF_ARRAY(nm_config, struct nm_config, 1);
/* Slot 0: bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last heartbeat,
 * written by the agent while its proxy is serving. */
BPF_ARRAY(nm_liveness, u64, 1);
/* connect4 -> sockops, and getpeername4: socket cookie -> original dst. */
BPF_TABLE("lru_hash", u64, struct nm_orig_dst, nm_orig_by_cookie, 65536);
/* sockops -> getsockopt: the client's (ip, port) -> original dst. */
BPF_TABLE("lru_hash", struct nm_tuple, struct nm_orig_dst, nm_orig_by_tuple, 65536);
BPF_LPM_TRIE(nm_exclusions, struct nm_cidr_key, u8, 1024);
/* uids of workloads identified by uid (programs attached at the cgroup root). */
BPF_HASH(nm_uids, u32, u8, 1024);
BPF_PERCPU_ARRAY(nm_counters, u64, NM_COUNTERS);

static __always_inline void nm_count(int idx)
{
    u64 *v = nm_counters.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline struct nm_config *nm_cfg(void)
{
    int zero = 0;
    struct nm_config *cfg = nm_config.lookup(&zero);
    if (!cfg || !cfg->enabled)
        return 0;
    return cfg;
}

#endif
