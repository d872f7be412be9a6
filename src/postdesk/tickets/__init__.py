"""The help-desk domain: tickets, articles, customers, groups, agents and their states."""
