"""SPIFFE workload identities: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]{0,253}[a-z0-9])?$")


class IdentityError(ValueError):
    """A string that is not a SPIFFE ID of the form the mesh issues."""


def check_dns_label(value: str, what: str) -> str:
    if not _LABEL.match(value):
        raise IdentityError(
            f"{what} {value!r} is not a DNS label (lower case letters, digits and '-', at most 63)"
        )
    return value


def check_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.match(value):
        raise IdentityError(
            f"trust domain {value!r} is not valid (lower case letters, digits, '-', '.', '_')"
        )
    return value


@dataclass(frozen=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        check_dns_label(self.namespace, "namespace")
        check_dns_label(self.service_account, "service account")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> Identity:
        if not uri.startswith("spiffe://"):
            raise IdentityError(f"{uri!r} is not a SPIFFE ID: it must start with spiffe://")
        rest = uri[len("spiffe://"):]
        parts = rest.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(
                f"{uri!r} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        return cls(parts[0], parts[2], parts[4])

    def sni(self) -> str:
        """The TLS server name a client sends to ask a node proxy for this identity's certificate."""
        return f"{self.service_account}.{self.namespace}.sa.{self.trust_domain}"
