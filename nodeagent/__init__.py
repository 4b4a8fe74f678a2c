"""The per-node daemon: capture, the shared proxy, identity, xDS client."""
