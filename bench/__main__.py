"""``make bench``: every benchmark, each figure next to a baseline measured in the same run.

``python -m bench NAME …`` runs only the named ones (ingest, outbound, latency, breadth, scaleout,
ticket_list, web).
"""

from __future__ import annotations

import sys

from bench import breadth, ingest, latency, outbound, scaleout, ticket_list, web

BENCHMARKS = {
    "ingest": lambda: ingest.print_table(ingest.run()),
    "outbound": lambda: outbound.print_table(outbound.run()),
    "latency": lambda: latency.print_table(latency.run()),
    "breadth": lambda: breadth.print_table(breadth.run()),
    "scaleout": lambda: scaleout.print_table(scaleout.run()),
    "ticket_list": lambda: ticket_list.print_table(ticket_list.run()),
    "web": lambda: web.print_table(web.run()),
}


def main(names: list[str]) -> int:
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        return 2
    results = [BENCHMARKS[name]() for name in names or list(BENCHMARKS)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
