/* cgroup/getpeername4: a captured workload asking whom it is connected to
 * sees the address it dialled, not the proxy's listener. */
#include "maps.h"

int nm_getpeername4(struct bpf_sock_addr *ctx)
{
    struct nm_config *cfg = nm_cfg();
    if (!cfg)
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_orig_dst *orig = nm_orig_by_cookie.lookup(&cookie);
    if (!orig)
        return 1;
    ctx->user_ip4 = orig->ip4;
    ctx->user_port = orig->port;
    nm_count(NM_CTR_PEER_REWRITTEN);
    return 1;
}
