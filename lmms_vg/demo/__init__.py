"""The bundled demo: a small LLaVA trained on synthetic scenes, and demo data of the same kind."""
