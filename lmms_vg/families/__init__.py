"""lmms-vg's model families, one module each: its adapter, its port (where transformers has no class for it), its
converter, its templates and its presets, registered by the module itself when imported.

- :mod:`.llava`: LLaVA-1.5 and the models built on it (HuatuoGPT-Vision, LLaVA-Med, LLaVA-Tri's S2 tower,
  HuatuoGPT-V-Bio's BiomedCLIP tower, the demo model);
- :mod:`.qwen2_vl`: Qwen2-VL, Qwen2.5-VL (HuatuoGPT-Vision-Qwen2.5VL, Lingshu), Qwen3-VL;
- :mod:`.vila`: VILA (VILA-M3);
- :mod:`.internvl`: InternVL-Chat (MedRegA);
- :mod:`.gemma3`: Gemma 3 (MedGemma), the worked example of adding a family (README "Adding a model").

:func:`lmms_vg.presets.load_families` imports them all; listing model ids reads their text only.
"""
