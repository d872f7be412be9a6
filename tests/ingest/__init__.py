"""Tests of ``postdesk.ingest`` that need no mail server: stored rows in, tickets and articles out."""
