/* nodemesh eBPF capture: the maps and record layouts shared by every program.
 *
 * Compiled by bcc (python3-bpfcc) together with connect4.c, connect6.c,
 * sockops.c, getsockopt.c, getpeername4.c, getpeername6.c, sendmsg4.c and
 * recvmsg4.c into one module
 * (nodeagent/capture/bpflayout.py SOURCES), so all programs share
 * these maps. nodeagent/capture/bpflayout.py mirrors each struct with ctypes;
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
#define NM_AF_INET6 10
#define NM_SOCK_STREAM 1
#define NM_SOCK_DGRAM 2
#define NM_DNS_PORT 53
#define NM_PAGE_SIZE 4096

/* failure_policy values in struct nm_config. */
#define NM_POLICY_OPEN 0
#define NM_POLICY_CLOSED 1

/* Indexes of nm_counters (per-CPU u64 each). Keep in step with
 * bpflayout.py COUNTERS; the layout test checks the count. */
#define NM_CTR_REDIRECTED 0       /* connects sent to the proxy */
#define NM_CTR_BYPASS_STALE 1     /* proxy not live, policy open: sent directly */
#define NM_CTR_REFUSED_STALE 2    /* proxy not live, policy closed: EPERM */
#define NM_CTR_SKIP_EXCLUDED 3    /* destination in the exclusion trie */
#define NM_CTR_SKIP_LOOPBACK 4    /* destination 127.0.0.0/8 */
#define NM_CTR_ORIGDST_ANSWERED 5 /* SO_ORIGINAL_DST answered for the proxy */
#define NM_CTR_ORIGDST_MISS 6     /* SO_ORIGINAL_DST asked, no record found */
#define NM_CTR_PEER_REWRITTEN 7   /* getpeername showed the dialled peer */
#define NM_CTR_SKIP_PROXY_MARK 8  /* the proxy's own (marked) socket */
#define NM_CTR_DNS_REDIRECTED 9   /* port 53 connect/sendto sent to the DNS proxy */
#define NM_CTR_DNS_REPLY_REWRITTEN 10 /* a DNS proxy reply shown as from the nameserver */
#define NM_CTR_DNS_BYPASS_STALE 11 /* DNS proxy not live, policy open: sent directly */
#define NM_CTR_DNS_REFUSED_STALE 12 /* DNS proxy not live, policy closed: EPERM */
#define NM_CTR_V6_NATIVE_BYPASS 13 /* connect6 to a native IPv6 address: not meshed (IPv4-only mesh) */
#define NM_COUNTERS 14

/* Slots of nm_liveness. */
#define NM_LIVE_PROXY 0 /* written by every proxy worker from its event loop */
#define NM_LIVE_DNS 1   /* written by the agent while its DNS proxy is bound */
#define NM_LIVE_SLOTS 2

/* Written once by the agent at install (slot 0). */
struct nm_config {
    __u64 netns_cookie;        /* only sockets of this network namespace are touched */
    __u64 liveness_timeout_ns; /* older heartbeat than this = proxy not live */
    __u32 proxy_ip4;           /* network order: the outbound listener, 127.0.0.1 */
    __u32 proxy_mark;          /* SO_MARK of the proxy's own sockets */
    __u16 proxy_port;          /* host order: 15001 */
    __u8 failure_policy;       /* NM_POLICY_* */
    __u8 enabled;              /* 0 = every program passes everything through */
    __u32 dns_ip4;             /* network order: the agent's DNS proxy, 127.0.0.1 */
    __u16 dns_port;            /* host order: 15053; 0 = port 53 is not captured */
    __u16 _pad;
    __u32 _pad2;
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
/* NM_LIVE_* slots: bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last
 * heartbeat. Pinned by the agent so the proxy workers can write slot 0. */
BPF_ARRAY(nm_liveness, u64, NM_LIVE_SLOTS);
/* connect4/connect6/sendmsg4 -> sockops, getpeername4/6 and recvmsg4: socket cookie ->
 * original destination (for DNS: the nameserver the workload asked). */
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

/* Is the heartbeat in this slot younger than the configured timeout? */
static __always_inline int nm_live(struct nm_config *cfg, int slot)
{
    u64 *beat = nm_liveness.lookup(&slot);
    if (!beat || *beat == 0)
        return 0;
    return bpf_ktime_get_ns() - *beat <= cfg->liveness_timeout_ns;
}

static __always_inline struct nm_config *nm_cfg(void)
{
    int zero = 0;
    struct nm_config *cfg = nm_config.lookup(&zero);
    if (!cfg || !cfg->enabled)
        return 0;
    return cfg;
}

/* A workload's DNS query (connect or sendto to port 53, whatever the
 * nameserver): remember the nameserver under the socket cookie (recvmsg4 and
 * getpeername4 show it back) and send the query to the agent's DNS proxy.
 * Returns the verdict for the hook: 1 = proceed, 0 = EPERM. */
static __always_inline int nm_to_dns(struct bpf_sock_addr *ctx, struct nm_config *cfg)
{
    /* The DNS proxy lives in the agent, not in the workers: its own heartbeat. */
    if (!nm_live(cfg, NM_LIVE_DNS)) {
        if (cfg->failure_policy == NM_POLICY_CLOSED) {
            nm_count(NM_CTR_DNS_REFUSED_STALE);
            return 0;
        }
        nm_count(NM_CTR_DNS_BYPASS_STALE);
        return 1;
    }
    struct nm_orig_dst orig = {};
    orig.cgroup_id = bpf_get_current_cgroup_id();
    orig.ip4 = ctx->user_ip4;
    orig.port = (u16)ctx->user_port;
    u64 cookie = bpf_get_socket_cookie(ctx);
    nm_orig_by_cookie.update(&cookie, &orig);
    ctx->user_ip4 = cfg->dns_ip4;
    ctx->user_port = bpf_htons(cfg->dns_port);
    nm_count(NM_CTR_DNS_REDIRECTED);
    return 1;
}

/* Is the IPv6 address whose first three words (network order) are these an
 * IPv4-mapped one, ::ffff:a.b.c.d? Dual-stack (AF_INET6) sockets reach IPv4
 * peers that way. Words, not a pointer: context fields must be read one by
 * one with constant offsets for the verifier. */
static __always_inline int nm_v4mapped(__u32 w0, __u32 w1, __u32 w2)
{
    return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff);
}

/* Common gate of connect4, connect6 and sendmsg4: the config when this socket is a
 * captured workload's (this netns, a captured uid when by_uid, not the
 * proxy's own marked socket), else 0. */
static __always_inline struct nm_config *nm_captured(struct bpf_sock_addr *ctx, int by_uid)
{
    struct nm_config *cfg = nm_cfg();
    if (!cfg)
        return 0;
    /* Programs at the root see every namespace on the node: only ours. */
    if (bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
        return 0;
    if (by_uid) {
        u32 uid = (u32)bpf_get_current_uid_gid();
        if (!nm_uids.lookup(&uid))
            return 0;
    }
    /* The proxy's and the DNS proxy's own sockets carry the proxy's SO_MARK
     * (set before connect or the first datagram). */
    struct bpf_sock *sk = ctx->sk;
    if (sk && cfg->proxy_mark && sk->mark == cfg->proxy_mark) {
        nm_count(NM_CTR_SKIP_PROXY_MARK);
        return 0;
    }
    return cfg;
}

#endif
