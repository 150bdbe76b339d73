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

# Chat templates of the presets (the messages hold the image placeholders and the text), each as its model's original
# code builds the prompt; tests/fixtures/chat_templates.json holds the prompts that code gives (repository, path, commit).
# HuatuoGPT-Vision's cli.py (preprocess_huatuo): the user turn stripped, between <|user|> and <|assistant|> lines
HUATUO_TEMPLATE = "{% for message in messages %}<|user|>\n{{ message['content'] | trim }}\n<|assistant|>\n{% endfor %}"
# LLaVA-Med's ``mistral_instruct`` (SeparatorStyle.LLAMA_2, no system); its model_vqa.py strips the question
MISTRAL_INST_TEMPLATE = "{% for message in messages %}[INST] {{ message['content'] | trim }} [/INST]{% endfor %}"
# LLaVA-Tri (LLaVA-Med++): the MedTrinity codebase's ``conv_llama3`` (SeparatorStyle.MPT, sep <|eot_id|>)
LLAMA3_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endfor %}"
)
# VILA's ``llama_3`` conversation (SeparatorStyle.LLAMA_3): VILA-M3-8B's (MONAI's m3-vila8b.sh --version llama_3)
VILA_LLAMA3_TEMPLATE = (
    "{% for message in messages %}<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endfor %}"
)
# ``Hermes-2`` (SeparatorStyle.MPT) as MedRegA's own src/internvl/conversation.py and InternVL-Chat-V1-2 define it:
# system message "Answer the questions." (the Chinese one came with InternVL 2.0)
HERMES2_TEMPLATE = (
    "{% for message in messages %}<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{{ message['content'] }}"
    "<|im_end|><|im_start|>assistant\n{% endfor %}"
)
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
