"""Identity: the node's attestation to the control plane and the workloads' certificates."""
