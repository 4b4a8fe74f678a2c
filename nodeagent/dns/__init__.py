"""Mesh DNS: the agent's DNS proxy. `message` is the wire codec (no I/O),
`zone` decides which names the mesh answers (pure), `upstream` forwards the
rest to the node's resolvers, `server` carries queries over UDP and TCP."""
