/* cgroup/getsockopt: answer SO_ORIGINAL_DST on the proxy's accepted socket
 * from the record sockops filed, so the proxy reads the original destination
 * exactly as it does behind iptables REDIRECT.
 *
 * Attached where the proxy's sockets are (the agent's cgroup), it sees every
 * getsockopt there: anything that is not ours passes through untouched.
 */
#include "maps.h"

int nm_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != NM_SOL_IP || ctx->optname != NM_SO_ORIGINAL_DST)
        goto pass;
    struct nm_config *cfg = nm_cfg();
    if (!cfg)
        goto pass;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->family != NM_AF_INET)
        goto pass;
    if (bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
        goto pass;
    /* Only the outbound listener's connections: local end = the proxy. */
    if (sk->src_ip4 != cfg->proxy_ip4 || sk->src_port != cfg->proxy_port)
        goto pass;
    struct nm_tuple key = {};
    key.ip4 = sk->dst_ip4;
    key.port = bpf_ntohs((u16)sk->dst_port);
    struct nm_orig_dst *orig = nm_orig_by_tuple.lookup(&key);
    if (!orig) {
        nm_count(NM_CTR_ORIGDST_MISS);
        goto pass;
    }
    struct sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        goto pass; /* caller's buffer is too small for a sockaddr_in */
    sa->sin_family = NM_AF_INET;
    sa->sin_port = orig->port;
    sa->sin_addr.s_addr = orig->ip4;
    /* volatile: clang would merge these two adjacent s32 stores into one
     * 8-byte store, which the verifier rejects for this context. */
    *(volatile __s32 *)&ctx->optlen = sizeof(*sa);
    *(volatile __s32 *)&ctx->retval = 0;
    nm_count(NM_CTR_ORIGDST_ANSWERED);
    return 1;

pass:
    /* Leave optlen alone: the buffer holds the kernel's answer, or the answer
     * of a program that ran before this one (another node namespace's agent
     * on the same root cgroup: ALLOW_MULTI runs them all on one ctx), and it
     * is copied back as is. Setting optlen = 0 here would drop that answer
     * and return the caller an uninitialised buffer with success. Only past a
     * page (the buffer is truncated) must it be 0, so the kernel's own stays. */
    if (ctx->optlen > NM_PAGE_SIZE)
        ctx->optlen = 0;
    return 1;
}
