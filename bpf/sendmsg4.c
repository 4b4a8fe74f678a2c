/* cgroup/sendmsg4: a captured workload's unconnected UDP sendto() to port 53
 * (any nameserver) goes to the agent's DNS proxy; the nameserver is recorded
 * under the socket cookie so recvmsg4 can show the reply as coming from it.
 *
 * The kernel runs this hook only for datagrams that name a destination
 * (connected UDP sockets were already handled by connect4). Same two entry
 * points as connect4: by cgroup, and at the root filtered by uid.
 * Return 1 = send (possibly rewritten), 0 = EPERM.
 */
#include "maps.h"

static __always_inline int nm_sendmsg4_body(struct bpf_sock_addr *ctx, int by_uid)
{
    if (ctx->type != NM_SOCK_DGRAM || ctx->user_port != bpf_htons(NM_DNS_PORT))
        return 1;
    struct nm_config *cfg = nm_captured(ctx, by_uid);
    if (!cfg || !cfg->dns_port)
        return 1;
    return nm_to_dns(ctx, cfg);
}

int nm_sendmsg4(struct bpf_sock_addr *ctx)
{
    return nm_sendmsg4_body(ctx, 0);
}

int nm_sendmsg4_uid(struct bpf_sock_addr *ctx)
{
    return nm_sendmsg4_body(ctx, 1);
}
