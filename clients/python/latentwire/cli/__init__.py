"""The `latentwire` command line."""
