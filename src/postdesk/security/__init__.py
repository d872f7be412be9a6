"""Secrets at rest, password hashing, CSRF tokens and log redaction."""
