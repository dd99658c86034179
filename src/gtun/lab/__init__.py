"""gtun layer."""
