/* cgroup/connect4: send a captured workload's TCP connect to the proxy's
 * outbound listener and remember where it was going, keyed by socket cookie;
 * send its DNS connects (TCP, and UDP as glibc's resolver connects its UDP
 * socket) to port 53 to the agent's DNS proxy.
 *
 * Two entry points share one body: nm_connect4 is attached to the cgroups of
 * workloads declared by cgroup (everything there is captured);
 * nm_connect4_uid is attached to the cgroup v2 root when workloads are
 * declared by uid, and captures only sockets opened by those uids.
 * Return 1 = let the connect proceed (possibly rewritten), 0 = EPERM.
 */
#include "maps.h"

static __always_inline int nm_connect4_body(struct bpf_sock_addr *ctx, int by_uid)
{
    int tcp = ctx->type == NM_SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
    int udp = ctx->type == NM_SOCK_DGRAM && ctx->protocol == IPPROTO_UDP;
    if (!tcp && !udp)
        return 1;
    struct nm_config *cfg = nm_captured(ctx, by_uid);
    if (!cfg)
        return 1;
    /* DNS first: a loopback stub resolver (127.0.0.53) is captured too. */
    if (cfg->dns_port && ctx->user_port == bpf_htons(NM_DNS_PORT))
        return nm_to_dns(ctx, cfg);
    if (!tcp)
        return 1;
    u32 dst = ctx->user_ip4;
    if ((bpf_ntohl(dst) >> 24) == 127) {
        nm_count(NM_CTR_SKIP_LOOPBACK);
        return 1;
    }
    struct nm_cidr_key key = {.prefixlen = 32, .ip4 = dst};
    if (nm_exclusions.lookup(&key)) {
        nm_count(NM_CTR_SKIP_EXCLUDED);
        return 1;
    }
    /* Fail-open/closed is decided here, in the kernel, at connect time, from
     * the heartbeat the proxy workers write from their event loops. */
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
    orig.port = (u16)ctx->user_port;
    u64 cookie = bpf_get_socket_cookie(ctx);
    nm_orig_by_cookie.update(&cookie, &orig);
    ctx->user_ip4 = cfg->proxy_ip4;
    ctx->user_port = bpf_htons(cfg->proxy_port);
    nm_count(NM_CTR_REDIRECTED);
    return 1;
}

int nm_connect4(struct bpf_sock_addr *ctx)
{
    return nm_connect4_body(ctx, 0);
}

int nm_connect4_uid(struct bpf_sock_addr *ctx)
{
    return nm_connect4_body(ctx, 1);
}
