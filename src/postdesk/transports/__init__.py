"""Mail transports: they move bytes to and from Microsoft 365 and know nothing about tickets."""
