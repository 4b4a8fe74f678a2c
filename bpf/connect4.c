/* cgroup/connect4: send a captured workload's TCP connect to the proxy's
 * outbound listener and remember where it was going, keyed by socket cookie.
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
    struct nm_config *cfg = nm_cfg();
    if (!cfg)
        return 1;
    if (ctx->type != NM_SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
        return 1;
    /* Programs at the root see every namespace on the node: only ours. */
    if (bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
        return 1;
    if (by_uid) {
        u32 uid = (u32)bpf_get_current_uid_gid();
        if (!nm_uids.lookup(&uid))
            return 1;
    }
    /* The proxy's own upstream sockets carry its SO_MARK (set before connect). */
    struct bpf_sock *sk = ctx->sk;
    if (sk && cfg->proxy_mark && sk->mark == cfg->proxy_mark) {
        nm_count(NM_CTR_SKIP_PROXY_MARK);
        return 1;
    }
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
    /* Fail-open/closed is decided here, in the kernel, at connect time. */
    int zero = 0;
    u64 *beat = nm_liveness.lookup(&zero);
    u64 now = bpf_ktime_get_ns();
    if (!beat || *beat == 0 || now - *beat > cfg->liveness_timeout_ns) {
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
