"""Local reference data of the domain assistants (read-only; the only files their tools open)."""
