"""``make bench``: every benchmark, each figure next to a baseline measured in the same run."""

from __future__ import annotations

import sys

from bench import ingest, latency, outbound, ticket_list, web


def main() -> int:
    results = [
        ingest.print_table(ingest.run()),
        outbound.print_table(outbound.run()),
        latency.print_table(latency.run()),
        ticket_list.print_table(ticket_list.run()),
        web.print_table(web.run()),
    ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
