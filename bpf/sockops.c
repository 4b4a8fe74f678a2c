/* sockops: once a redirected connect is established, file its original
 * destination under the workload end's (ip, port), which is what the proxy
 * sees as the peer of the socket it accepts. */
#include "maps.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || skops->family != NM_AF_INET)
        return 1;
    struct nm_config *cfg = nm_cfg();
    if (!cfg)
        return 1;
    u64 cookie = bpf_get_socket_cookie(skops);
    struct nm_orig_dst *orig = nm_orig_by_cookie.lookup(&cookie);
    if (!orig)
        return 1;
    struct nm_tuple key = {};
    key.ip4 = skops->local_ip4;
    key.port = (u16)skops->local_port;
    struct nm_orig_dst copy = *orig;
    /* The cookie entry stays: getpeername4 needs it for the socket's life. */
    nm_orig_by_tuple.update(&key, &copy);
    return 1;
}
