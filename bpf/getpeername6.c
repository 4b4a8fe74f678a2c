/* cgroup/getpeername6: a dual-stack workload whose IPv4-mapped connect was
 * captured by connect6 sees ::ffff:<the address it dialled> as its peer, not
 * the proxy's listener. Only sockets with a record under their cookie are
 * touched (connect6 files records for mapped destinations only). */
#include "maps.h"

int nm_getpeername6(struct bpf_sock_addr *ctx)
{
    struct nm_config *cfg = nm_cfg();
    if (!cfg)
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_orig_dst *orig = nm_orig_by_cookie.lookup(&cookie);
    if (!orig)
        return 1;
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
    ctx->user_ip6[3] = orig->ip4;
    ctx->user_port = orig->port;
    nm_count(NM_CTR_PEER_REWRITTEN);
    return 1;
}
