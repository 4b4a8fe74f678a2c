from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Resource(_message.Message):
    __slots__ = ("api_version", "kind", "namespace", "name", "spec_json", "status_json", "resource_version", "created_unix_ms", "updated_unix_ms", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    kind: str
    namespace: str
    name: str
    spec_json: str
    status_json: str
    resource_version: int
    created_unix_ms: int
    updated_unix_ms: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, api_version: _Optional[str] = ..., kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., spec_json: _Optional[str] = ..., status_json: _Optional[str] = ..., resource_version: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("documents", "dry_run")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    documents: str
    dry_run: bool
    def __init__(self, documents: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyResult(_message.Message):
    __slots__ = ("kind", "namespace", "name", "action", "resource_version")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    action: str
    resource_version: int
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., action: _Optional[str] = ..., resource_version: _Optional[int] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ApplyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ApplyResult, _Mapping]]] = ...) -> None: ...

class ResourceRef(_message.Message):
    __slots__ = ("kind", "namespace", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("kind", "namespace")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("resources", "revision")
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    revision: int
    def __init__(self, resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "resource_version")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    resource_version: int
    def __init__(self, deleted: _Optional[bool] = ..., resource_version: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("kind", "namespace", "since_revision")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    since_revision: int
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., since_revision: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("type", "resource")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    type: str
    resource: Resource
    def __init__(self, type: _Optional[str] = ..., resource: _Optional[_Union[Resource, _Mapping]] = ...) -> None: ...

class WorkloadRegistration(_message.Message):
    __slots__ = ("name", "namespace", "service_account", "labels", "ip", "ports")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    service_account: str
    labels: _containers.ScalarMap[str, str]
    ip: str
    ports: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., ip: _Optional[str] = ..., ports: _Optional[_Iterable[int]] = ...) -> None: ...

class NodeRegistration(_message.Message):
    __slots__ = ("node_name", "addresses", "hbone_port", "zone", "workloads", "agent_version")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    HBONE_PORT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    hbone_port: int
    zone: str
    workloads: _containers.RepeatedCompositeFieldContainer[WorkloadRegistration]
    agent_version: str
    def __init__(self, node_name: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., hbone_port: _Optional[int] = ..., zone: _Optional[str] = ..., workloads: _Optional[_Iterable[_Union[WorkloadRegistration, _Mapping]]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_ms", "telemetry_json")
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_JSON_FIELD_NUMBER: _ClassVar[int]
    sent_unix_ms: int
    telemetry_json: str
    def __init__(self, sent_unix_ms: _Optional[int] = ..., telemetry_json: _Optional[str] = ...) -> None: ...

class EndpointHealth(_message.Message):
    __slots__ = ("workload", "port", "healthy", "detail")
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    workload: str
    port: int
    healthy: bool
    detail: str
    def __init__(self, workload: _Optional[str] = ..., port: _Optional[int] = ..., healthy: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class HealthReport(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointHealth]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[EndpointHealth, _Mapping]]] = ...) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("register", "heartbeat", "health")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    register: NodeRegistration
    heartbeat: Heartbeat
    health: HealthReport
    def __init__(self, register: _Optional[_Union[NodeRegistration, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., health: _Optional[_Union[HealthReport, _Mapping]] = ...) -> None: ...

class LeaseGrant(_message.Message):
    __slots__ = ("node_name", "lease_seconds", "expires_unix_ms")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    lease_seconds: int
    expires_unix_ms: int
    def __init__(self, node_name: _Optional[str] = ..., lease_seconds: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ...) -> None: ...

class CertificateRequest(_message.Message):
    __slots__ = ("node_name", "csr_pem", "ttl_seconds")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    csr_pem: str
    ttl_seconds: int
    def __init__(self, node_name: _Optional[str] = ..., csr_pem: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CertificateResponse(_message.Message):
    __slots__ = ("cert_chain", "trust_bundle")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[str]
    trust_bundle: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cert_chain: _Optional[_Iterable[str]] = ..., trust_bundle: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("token", "node_name", "csr_pem")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    token: str
    node_name: str
    csr_pem: str
    def __init__(self, token: _Optional[str] = ..., node_name: _Optional[str] = ..., csr_pem: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("node_cert_chain", "trust_bundle", "server_ca_bundle")
    NODE_CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SERVER_CA_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    node_cert_chain: _containers.RepeatedScalarFieldContainer[str]
    trust_bundle: _containers.RepeatedScalarFieldContainer[str]
    server_ca_bundle: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_cert_chain: _Optional[_Iterable[str]] = ..., trust_bundle: _Optional[_Iterable[str]] = ..., server_ca_bundle: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("node_name", "ttl_seconds", "node_labels")
    class NodeLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NODE_LABELS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    ttl_seconds: int
    node_labels: _containers.ScalarMap[str, str]
    def __init__(self, node_name: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., node_labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateJoinTokenResponse(_message.Message):
    __slots__ = ("token", "expires_unix")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_unix: int
    def __init__(self, token: _Optional[str] = ..., expires_unix: _Optional[int] = ...) -> None: ...

class CreateOperatorRequest(_message.Message):
    __slots__ = ("name", "role", "csr_pem", "ttl_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    csr_pem: str
    ttl_seconds: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., csr_pem: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateOperatorResponse(_message.Message):
    __slots__ = ("token", "cert_chain", "server_ca_bundle", "credential_id", "serial", "expires_unix")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    SERVER_CA_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    token: str
    cert_chain: _containers.RepeatedScalarFieldContainer[str]
    server_ca_bundle: _containers.RepeatedScalarFieldContainer[str]
    credential_id: str
    serial: str
    expires_unix: int
    def __init__(self, token: _Optional[str] = ..., cert_chain: _Optional[_Iterable[str]] = ..., server_ca_bundle: _Optional[_Iterable[str]] = ..., credential_id: _Optional[str] = ..., serial: _Optional[str] = ..., expires_unix: _Optional[int] = ...) -> None: ...

class RevokeOperatorRequest(_message.Message):
    __slots__ = ("name", "credential_id", "serial")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    credential_id: str
    serial: str
    def __init__(self, name: _Optional[str] = ..., credential_id: _Optional[str] = ..., serial: _Optional[str] = ...) -> None: ...

class RevokeOperatorResponse(_message.Message):
    __slots__ = ("revoked", "credentials_revoked")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    credentials_revoked: int
    def __init__(self, revoked: _Optional[bool] = ..., credentials_revoked: _Optional[int] = ...) -> None: ...

class RevokeNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RevokeNodeResponse(_message.Message):
    __slots__ = ("revoked", "certificates_revoked", "streams_closed", "endpoints_withdrawn")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_REVOKED_FIELD_NUMBER: _ClassVar[int]
    STREAMS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    certificates_revoked: int
    streams_closed: int
    endpoints_withdrawn: bool
    def __init__(self, revoked: _Optional[bool] = ..., certificates_revoked: _Optional[int] = ..., streams_closed: _Optional[int] = ..., endpoints_withdrawn: _Optional[bool] = ...) -> None: ...

class NodeIdentity(_message.Message):
    __slots__ = ("name", "labels", "join_address", "joined_unix", "revoked_unix", "serials", "refusals")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    JOIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    JOINED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SERIALS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    join_address: str
    joined_unix: int
    revoked_unix: int
    serials: _containers.RepeatedScalarFieldContainer[str]
    refusals: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., join_address: _Optional[str] = ..., joined_unix: _Optional[int] = ..., revoked_unix: _Optional[int] = ..., serials: _Optional[_Iterable[str]] = ..., refusals: _Optional[_Iterable[str]] = ...) -> None: ...

class ListNodeIdentitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodeIdentitiesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeIdentity]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeIdentity, _Mapping]]] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyAuditResponse(_message.Message):
    __slots__ = ("ok", "records", "first_seq", "last_seq", "problem")
    OK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    records: int
    first_seq: int
    last_seq: int
    problem: str
    def __init__(self, ok: _Optional[bool] = ..., records: _Optional[int] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., problem: _Optional[str] = ...) -> None: ...

class RefusalsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class RefusalCount(_message.Message):
    __slots__ = ("method", "code", "principal", "count")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    method: str
    code: str
    principal: str
    count: int
    def __init__(self, method: _Optional[str] = ..., code: _Optional[str] = ..., principal: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class RefusalsResponse(_message.Message):
    __slots__ = ("total", "counts", "samples")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    total: int
    counts: _containers.RepeatedCompositeFieldContainer[RefusalCount]
    samples: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, total: _Optional[int] = ..., counts: _Optional[_Iterable[_Union[RefusalCount, _Mapping]]] = ..., samples: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("unix_ms", "principal", "action", "detail", "outcome", "seq", "hash")
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    unix_ms: int
    principal: str
    action: str
    detail: str
    outcome: str
    seq: int
    hash: str
    def __init__(self, unix_ms: _Optional[int] = ..., principal: _Optional[str] = ..., action: _Optional[str] = ..., detail: _Optional[str] = ..., outcome: _Optional[str] = ..., seq: _Optional[int] = ..., hash: _Optional[str] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class RotateRootRequest(_message.Message):
    __slots__ = ("overlap_seconds",)
    OVERLAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    overlap_seconds: int
    def __init__(self, overlap_seconds: _Optional[int] = ...) -> None: ...

class RotateRootResponse(_message.Message):
    __slots__ = ("old_fingerprint", "new_fingerprint", "old_trusted_until_unix")
    OLD_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NEW_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OLD_TRUSTED_UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    old_fingerprint: str
    new_fingerprint: str
    old_trusted_until_unix: int
    def __init__(self, old_fingerprint: _Optional[str] = ..., new_fingerprint: _Optional[str] = ..., old_trusted_until_unix: _Optional[int] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("name", "namespace", "service_account", "node", "ip", "ports", "labels", "identity", "node_address", "hbone_port", "zone")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HBONE_PORT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    ports: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.ScalarMap[str, str]
    identity: str
    node_address: str
    hbone_port: int
    zone: str
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., node: _Optional[str] = ..., ip: _Optional[str] = ..., ports: _Optional[_Iterable[int]] = ..., labels: _Optional[_Mapping[str, str]] = ..., identity: _Optional[str] = ..., node_address: _Optional[str] = ..., hbone_port: _Optional[int] = ..., zone: _Optional[str] = ...) -> None: ...

class MeshConfig(_message.Message):
    __slots__ = ("trust_domain", "outbound_policy", "vip_cidr", "trust_bundle", "dns_domain", "revoked_nodes")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    OUTBOUND_POLICY_FIELD_NUMBER: _ClassVar[int]
    VIP_CIDR_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    DNS_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    REVOKED_NODES_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    outbound_policy: str
    vip_cidr: str
    trust_bundle: _containers.RepeatedScalarFieldContainer[str]
    dns_domain: str
    revoked_nodes: _containers.RepeatedCompositeFieldContainer[RevokedNode]
    def __init__(self, trust_domain: _Optional[str] = ..., outbound_policy: _Optional[str] = ..., vip_cidr: _Optional[str] = ..., trust_bundle: _Optional[_Iterable[str]] = ..., dns_domain: _Optional[str] = ..., revoked_nodes: _Optional[_Iterable[_Union[RevokedNode, _Mapping]]] = ...) -> None: ...

class RevokedNode(_message.Message):
    __slots__ = ("node", "epoch", "revoked_unix", "revoked_by", "until_unix")
    NODE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BY_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    node: str
    epoch: int
    revoked_unix: float
    revoked_by: str
    until_unix: float
    def __init__(self, node: _Optional[str] = ..., epoch: _Optional[int] = ..., revoked_unix: _Optional[float] = ..., revoked_by: _Optional[str] = ..., until_unix: _Optional[float] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("kind", "namespace", "name", "spec_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    spec_json: str
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...
