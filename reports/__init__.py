"""Turn run records into tables and figures."""
