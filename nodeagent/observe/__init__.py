"""Observers: telemetry, tracing, the passive HTTP/1.1 and HTTP/2 watchers, the mesh's metrics, active health probes."""
