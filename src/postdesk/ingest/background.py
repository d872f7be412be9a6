"""Starting a fetch from the web UI without making the browser wait for it."""

from __future__ import annotations

import threading

from postdesk.ingest.fetch import fetch_channel
from postdesk.runtime import Runtime


def start_fetch(runtime: Runtime, channel_id: int) -> None:
    """Fetch one mailbox in a background thread (a second request for a busy mailbox is a no-op)."""
    threading.Thread(
        target=fetch_channel, args=(runtime, channel_id), daemon=True, name=f"postdesk-fetch-{channel_id}"
    ).start()
