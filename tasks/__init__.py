"""lmms-vg's lmms-eval tasks: one folder per task family, each a YAML plus a short utils.py."""
