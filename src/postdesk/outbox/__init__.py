"""Outbound mail: replies are queued with their article, then sent (and retried) by the sender."""
