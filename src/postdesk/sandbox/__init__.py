"""A local stand-in for the Microsoft identity platform v2.0, for tests and ``postdesk demo``.

``SandboxDirectory`` holds tenants, users, app registrations, consents and issued grants;
``SandboxServer`` serves it over HTTPS with a private test CA so that real MSAL can sign in against it.
Every page it renders says "Postdesk sandbox — not Microsoft". ``GraphMailStore`` holds the mailboxes
its Microsoft Graph mail API serves under ``/v1.0``.
"""

from postdesk.sandbox.graph import GraphMailStore, MailboxRight
from postdesk.sandbox.identity import (
    CONTOSO_TENANT_ID,
    FABRIKAM_TENANT_ID,
    ClientCertificate,
    ClientSecret,
    RegisteredApp,
    SandboxDirectory,
    SandboxUser,
    Tenant,
    create_app,
)
from postdesk.sandbox.server import SandboxServer
from postdesk.sandbox.tls import TlsFiles, ensure_server_certificate

__all__ = [
    "CONTOSO_TENANT_ID",
    "FABRIKAM_TENANT_ID",
    "ClientCertificate",
    "ClientSecret",
    "GraphMailStore",
    "MailboxRight",
    "RegisteredApp",
    "SandboxDirectory",
    "SandboxServer",
    "SandboxUser",
    "Tenant",
    "TlsFiles",
    "create_app",
    "ensure_server_certificate",
]
