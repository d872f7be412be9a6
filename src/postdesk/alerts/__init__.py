"""Mail never stops silently: what needs an admin's attention, the Alert rows, and telling admins."""
