"""ttproxy: one address in front of many ttservers, speaking the same API."""
