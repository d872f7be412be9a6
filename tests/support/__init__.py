"""Test helpers: real servers (PostgreSQL, the web app, Chromium) started for the suite."""
