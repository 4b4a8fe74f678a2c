/* cgroup/connect6: the same capture as connect4 for dual-stack (AF_INET6)
 * sockets dialling an IPv4 peer through an IPv4-mapped address
 * (::ffff:a.b.c.d), as Java, Node or Python do with one socket for both
 * families. The kernel runs the connect6 hook for those sockets, never
 * connect4, and the packets on the wire are IPv4: without this program they
 * would bypass the mesh in eBPF mode while iptables/nftables capture them.
 *
 * A mapped destination is rewritten to ::ffff:<proxy ip4>:<proxy port> (the
 * proxy's IPv4 listener accepts it: the connection is IPv4 underneath) and
 * the IPv4 original destination is recorded under the socket cookie exactly
 * as connect4 does, so sockops, getsockopt and the proxy are unchanged.
 * Native IPv6 destinations are left alone (the mesh is IPv4-only: VIPs and
 * listeners) and counted (NM_CTR_V6_NATIVE_BYPASS).
 *
 * nm_connect6 goes on cgroup-declared workloads' cgroups, nm_connect6_uid on
 * the cgroup v2 root filtered by nm_uids, like connect4.
 * Return 1 = let the connect proceed (possibly rewritten), 0 = EPERM.
 */
#include "maps.h"

/* Point a mapped destination at an IPv4 address and port (network order). */
static __always_inline void nm_set_mapped(struct bpf_sock_addr *ctx, __u32 ip4, __u16 port_be)
{
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
    ctx->user_ip6[3] = ip4;
    ctx->user_port = port_be;
}

static __always_inline int nm_connect6_body(struct bpf_sock_addr *ctx, int by_uid)
{
    int tcp = ctx->type == NM_SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
    int udp = ctx->type == NM_SOCK_DGRAM && ctx->protocol == IPPROTO_UDP;
    if (!tcp && !udp)
        return 1;
    struct nm_config *cfg = nm_captured(ctx, by_uid);
    if (!cfg)
        return 1;
    __u32 w0 = ctx->user_ip6[0];
    __u32 w1 = ctx->user_ip6[1];
    __u32 w2 = ctx->user_ip6[2];
    __u32 w3 = ctx->user_ip6[3];
    int dns = cfg->dns_port && ctx->user_port == bpf_htons(NM_DNS_PORT);
    if (!nm_v4mapped(w0, w1, w2)) {
        /* Native IPv6: not the mesh's. ::1 is loopback, as 127/8 is for connect4. */
        if (w0 == 0 && w1 == 0 && w2 == 0 && w3 == bpf_htonl(1))
            nm_count(NM_CTR_SKIP_LOOPBACK);
        else if (tcp || dns)
            nm_count(NM_CTR_V6_NATIVE_BYPASS);
        return 1;
    }
    __u32 dst = w3;
    __u16 port = (__u16)ctx->user_port;
    /* DNS first, as in connect4: a loopback stub resolver is captured too. */
    if (dns) {
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
        orig.ip4 = dst;
        orig.port = port;
        u64 cookie = bpf_get_socket_cookie(ctx);
        nm_orig_by_cookie.update(&cookie, &orig);
        nm_set_mapped(ctx, cfg->dns_ip4, bpf_htons(cfg->dns_port));
        nm_count(NM_CTR_DNS_REDIRECTED);
        return 1;
    }
    if (!tcp)
        return 1;
    if ((bpf_ntohl(dst) >> 24) == 127) {
        nm_count(NM_CTR_SKIP_LOOPBACK);
        return 1;
    }
    struct nm_cidr_key key = {.prefixlen = 32, .ip4 = dst};
    if (nm_exclusions.lookup(&key)) {
        nm_count(NM_CTR_SKIP_EXCLUDED);
        return 1;
    }
    if (!nm_live(cfg, NM_LIVE_PROXY)) {
        if (cfg->failure_policy == NM_POLICY_CLOSED) {
            nm_count(NM_CTR_REFUSED_STALE);
            return 0;
        }
        nm_count(NM_CTR_BYPASS_STALE);
        return 1;
    }
    struct nm_orig_dst orig = {};
    orig.cgroup_id = bpf_get_current_cgroup_id();
    orig.ip4 = dst;
    orig.port = port;
    u64 cookie = bpf_get_socket_cookie(ctx);
    nm_orig_by_cookie.update(&cookie, &orig);
    nm_set_mapped(ctx, cfg->proxy_ip4, bpf_htons(cfg->proxy_port));
    nm_count(NM_CTR_REDIRECTED);
    return 1;
}

int nm_connect6(struct bpf_sock_addr *ctx)
{
    return nm_connect6_body(ctx, 0);
}

int nm_connect6_uid(struct bpf_sock_addr *ctx)
{
    return nm_connect6_body(ctx, 1);
}
