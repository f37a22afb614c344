"""Telemetry of wabot: traces, metrics, structured logs and their analysis."""
