/* cgroup/recvmsg4: a reply from the agent's DNS proxy, read by a workload
 * whose query was captured, is shown as coming from the nameserver it asked
 * (nameserver:53). Without this, resolvers (glibc checks the reply's source
 * against its nameserver list) drop the replies as coming from elsewhere.
 *
 * Only datagrams whose source is exactly the DNS proxy, on sockets with a
 * record filed by connect4 or sendmsg4, are touched. recvmsg4 cannot refuse:
 * always 1.
 */
#include "maps.h"

int nm_recvmsg4(struct bpf_sock_addr *ctx)
{
    struct nm_config *cfg = nm_cfg();
    if (!cfg || !cfg->dns_port)
        return 1;
    if (ctx->user_ip4 != cfg->dns_ip4 || ctx->user_port != bpf_htons(cfg->dns_port))
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_orig_dst *orig = nm_orig_by_cookie.lookup(&cookie);
    if (!orig)
        return 1;
    ctx->user_ip4 = orig->ip4;
    ctx->user_port = orig->port;
    nm_count(NM_CTR_DNS_REPLY_REWRITTEN);
    return 1;
}
