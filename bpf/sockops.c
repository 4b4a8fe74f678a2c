/* sockops: once a redirected connect is established, file its original
 * destination under the workload end's (ip, port), which is what the proxy
 * sees as the peer of the socket it accepts. IPv4 sockets (connect4) and
 * dual-stack ones with an IPv4-mapped local address (connect6). */
#include "maps.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    __u32 family = skops->family;
    if (family != NM_AF_INET && family != NM_AF_INET6)
        return 1;
    struct nm_config *cfg = nm_cfg();
    if (!cfg)
        return 1;
    u64 cookie = bpf_get_socket_cookie(skops);
    struct nm_orig_dst *orig = nm_orig_by_cookie.lookup(&cookie);
    if (!orig)
        return 1;
    struct nm_tuple key = {};
    if (family == NM_AF_INET6) {
        /* A dual-stack socket connect6 redirected: IPv4 on the wire, its local
         * end ::ffff:<client ip4>, which is the peer the proxy's IPv4
         * listener sees. Native IPv6 sockets never have a record (above). */
        __u32 w0 = skops->local_ip6[0];
        __u32 w1 = skops->local_ip6[1];
        __u32 w2 = skops->local_ip6[2];
        if (!nm_v4mapped(w0, w1, w2))
            return 1;
        key.ip4 = skops->local_ip6[3];
    } else {
        key.ip4 = skops->local_ip4;
    }
    key.port = (u16)skops->local_port;
    struct nm_orig_dst copy = *orig;
    /* The cookie entry stays: getpeername4/6 need it for the socket's life. */
    nm_orig_by_tuple.update(&key, &copy);
    return 1;
}
