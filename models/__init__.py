"""lmms-eval model wrappers for lmms-vg (thin: the work is in :mod:`lmms_vg`)."""
