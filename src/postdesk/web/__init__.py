"""The web UI (server-rendered, Jinja2 + htmx) and the REST API."""
