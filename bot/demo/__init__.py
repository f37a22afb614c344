"""Fakes of the services at wabot's network edge (OpenAI, Twilio), served on loopback.

Used by the demo (`wabot serve --demo`), by the tests and by the benchmarks.
"""
