"""Reading a table back: open it, search it, validate it."""
