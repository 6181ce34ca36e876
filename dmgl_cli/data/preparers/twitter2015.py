"""Twitter2015 (Yu & Jiang 2019, the TomBERT release): target-oriented sentiment of tweets with images (§4.1).

Raw layout (the public distribution)::

    <raw>/train.tsv  <raw>/dev.tsv  <raw>/test.tsv
        index<TAB>#1 Label<TAB>#2 ImageID<TAB>#3 String<TAB>#3 String      (header row)
        0<TAB>2<TAB>1860693.jpg<TAB>RT @user : $T$ is great<TAB>Obama
    <raw>/twitter2015_images/<ImageID>

The first String is the sentence with ``$T$`` where the target goes, the second the target. Labels 0, 1, 2 =
negative, neutral, positive. Splits: 3,179 train / 1,122 val (dev.tsv) / 1,037 test. Fields are tab-separated
with no quoting (tweets contain quotes).

Text input (``-o text_input=``): ``pair`` (default) tokenises the sentence with ``$T$`` replaced by the target,
paired with the target as the second segment — the usual input of BERT aspect-sentiment models; ``sentence`` the
substituted sentence alone; ``raw`` keeps ``$T$`` in the sentence and pairs it with the target, as TomBERT does.
Stored: ``text`` int64 [2, 128] (``--text-model``'s tokenizer, default bert-base-uncased) and ``image`` uint8
[224, 224, 3]. For the CLIP recipe (``twitter2015-clip``, §4.5) the text is CLIP's tokens instead:
``--text-model openai/clip-vit-base-patch32 -o max_tokens=77`` (a pair becomes ``<bos> sentence <eos> <eos>
target <eos>``). The manifest's ``extra.tokenizer`` records which tokenizer it was, and training refuses a text
encoder that reads another tokenizer's ids. A malformed line stops the run with its file
and line number (or is recorded with ``--skip-bad``); so does a missing image (TomBERT substitutes a fixed image;
we do not invent data).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from dmgl_cli.data.preparers import driver
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.data.preparers.common import (
    check_layout,
    choice,
    raw_folder,
    read_text_file,
    reject,
    text_image_plan,
)
from dmgl_cli.errors import DmglError

NAME = "twitter2015"
VERSION = "1"
DESCRIPTION = "Twitter2015 (TomBERT): 3 sentiment classes, text (BERT or CLIP tokens) + image; 3,179 / 1,122 / 1,037"
CLASSES = ["negative", "neutral", "positive"]
FILES = {"train": "train.tsv", "val": "dev.tsv", "test": "test.tsv"}
HEADER = ["index", "#1 Label", "#2 ImageID", "#3 String", "#3 String"]
IMAGES = "twitter2015_images"
OPTIONS = {
    "text_model": "bert-base-uncased",  # tokenizer: local folder or hub id (or --text-model)
    "max_tokens": 128,
    "image_size": 224,
    "text_input": "pair",  # pair | sentence | raw (see the module docstring)
    "image_folder": IMAGES,
}
LAYOUT = f"""  train.tsv, dev.tsv, test.tsv   header: {chr(9).join(HEADER)!r}
  {IMAGES}/<ImageID>              e.g. {IMAGES}/1860693.jpg"""


def parse_row(fields: list[str]) -> tuple[int, str, str, str]:
    """(label, image id, sentence, target); ValueError with the reason if malformed."""
    if len(fields) != 5:
        raise ValueError(
            f"has {len(fields)} tab-separated fields, expected 5 (index, label, image id, sentence, target)"
        )
    _, label, image, sentence, target = (f.strip() for f in fields)
    if label not in ("0", "1", "2"):
        raise ValueError(f"has label {label!r}, not 0, 1 or 2")
    if not image or "/" in image or "\\" in image or image.startswith("."):
        raise ValueError(f"has image id {image!r}, not a file name")
    if not sentence:
        raise ValueError("has an empty sentence")
    return int(label), image, sentence, target


def prepare(job: PrepareJob) -> dict[str, Any]:
    raw = raw_folder(job, NAME, LAYOUT)
    images = job.option("image_folder", str)
    check_layout(raw, [*FILES.values(), f"{images}/"], NAME, LAYOUT)
    text_input = choice(job, "text_input", ("pair", "sentence", "raw"))
    entries: dict[str, list[dict[str, Any]]] = {}
    known_bad: list[dict[str, Any]] = []
    for split, name in FILES.items():
        path = raw / name
        lines = list(csv.reader(io.StringIO(read_text_file(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
        if not lines or [c.strip() for c in lines[0]] != HEADER:
            found = "\t".join(lines[0]) if lines else "an empty file"
            raise DmglError(f"{path}: the first line must be the header {chr(9).join(HEADER)!r}, found {found!r}")
        rows = []
        for number, fields in enumerate(lines[1:], start=2):
            if not "".join(fields).strip():
                continue
            try:
                label, image, sentence, target = parse_row(fields)
            except ValueError as exc:
                reject(job, known_bad, split=split, ident=f"{name}:{number}", path=f"{path}:{number}", reason=str(exc))
                continue
            substituted = sentence.replace("$T$", target)
            row = {"id": f"{name}:{number}:{image}", "label": label, "image": str(raw / images / image)}
            if text_input == "pair":
                row.update(text=substituted, pair=target)
            elif text_input == "sentence":
                row.update(text=substituted)
            else:
                row.update(text=sentence, pair=target)
            rows.append(row)
        entries[split] = rows
    plan = text_image_plan(job, entries, CLASSES, known_bad, {"text_input": text_input})
    return driver.run(job, plan, preparer=NAME, version=VERSION)
