"""The forward passes grounding and VGRefine run, behind one interface.

:class:`Passes` (one per model, holding the per-image reference maps) opens a :class:`PassBatch`
for a batch of (image, question) pairs. The adapter decides which implementation serves it:

- :class:`SharedPrefixBatch` (``adapter.shares_prefix``, every shipped family): the image prefix
  runs once into a KV cache and every text (question, generic prompt, knocked-out generation) runs
  as a suffix on it; M-RoPE models (Qwen2-VL family) carry the prefix's position shift over;
- :class:`FullPromptBatch`: every (image, text) as a whole left-padded prompt, for a family that
  cannot split its prompt after the image; the tests hold the shared prefix equal to it.

Both offer the same four things: maps for sets of texts, the questions' maps with the generic
prompt's (from the cache where it has them), a knockout plan for the text after the image, and
generation under it. Grounding and VGRefine are each one code path on them.

Shared prefix, in detail: a batch of prompts that all begin with the same-length image prefix (template head + image
tokens) runs the vision tower and the prefix once; each suffix (question, generic reference
prompt, knocked-out generation) then runs on the cached prefix. Suffixes of different lengths
are left-padded *inside the suffix region* (``[prefix][pad][suffix]``) and position ids come
from the attention mask, so every real token sees exactly the positions and keys it would see in
an unpadded single-prompt forward.
"""

from .batches import (
    FullPromptBatch,
    PassBatch,
    Passes,
    ReferenceCache,
    SharedPrefixBatch,
    full_prompt_knockout,
    full_prompt_maps,
    last_row_maps,
    same_grid,
)
from .prefix import (
    PrefixState,
    after_prefix,
    generate_new_tokens,
    pad_suffixes,
    prefix_rows_only,
    prefix_tensor,
    prefix_with_maps,
    run_prefix,
    suffix_generate,
    suffix_inputs,
    suffix_maps,
    suffix_rows,
    truncate,
)
from .resume import Resume, can_resume, resumed_generate

__all__ = [
    "FullPromptBatch",
    "PassBatch",
    "Passes",
    "PrefixState",
    "ReferenceCache",
    "Resume",
    "SharedPrefixBatch",
    "after_prefix",
    "can_resume",
    "full_prompt_knockout",
    "full_prompt_maps",
    "generate_new_tokens",
    "last_row_maps",
    "pad_suffixes",
    "prefix_rows_only",
    "prefix_tensor",
    "prefix_with_maps",
    "resumed_generate",
    "run_prefix",
    "same_grid",
    "suffix_generate",
    "suffix_inputs",
    "suffix_maps",
    "suffix_rows",
    "truncate",
]
