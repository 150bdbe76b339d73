"""The six medical VQA benchmarks (SPEC section 4), each from its published schema, as uniform docs.

Doc fields: ``id``, ``benchmark``, ``question``, ``options`` (closed items), ``answer`` (option text
or open answer), ``category`` (breakdown key: modality, subject or question type), ``item_set`` (which
item set the docs are: the paper's, or another), the images as ``image`` (one, decoded), ``images``
(several, decoded), ``image_paths`` (files, in order) or ``image_zip`` + ``image_member``, and
``vg_error`` (why an item cannot be scored). Items that cannot be scored from the data alone are
left out before the model sees them (:func:`closed_docs`), counted per reason on every doc kept (``vg_left_out``).

Where each source lives (all optional but OmniMedVQA; a local folder or an HF dataset id):
``LMMS_VG_VQA_RAD``, ``LMMS_VG_SLAKE``, ``LMMS_VG_PATHVQA``, ``LMMS_VG_PMC_VQA``, ``LMMS_VG_MMMU``,
``LMMS_VG_OMNIMEDVQA_ROOT``. ``LMMS_VG_MEDVQA_SOURCE=bundle`` with ``LMMS_VG_MEDVQA_BUNDLE`` reads
HuatuoGPT-Vision's evaluation bundle instead (the paper's closed-ended item sets).
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import os
import zipfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

from .files import DataError, env_path, read_json, read_text
from .reasons import located, reason_key
from .scoring import ItemError, gold_letter
from .vqa_results import PAPER_ITEM_SET

log = logging.getLogger(__name__)

SOURCES = {
    "vqa_rad": ("LMMS_VG_VQA_RAD", "flaviagiammarino/vqa-rad"),
    "slake": ("LMMS_VG_SLAKE", "BoKelvin/SLAKE"),
    "pathvqa": ("LMMS_VG_PATHVQA", "flaviagiammarino/path-vqa"),
    "pmc_vqa": ("LMMS_VG_PMC_VQA", "xmcmic/PMC-VQA"),
    "mmmu_med": ("LMMS_VG_MMMU", "MMMU/MMMU"),
}
OMNIMEDVQA_ROOT = "LMMS_VG_OMNIMEDVQA_ROOT"
SOURCE_VAR = "LMMS_VG_MEDVQA_SOURCE"
BUNDLE_VAR = "LMMS_VG_MEDVQA_BUNDLE"
BUNDLE_ID = "FreedomIntelligence/Medical_Multimodal_Evaluation_Data"
BUNDLE_FILE = "medical_multimodel_evaluation_data.json"
MMMU_SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health")
YES_NO = ("yes", "no")


# The paper's item sets are those of HuatuoGPT-Vision's evaluation bundle (closed items per benchmark).
PAPER_ITEMS = {"vqa_rad": 251, "slake": 416, "pathvqa": 3362, "pmc_vqa": 2000, "omnimedvqa": 11124, "mmmu_med": 150}
# The item set each benchmark's own source gives (LMMS_VG_MEDVQA_SOURCE=hf); none is the paper's set.
HF_ITEM_SETS = {
    "vqa_rad": "VQA-RAD test, closed yes/no items",
    "slake": "SLAKE test, English closed yes/no items",
    "pathvqa": "PathVQA test, closed yes/no items",
    "pmc_vqa": "PMC-VQA test_clean",
    "omnimedvqa": "OmniMedVQA open-access, every QA file",
    "mmmu_med": "MMMU validation, Health & Medicine multiple-choice items with images",
}
BUNDLE_ITEM_SET = PAPER_ITEM_SET  # the bundle's items: the ones the paper reports
# Items left out before the model runs, per benchmark: reason -> count (reported in the task's ``samples``).
LEFT_OUT_FIELD = "vg_left_out"  # on each doc: JSON {reason: count} of its benchmark's items left out before the run


def _doc(**kw) -> dict:
    """A uniform doc (the fields in this module's docstring); every key present, so datasets infers one schema."""
    doc = {"options": [], "category": "", "item_set": "", "image_paths": [], "image_zip": "", "image_member": "", "vg_error": ""}
    doc.update(kw)
    return doc


def source(benchmark: str) -> str:
    var, default = SOURCES[benchmark]
    return os.environ.get(var) or default


def source_file(src: str, filename: str) -> str:
    """A file of a dataset: inside a local folder, or fetched from the HF hub (cached)."""
    local = Path(src).expanduser()
    if local.is_dir():
        path = local / filename
        if not path.exists():
            raise DataError(f"'{path}' not found: the folder must hold the files as published ({filename})")
        return str(path)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(src, filename, repo_type="dataset")
    except Exception as err:
        raise DataError(f"cannot get {filename} of {src} ({err}); download it once online, or point the setting at a local copy") from err


def _load_split(src: str, split: str, name: str | None = None):
    import datasets

    try:
        return datasets.load_dataset(src, name, split=split)
    except Exception as err:
        raise DataError(
            f"cannot load {src} split '{split}' ({err}); download it once online, or point the setting at a local copy"
        ) from err


def closed_from_yes_no(answer: str) -> tuple[list[str], str, str]:
    """VQA-RAD, SLAKE and PathVQA closed items from their own sources: yes/no answers become options."""
    a = str(answer).strip().lower()
    if a in YES_NO:
        return list(YES_NO), a, ""
    return [], str(answer), "closed item without options in this source (use LMMS_VG_MEDVQA_SOURCE=bundle)"


def _plain_image_rows(benchmark: str, closed: bool):
    """VQA-RAD and PathVQA: parquet with ``image``, ``question``, ``answer``; closed = yes/no answers."""
    ds = _load_split(source(benchmark), "test")

    def convert(row, idx):
        is_closed = str(row["answer"]).strip().lower() in YES_NO
        options, answer, error = closed_from_yes_no(row["answer"]) if closed else ([], str(row["answer"]), "")
        return _doc(
            id=f"{benchmark}_{idx}",
            benchmark=benchmark,
            question=row["question"],
            options=options,
            answer=answer,
            item_set=HF_ITEM_SETS[benchmark],
            vg_error=error,
        ) | {"keep": is_closed == closed}

    ds = ds.map(convert, with_indices=True, remove_columns=[c for c in ds.column_names if c != "image"])
    return ds.filter(lambda k: k, input_columns="keep").remove_columns("keep")


def vqa_rad(closed: bool = True):
    return _plain_image_rows("vqa_rad", closed)


def pathvqa(closed: bool = True):
    return _plain_image_rows("pathvqa", closed)


def slake(closed: bool = True) -> list[dict]:
    """SLAKE: test.json rows (English), images ``imgs/<img_name>`` inside imgs.zip; category = content_type."""
    src = source("slake")
    rows = read_json(Path(source_file(src, "test.json")))
    archive = source_file(src, "imgs.zip")
    docs = []
    for row in rows:
        if row.get("q_lang", "en") != "en" or (str(row.get("answer_type", "")).upper() == "CLOSED") != closed:
            continue
        options, answer, error = closed_from_yes_no(row["answer"]) if closed else ([], str(row["answer"]), "")
        docs.append(
            _doc(
                id=f"slake_{row.get('qid', len(docs))}",
                benchmark="slake",
                question=row["question"],
                options=options,
                answer=answer,
                category=str(row.get("content_type", "")),
                item_set=HF_ITEM_SETS["slake"],
                image_zip=archive,
                image_member=f"imgs/{row['img_name']}",
                vg_error=error,
            )
        )
    return docs


def pmc_vqa() -> list[dict]:
    """PMC-VQA test_clean.csv (2,000 items): ``Choice A``..``D`` as ``'A:text'``; images in images.zip."""
    src = source("pmc_vqa")
    archive = source_file(src, "images.zip")
    members = _zip_index(archive)
    docs = []
    with io.StringIO(read_text(source_file(src, "test_clean.csv")), newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            options = [_strip_choice(row.get(f"Choice {letter}", "")) for letter in "ABCD" if row.get(f"Choice {letter}", "").strip()]
            label = str(row.get("Answer_label", "")).strip().upper()
            answer = options["ABCD".index(label)] if label and label in "ABCD"[: len(options)] else str(row.get("Answer", "")).strip()
            member = members.get(Path(row["Figure_path"]).name, "")
            docs.append(
                _doc(
                    id=f"pmc_vqa_{i}",
                    benchmark="pmc_vqa",
                    question=row["Question"],
                    options=options,
                    answer=answer,
                    item_set=HF_ITEM_SETS["pmc_vqa"],
                    image_zip=archive,
                    image_member=member,
                    vg_error="" if member else f"image not in the archive: '{row['Figure_path']}' is not in {archive}",
                )
            )
    return docs


def _strip_choice(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] in "ABCD" and text[1] in ":.":
        return text[2:].strip()
    return text


@lru_cache(maxsize=8)
def _zip_index(archive: str) -> dict[str, str]:
    with zipfile.ZipFile(archive) as zf:
        return {Path(name).name: name for name in zf.namelist() if not name.endswith("/")}


def omnimedvqa() -> list[dict]:
    """OmniMedVQA open-access split: QA_information/Open-access/*.json; category = modality_type."""
    root = env_path(OMNIMEDVQA_ROOT, "OmniMedVQA (open-access split, a local copy)")
    qa_dir = root / "QA_information" / "Open-access"
    files = sorted(qa_dir.glob("*.json"))
    if not files:
        raise DataError(f"no *.json under {qa_dir}: {OMNIMEDVQA_ROOT} must be the OmniMedVQA folder holding QA_information/ and Images/")
    docs = []
    for path in files:
        for row in read_json(path):
            options = [row[f"option_{c}"] for c in "ABCD" if row.get(f"option_{c}") not in (None, "")]
            docs.append(
                _doc(
                    id=f"omnimedvqa_{row.get('question_id', len(docs))}",
                    benchmark="omnimedvqa",
                    question=row["question"],
                    options=options,
                    answer=row["gt_answer"],
                    category=str(row.get("modality_type", "")),
                    item_set=HF_ITEM_SETS["omnimedvqa"],
                    image_paths=[str(root / row["image_path"])],
                )
            )
    return docs


def mmmu_med():
    """MMMU Health & Medicine, validation split: multiple-choice items with an image; category = subject.

    Every image of an item (``image_1`` .. ``image_7``) is kept, in order; ``<image k>`` in the text
    stays as written, as in HuatuoGPT-Vision's evaluation (its images go first, one placeholder each).
    """
    import datasets

    parts = []
    for subject in MMMU_SUBJECTS:
        ds = _load_split(source("mmmu_med"), "validation", subject)
        ds = ds.filter(lambda t, img: t == "multiple-choice" and img is not None, input_columns=["question_type", "image_1"])
        image_columns = sorted((c for c in ds.column_names if c.startswith("image_")), key=lambda c: int(c.split("_")[1]))

        def convert(row, subject=subject, image_columns=image_columns):
            options, error = parse_options(row["options"])
            letter = str(row["answer"]).strip()
            ok = not error and len(letter) == 1 and 0 <= ord(letter) - 65 < len(options)
            return _doc(
                id=row["id"],
                benchmark="mmmu_med",
                question=row["question"],
                options=options,
                answer=options[ord(letter) - 65] if ok else letter,
                category=subject,
                item_set=HF_ITEM_SETS["mmmu_med"],
                vg_error=error or ("" if ok else f"answer is not an option letter: '{row['answer']}'"),
            ) | {"images": [row[c] for c in image_columns if row[c] is not None]}

        parts.append(ds.map(convert, remove_columns=ds.column_names))
    return datasets.concatenate_datasets(parts)


def parse_options(value) -> tuple[list[str], str]:
    """Options as published: a list, or a string holding a Python list (MMMU, some bundle rows); (options, error)."""
    if isinstance(value, str):
        if not value.strip():
            return [], ""
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [], f"options not a list: {value[:60]!r}"
    if value is None:
        return [], ""
    if not isinstance(value, (list, tuple)):
        return [], f"options not a list: a {type(value).__name__}"
    return [str(o) for o in value], ""


def bundle(benchmark: str) -> list[dict]:
    """HuatuoGPT-Vision's bundle: one JSON of closed items, as its ``eval.py`` reads them.

    Rows: ``question``, ``options`` (a list, or a string holding one), ``answer`` (option text; ``?``
    where unknown), ``image`` (relative paths, several for multi-image items), ``dataset``
    (``VQA-RAD_test``, ``OmniMedVQA``, ``MMMU_Medical_Validation``...), ``subset`` (OmniMedVQA's
    modality, MMMU's ``validation_<Subject>``): the breakdown key.
    """
    root = env_path(BUNDLE_VAR, f"HuatuoGPT-Vision's evaluation bundle ({BUNDLE_ID})")
    path = root / BUNDLE_FILE
    if not path.exists():
        raise DataError(f"{path} not found: {BUNDLE_VAR} must be the folder holding {BUNDLE_FILE} and its images")
    rows = read_json(path)
    docs = []
    for i, row in enumerate(rows):
        if bundle_benchmark(str(row.get("dataset", ""))) != benchmark:
            continue
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        options, error = parse_options(row.get("options"))
        docs.append(
            _doc(
                id=f"{benchmark}_bundle_{i}",
                benchmark=benchmark,
                question=str(row.get("question", "")),
                options=options,
                answer=str(row.get("answer", "")),
                category=str(row.get("subset") or "").removeprefix("validation_"),
                item_set=BUNDLE_ITEM_SET,
                image_paths=[str(root / p) for p in images],
                vg_error=error
                or ("" if images else "no image: the item lists none")
                or ("" if row.get("question") else "no question: the row has none"),
            )
        )
    return docs


def bundle_benchmark(name: str) -> str | None:
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    for prefix, bench in (
        ("vqarad", "vqa_rad"),
        ("slake", "slake"),
        ("pathvqa", "pathvqa"),
        ("pmc", "pmc_vqa"),
        ("omnimed", "omnimedvqa"),
        ("mmmu", "mmmu_med"),
    ):
        if key.startswith(prefix):
            return bench
    return None


def demo(shifted: bool = False) -> list[dict]:
    """The bundled synthetic multiple-choice set (category = question kind), in the source domain or the shifted one."""
    from .files import demo_dir, read_jsonl

    root = demo_dir()
    name = "demo_shifted" if shifted else "demo"
    return [
        _doc(
            id=f"{name}_vqa_{i}",
            benchmark=f"medvqa_{name}",
            question=r["question"],
            options=r["options"],
            answer=r["answer"],
            category=r["kind"],
            item_set="lmms-vg demo",
            image_paths=[str(root / r["image"])],
        )
        for i, r in enumerate(read_jsonl(root / f"vqa{'_shifted' if shifted else ''}.jsonl"))
    ]


CLOSED_LOADERS = {
    "vqa_rad": vqa_rad,
    "slake": slake,
    "pathvqa": pathvqa,
    "pmc_vqa": pmc_vqa,
    "omnimedvqa": omnimedvqa,
    "mmmu_med": mmmu_med,
    "demo": demo,
    "demo_shifted": lambda: demo(shifted=True),
}
OPEN_LOADERS = {"vqa_rad": lambda: vqa_rad(False), "slake": lambda: slake(False), "pathvqa": lambda: pathvqa(False)}


def closed_docs(benchmark: str):
    """Closed-ended docs of one benchmark from the configured source, scorable ones only (a Dataset or a list).

    Items that cannot be multiple choice or scored (no options, answer not among them, no image in
    the source...) are left out here, before the model runs, and counted per reason in each doc's ``vg_left_out``.
    """
    mode = os.environ.get(SOURCE_VAR, "hf")
    if benchmark.startswith("demo"):  # bundled with lmms-vg, whatever the source setting
        docs = CLOSED_LOADERS[benchmark]()
    elif mode == "bundle":
        docs = bundle(benchmark)
    elif mode != "hf":
        raise DataError(f"{SOURCE_VAR}={mode!r}: use 'hf' (each benchmark's own source) or 'bundle' ({BUNDLE_ID})")
    else:
        docs = CLOSED_LOADERS[benchmark]()
    return _leave_out_unscorable(benchmark, docs)


def _leave_out_unscorable(benchmark: str, docs):
    """Drop the docs the data itself says cannot be scored; count them per reason (logged and reported)."""

    def why(doc) -> str:
        if doc["vg_error"]:
            return doc["vg_error"]
        try:
            gold_letter(list(doc["options"]), doc["answer"])
        except ItemError as err:
            return str(err)
        return ""

    reasons = [why(d) for d in docs]
    counted = Counter(reason_key(r) for r in reasons if r)
    if counted:
        log.warning("%s: %d item(s) left out before the run: %s", benchmark, sum(counted.values()), dict(counted))
    keep = [i for i, r in enumerate(reasons) if not r]
    note = json.dumps(dict(counted))  # travels with every doc to the task's counts (LEFT_OUT_FIELD)
    if hasattr(docs, "select"):
        kept = docs.select(keep)
        return (
            kept.remove_columns([LEFT_OUT_FIELD]).add_column(LEFT_OUT_FIELD, [note] * len(keep))
            if LEFT_OUT_FIELD in kept.column_names
            else kept.add_column(LEFT_OUT_FIELD, [note] * len(keep))
        )
    return [{**docs[i], LEFT_OUT_FIELD: note} for i in keep]


def left_out(docs) -> dict[str, int]:
    """How many items of the docs' benchmark were left out before the run, per reason (what each doc carries)."""
    for doc in docs:
        return json.loads(doc.get(LEFT_OUT_FIELD) or "{}")
    return {}


def open_docs(benchmark: str):
    return OPEN_LOADERS[benchmark]()


def load_images(doc: dict) -> list:
    """The doc's images, in order, from wherever its source keeps them; errors name the file."""
    from .files import open_image, upright

    if doc.get("images"):  # decoded by datasets' Image feature, which turns them upright too
        return [upright(image) for image in doc["images"]]
    if doc.get("image") is not None:
        return [upright(doc["image"])]
    if doc.get("image_zip"):
        import io

        try:
            with zipfile.ZipFile(doc["image_zip"]) as zf, zf.open(doc["image_member"]) as fh:
                return [open_image(io.BytesIO(fh.read()), f"{doc['image_zip']}:{doc['image_member']}")]
        except KeyError as err:
            raise FileNotFoundError(f"image not found: '{doc['image_member']}' is not in {doc['image_zip']}") from err
    if doc.get("image_paths"):
        return [open_image(p) for p in doc["image_paths"]]
    raise FileNotFoundError(located("no image: the source gives none", str(doc.get("id"))))
