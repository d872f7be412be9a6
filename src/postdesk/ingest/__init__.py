"""The inbound pipeline: stored raw mail → named steps → a ticket, a follow-up, or quarantine."""
