"""The scanner link: ``cytoedge serve`` (daemon), its ZeroMQ protocol v1 and the reference client.

Modules: protocol (commands, frame codec, JSON Schemas in ``schemas/``), journal (SQLite WAL),
scoring (the job-scorer Protocols), scorer_binding (the real model), config, daemon, client.
See docs/protocol.md.
"""
