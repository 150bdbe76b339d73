"""Every prompt text and chat template lmms-vg uses, in one place (SPEC sections 1 and 4).

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

# chat templates of the presets (the messages hold the image placeholders and the text)
HUATUO_TEMPLATE = "{% for message in messages %}<|user|>\n{{ message['content'] }}\n<|assistant|>\n{% endfor %}"
MISTRAL_INST_TEMPLATE = "{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}"
# LLaVA-Tri (LLaVA-Med++): the MedTrinity codebase's ``conv_llama3`` (SeparatorStyle.MPT, sep <|eot_id|>)
LLAMA3_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endfor %}"
)
# VILA's ``llama_3`` conversation (SeparatorStyle.LLAMA_3), which VILA picks for model paths naming "llama3" (VILA-M3)
VILA_LLAMA3_TEMPLATE = (
    "{% for message in messages %}<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endfor %}"
)
# InternVL's ``Hermes-2`` conversation (SeparatorStyle.MPT), the template InternVL-Chat-V1-2 (MedRegA's base) names
HERMES2_TEMPLATE = (
    "{% for message in messages %}<|im_start|>system\n你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。<|im_end|><|im_start|>user\n{{ message['content'] }}<|im_end|><|im_start|>assistant\n{% endfor %}"
)
VICUNA_TEMPLATE = (
    "{% for message in messages %}A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: {{ message['content'] }} ASSISTANT:{% endfor %}"
)


def open_question(question: str) -> str:
    """An open-ended VQA prompt: the question, then the short-answer instruction on its own line."""
    return f"{question.strip()}\n{SHORT_ANSWER.strip()}"
