"""wabot: a WhatsApp AI assistant that always answers."""

__version__ = "0.1.0"
