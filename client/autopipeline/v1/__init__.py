"""Generated autopipeline.v1 stubs; regenerate with `python scripts/generate_stubs.py`, never edit."""
