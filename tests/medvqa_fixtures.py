"""Tiny copies of the six VQA sources, in their published columns and file layouts."""

import csv
import io
import json
import zipfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image


def img(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    img(seed).save(buf, format="JPEG")
    return buf.getvalue()


def parquet_split(root: Path, rows: dict) -> Path:
    """HF parquet layout: data/test-00000-of-00001.parquet with an Image column."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    ds.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def vqa_rad(root: Path) -> Path:  # flaviagiammarino/vqa-rad: image, question, answer
    return parquet_split(
        root,
        {
            "image": [img(i) for i in range(4)],
            "question": ["is there a fracture?", "is the liver enlarged?", "where is the lesion?", "is this a ct?"],
            "answer": ["yes", "no", "left lobe", "Yes"],
        },
    )


def pathvqa(root: Path) -> Path:  # flaviagiammarino/path-vqa: same columns
    return parquet_split(
        root,
        {
            "image": [img(10 + i) for i in range(3)],
            "question": ["is this necrosis?", "what is shown?", "are the cells malignant?"],
            "answer": ["yes", "granuloma", "no"],
        },
    )


def slake(root: Path) -> Path:  # BoKelvin/SLAKE: test.json + imgs.zip with imgs/<img_name>
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "img_id": 1,
            "img_name": "xmlab1/source.jpg",
            "question": "Is the lung healthy?",
            "answer": "No",
            "q_lang": "en",
            "location": "Lung",
            "modality": "X-Ray",
            "answer_type": "CLOSED",
            "base_type": "vqa",
            "content_type": "Abnormality",
            "triple": ["vhead", "_", "_"],
            "qid": 11,
        },
        {
            "img_id": 2,
            "img_name": "xmlab2/source.jpg",
            "question": "Which side is the lesion on?",
            "answer": "Left",
            "q_lang": "en",
            "location": "Lung",
            "modality": "CT",
            "answer_type": "CLOSED",
            "base_type": "vqa",
            "content_type": "Position",
            "triple": ["vhead", "_", "_"],
            "qid": 12,
        },
        {
            "img_id": 2,
            "img_name": "xmlab2/source.jpg",
            "question": "Does the image contain the liver?",
            "answer": "Yes",
            "q_lang": "en",
            "location": "Abdomen",
            "modality": "CT",
            "answer_type": "CLOSED",
            "base_type": "vqa",
            "content_type": "Organ",
            "triple": ["vhead", "_", "_"],
            "qid": 13,
        },
        {
            "img_id": 2,
            "img_name": "xmlab2/source.jpg",
            "question": "What organ is shown?",
            "answer": "Liver",
            "q_lang": "en",
            "location": "Abdomen",
            "modality": "CT",
            "answer_type": "OPEN",
            "base_type": "vqa",
            "content_type": "Organ",
            "triple": ["vhead", "_", "_"],
            "qid": 14,
        },
        {
            "img_id": 2,
            "img_name": "xmlab2/source.jpg",
            "question": "图片中有肝脏吗?",
            "answer": "是",
            "q_lang": "zh",
            "location": "Abdomen",
            "modality": "CT",
            "answer_type": "CLOSED",
            "base_type": "vqa",
            "content_type": "Organ",
            "triple": ["vhead", "_", "_"],
            "qid": 15,
        },
    ]
    (root / "test.json").write_text(json.dumps(rows, ensure_ascii=False))
    with zipfile.ZipFile(root / "imgs.zip", "w") as zf:
        zf.writestr("imgs/xmlab1/source.jpg", jpeg_bytes(20))
        zf.writestr("imgs/xmlab2/source.jpg", jpeg_bytes(21))
    return root


def pmc_vqa(root: Path) -> Path:  # xmcmic/PMC-VQA: test_clean.csv + images.zip with figures/<Figure_path>
    root.mkdir(parents=True, exist_ok=True)
    fields = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    rows = [
        ["PMC1_F1.jpg", "What imaging modality is used?", "CT", "A:MRI", "B:CT", "C:X-ray", "D:Ultrasound", "B"],
        ["PMC2_F2.jpg", "Where is the mass?", "Left kidney", "A:Left kidney", "B:Right kidney", "C:Liver", "D:Spleen", "A"],
        ["PMC3_F3.jpg", "Missing figure?", "Yes", "A:Yes", "B:No", "C:Maybe", "D:Unknown", "A"],
    ]
    with open(root / "test_clean.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        w.writerows(rows)
    with zipfile.ZipFile(root / "images.zip", "w") as zf:
        zf.writestr("figures/PMC1_F1.jpg", jpeg_bytes(30))
        zf.writestr("figures/PMC2_F2.jpg", jpeg_bytes(31))
    return root


def omnimedvqa(root: Path) -> Path:  # QA_information/Open-access/<set>.json + Images/
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True, exist_ok=True)
    (root / "Images" / "set1").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        img(40 + i).save(root / "Images" / "set1" / f"{i}.png")
    base = {"dataset": "set1", "question_type": "Modality Recognition"}
    rows = [
        {
            **base,
            "question_id": "q0",
            "question": "What modality is this?",
            "gt_answer": "CT",
            "image_path": "Images/set1/0.png",
            "option_A": "CT",
            "option_B": "MRI",
            "modality_type": "CT(Computed Tomography)",
        },
        {
            **base,
            "question_id": "q1",
            "question": "What modality is this?",
            "gt_answer": "Fundus",
            "image_path": "Images/set1/1.png",
            "option_A": "OCT",
            "option_B": "Fundus",
            "option_C": "X-ray",
            "option_D": "CT",
            "modality_type": "Fundus Photography",
        },
        {
            **base,
            "question_id": "q2",
            "question": "Bad answer?",
            "gt_answer": "Ultrasound",
            "image_path": "Images/set1/2.png",
            "option_A": "CT",
            "option_B": "MRI",
            "modality_type": "CT(Computed Tomography)",
        },
        {
            **base,
            "question_id": "q3",
            "question": "Missing image?",
            "gt_answer": "CT",
            "image_path": "Images/set1/missing.png",
            "option_A": "CT",
            "option_B": "MRI",
            "modality_type": "MR (Mag-netic Resonance Imaging)",
        },
        {
            **base,
            "question_id": "q4",
            "question": "No options?",
            "gt_answer": "CT",
            "image_path": "Images/set1/3.png",
            "modality_type": "X-Ray",
        },
    ]
    (qa / "set1.json").write_text(json.dumps(rows))
    return root


MMMU_README = (
    "---\nconfigs:\n"
    + "".join(
        f"- config_name: {s}\n  data_files:\n  - split: validation\n    path: {s}/validation-*\n"
        for s in ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health")
    )
    + "---\n"
)


def mmmu(root: Path) -> Path:  # MMMU/MMMU: one config per subject, <Subject>/validation-*.parquet, image_1..image_7
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(MMMU_README)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "options": datasets.Value("string"),
            "explanation": datasets.Value("string"),
            **{f"image_{k}": datasets.Image() for k in range(1, 8)},
            "img_type": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "topic_difficulty": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "subfield": datasets.Value("string"),
        }
    )
    for k, subject in enumerate(
        ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health")
    ):
        two_images = subject == "Clinical_Medicine"  # its first item shows two images, referred to in the text
        rows = {
            "id": [f"validation_{subject}_1", f"validation_{subject}_2"],
            "question": [
                "Compare <image 1> with <image 2>. Which structure changed?" if two_images else "<image 1> Which structure is shown?",
                "What is the dose?",
            ],
            "options": ["['Heart', 'Liver', 'Kidney']", "[]"],
            "explanation": ["", ""],
            "image_1": [img(50 + k), None],
            "image_2": [img(70 + k, size=(40, 30)) if two_images else None, None],
            **{f"image_{j}": [None, None] for j in range(3, 8)},
            "img_type": ["['Photos']", "[]"],
            "answer": ["B", "5 mg"],
            "topic_difficulty": ["Easy", "Medium"],
            "question_type": ["multiple-choice", "open"],
            "subfield": ["Anatomy", "Dosing"],
        }
        (root / subject).mkdir(exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / subject / "validation-00000-of-00001.parquet"))
    return root


def bundle(root: Path) -> Path:
    """HuatuoGPT-Vision's Medical_Multimodal_Evaluation_Data as its eval.py reads it.

    One JSON list; rows have ``question``, ``options`` (a list, or a string holding one: eval.py runs
    ``ast.literal_eval`` on strings), ``answer`` (the option text, ``?`` where unknown), ``image`` (paths
    relative to the JSON's folder, several for multi-image items), ``dataset`` and ``subset``.
    """
    (root / "images" / "mmmu").mkdir(parents=True, exist_ok=True)
    for name, seed in (("vqarad_1.jpg", 60), ("omni_1.png", 61), ("omni_2.png", 62), ("slake_1.jpg", 63)):
        img(seed).save(root / "images" / name)
    img(64, size=(40, 30)).save(root / "images" / "mmmu" / "a_1.png")
    img(65, size=(30, 40)).save(root / "images" / "mmmu" / "a_2.png")
    rows = [
        {
            "question": "Is there a fracture?",
            "options": ["yes", "no"],
            "answer": "yes",
            "image": ["images/vqarad_1.jpg"],
            "dataset": "VQA-RAD_test",
            "subset": "",
        },
        {
            "question": "Which organ?",
            "options": ["Liver", "Lung", "Heart"],
            "answer": "Lung",
            "image": ["images/slake_1.jpg"],
            "dataset": "SLAKE_test",
            "subset": "",
        },
        {
            "question": "Is it normal?",
            "options": ["yes", "no"],
            "answer": "?",
            "image": ["images/slake_1.jpg"],
            "dataset": "SLAKE_test",
            "subset": "",
        },
        {
            "question": "Which modality is this?",
            "options": ["CT", "MRI", "OCT", "X-ray"],
            "answer": "OCT",
            "image": ["images/omni_1.png"],
            "dataset": "OmniMedVQA",
            "subset": "Optical Coherence Tomography",
        },
        {
            "question": "What is shown?",
            "options": "['Retina', 'Lung', 'Liver']",
            "answer": "Retina",
            "image": ["images/omni_2.png"],
            "dataset": "OmniMedVQA",
            "subset": "Fundus Photography",
        },
        {
            "question": "<image 1> and <image 2> show the same patient. What changed?",
            "options": "['The lesion grew', 'Nothing', 'The lesion shrank']",
            "answer": "The lesion grew",
            "image": ["images/mmmu/a_1.png", "images/mmmu/a_2.png"],
            "dataset": "MMMU_Medical_Validation",
            "subset": "validation_Clinical_Medicine",
        },
    ]
    (root / "medical_multimodel_evaluation_data.json").write_text(json.dumps(rows))
    return root


def all_sources(tmp: Path) -> dict[str, str]:
    """Write every source; return the environment that points lmms-vg at them."""
    return {
        "LMMS_VG_VQA_RAD": str(vqa_rad(tmp / "vqa-rad")),
        "LMMS_VG_PATHVQA": str(pathvqa(tmp / "path-vqa")),
        "LMMS_VG_SLAKE": str(slake(tmp / "SLAKE")),
        "LMMS_VG_PMC_VQA": str(pmc_vqa(tmp / "PMC-VQA")),
        "LMMS_VG_OMNIMEDVQA_ROOT": str(omnimedvqa(tmp / "OmniMedVQA")),
        "LMMS_VG_MMMU": str(mmmu(tmp / "MMMU")),
    }
