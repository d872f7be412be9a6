"""Background work: a scheduler of named periodic jobs, run by ``postdesk worker`` or inside ``serve``."""
