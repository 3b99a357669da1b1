"""Command-line tools: `python -m fgjax.tools.convert ...`."""
