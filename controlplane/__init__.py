"""The gRPC control plane: config store, registry, CA, xDS server."""
