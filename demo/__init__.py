"""The demo app behind `make demo`: it drives the public commands and writes a report (not part of the library)."""
