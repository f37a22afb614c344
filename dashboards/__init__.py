"""Grafana dashboard for wabot: generator (generate.py), generated wabot.json and provisioning files."""
