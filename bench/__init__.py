"""`make bench`: a reproducible benchmark of the bot on 127.0.0.1 that writes docs/benchmarks.md.

Tests check behaviour; this measures speed. Every server runs in its own process (the bot as a real `wabot serve`,
the OpenAI simulator, the Twilio sink and an OTLP receiver), and wrk generates the load, so no measured component
shares an event loop with the load generator. Entry point: `python -m bench.run`.
"""
