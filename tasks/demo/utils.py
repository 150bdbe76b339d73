"""The bundled demo tasks: grounding (true boxes, and a random-box control) and multiple-choice VQA, source and shifted domain.

The YAMLs include the VGMED and medical VQA templates, whose functions come from those folders;
only the documents differ.
"""

import datasets

from lmms_vg import vgmed_data, vqa_data


def docs_demo(_descriptor):
    return datasets.Dataset.from_list(vgmed_data.demo_grounding_docs())


def docs_demo_random(_descriptor):
    return datasets.Dataset.from_list(vgmed_data.demo_grounding_docs(random_boxes=True))


def docs_demo_shifted(_descriptor):
    return datasets.Dataset.from_list(vgmed_data.demo_grounding_docs(shifted=True))


def docs_vqa(_descriptor):
    return datasets.Dataset.from_list(vqa_data.closed_docs("demo"))


def docs_vqa_shifted(_descriptor):
    return datasets.Dataset.from_list(vqa_data.closed_docs("demo_shifted"))
