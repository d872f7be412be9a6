"""Microsoft's national clouds and the endpoints Postdesk talks to in each.

Facts from Microsoft's documentation on national cloud deployments: the identity platform host, the
Outlook resource used for IMAP/SMTP scopes, the IMAP/SMTP hosts, and Microsoft Graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from postdesk.config import Settings


@dataclass(frozen=True)
class Cloud:
    name: str
    label: str
    login_url: str
    outlook_resource: str
    imap: str
    smtp: str
    graph_url: str


CLOUDS: dict[str, Cloud] = {
    "global": Cloud(
        name="global",
        label="Global (Microsoft 365)",
        login_url="https://login.microsoftonline.com",
        outlook_resource="https://outlook.office.com",
        imap="outlook.office365.com:993",
        smtp="smtp.office365.com:587",
        graph_url="https://graph.microsoft.com",
    ),
    "usgov": Cloud(
        name="usgov",
        label="US Government (GCC High)",
        login_url="https://login.microsoftonline.us",
        outlook_resource="https://outlook.office365.us",
        imap="outlook.office365.us:993",
        smtp="smtp.office365.us:587",
        graph_url="https://graph.microsoft.us",
    ),
    "china": Cloud(
        name="china",
        label="China (operated by 21Vianet)",
        login_url="https://login.chinacloudapi.cn",
        outlook_resource="https://partner.outlook.cn",
        imap="partner.outlook.cn:993",
        smtp="smtp.partner.outlook.cn:587",
        graph_url="https://microsoftgraph.chinacloudapi.cn",
    ),
}


@dataclass(frozen=True)
class Endpoints:
    """Where this installation actually connects: the cloud's defaults with overrides applied."""

    cloud: Cloud
    login_url: str
    imap: str
    smtp: str
    graph_url: str

    @property
    def outlook_scopes(self) -> list[str]:
        # One token request may name one resource only (AADSTS28000), so IMAP and SMTP go together.
        return [
            f"{self.cloud.outlook_resource}/IMAP.AccessAsUser.All",
            f"{self.cloud.outlook_resource}/SMTP.Send",
        ]


    @property
    def graph_scopes(self) -> list[str]:
        # Delegated Graph permissions for a help desk: its own or a shared mailbox, read and send.
        return [f"{self.cloud.graph_url}/{name}" for name in GRAPH_MAIL_PERMISSIONS]

    def scopes_for(self, transport: str) -> list[str]:
        """The resource scopes a mailbox on ``transport`` ("imap" or "graph") needs its tokens for."""
        return self.graph_scopes if transport == "graph" else self.outlook_scopes


GRAPH_MAIL_PERMISSIONS = ("Mail.ReadWrite", "Mail.Send", "Mail.ReadWrite.Shared", "Mail.Send.Shared")


def endpoints_for(settings: Settings, cloud_name: str | None = None) -> Endpoints:
    cloud = CLOUDS[cloud_name or settings.microsoft_cloud]
    return Endpoints(
        cloud=cloud,
        login_url=settings.microsoft_login_url or cloud.login_url,
        imap=settings.microsoft_imap or cloud.imap,
        smtp=settings.microsoft_smtp or cloud.smtp,
        graph_url=settings.microsoft_graph_url or cloud.graph_url,
    )
