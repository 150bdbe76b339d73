"""The prompt texts lmms-vg uses, in one place (SPEC sections 1 and 4), and the chat template two families share.

The task YAMLs carry their own copies as data (a user may edit a task), and test that they match.
"""

# SPEC section 1: the generic prompt whose attention normalises the question's (ViCrop's relative attention)
GENERIC_PROMPT = "Write a general description of the image."
# the answer instruction of the grounding questions (the authors' ANSWER_INSTRUCTION), after a space
SHORT_ANSWER = " Answer the question using a single word or phrase."
# HuatuoGPT-Vision's multiple-choice instruction (its eval.py), on its own line after the options
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# the answer instructions a figure label drops from a question
INSTRUCTIONS = (SHORT_ANSWER, "\n" + SHORT_ANSWER.strip(), "\n" + MC_INSTRUCTION)

# Chat templates live beside their family (lmms_vg/families/); vicuna_v1 is shared by LLaVA and VILA, so it lives here.
# tests/data/chat_templates.json holds the prompts each original's code gives (repository, path, commit).
# ``vicuna_v1`` (SeparatorStyle.TWO), the same in LLaVA and VILA: LLaVA-1.5's evaluation (--conv-mode vicuna_v1) and
# VILA-M3-13B's (MONAI's m3-vila13b.sh --version v1)
VICUNA_V1_TEMPLATE = (
    "{% for message in messages %}A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} ASSISTANT:{% endfor %}"
)


def open_question(question: str) -> str:
    """An open-ended VQA prompt: the question, then the short-answer instruction on its own line."""
    return f"{question.strip()}\n{SHORT_ANSWER.strip()}"
