"""Postdesk: a self-hosted help desk for Microsoft 365 mailboxes."""

__version__ = "0.1.0"
