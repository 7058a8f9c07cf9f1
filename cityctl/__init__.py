"""The composition root: the `citygrid` command line, `citygrid up` and its live view, the
supervisor, local service runners, the embedded broker and backup — the only package that
wires services together (docs/architecture.md)."""
