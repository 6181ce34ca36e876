"""Sarcasm (Cai et al. 2019, the HFM Twitter data): 24,635 image-text pairs, sarcastic or not (§4.1).

Raw layout (the public distribution)::

    <raw>/text/train.txt     ['<id>', '<text>', <label>]                               one list per line
    <raw>/text/valid2.txt    ['<id>', '<text>', <hashtag label>, <annotator label>]
    <raw>/text/test2.txt     (same as valid2.txt)
    <raw>/dataset_image/<id>.jpg

Lines are Python literals, parsed with ``ast.literal_eval`` (never ``eval``). Splits: 19,816 train / 2,410 val /
2,409 test. Labels: 0 non-sarcastic, 1 sarcastic. For valid/test, ``-o eval_label=annotator`` (default) takes
the last element — the label of the human annotator, which the dataset's own loader uses — and ``hashtag`` the
one derived from the original post's hashtags. ``-o hfm_filter=true`` drops the lines the HFM loader drops
(texts with the words sarcasm, sarcastic, reposting, <url>, joke(s), humour, humor, irony, ironic, exgag); off
by default, which keeps the paper's split sizes.

Stored: ``text`` int64 [2, 128] (token ids and attention mask from ``--text-model``'s tokenizer, default
bert-base-uncased) and ``image`` uint8 [224, 224, 3]. For the CLIP recipe (``sarcasm-clip``, §4.5) the text is
CLIP's tokens instead: ``--text-model openai/clip-vit-base-patch32 -o max_tokens=77`` (a ``max_tokens`` beyond the
tokenizer's own limit is refused). The manifest's ``extra.tokenizer`` records which tokenizer it was, and training
refuses a text encoder that reads another tokenizer's ids. A malformed line stops the run with its file and line
number, or with ``--skip-bad`` is recorded and left out; so is a missing or unreadable image.
"""

from __future__ import annotations

import ast
from pathlib import Path
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

NAME = "sarcasm"
VERSION = "1"
DESCRIPTION = "Sarcasm (HFM Twitter): 2 classes, text (BERT or CLIP tokens) + image; 19,816 / 2,410 / 2,409"
CLASSES = ["non-sarcastic", "sarcastic"]
FILES = {"train": "text/train.txt", "val": "text/valid2.txt", "test": "text/test2.txt"}
HFM_FILTER_WORDS = {
    "sarcasm",
    "sarcastic",
    "reposting",
    "<url>",
    "joke",
    "humour",
    "humor",
    "jokes",
    "irony",
    "ironic",
    "exgag",
}
OPTIONS = {
    "text_model": "bert-base-uncased",  # tokenizer: local folder or hub id (or --text-model)
    "max_tokens": 128,
    "image_size": 224,
    "eval_label": "annotator",  # valid/test label: annotator (last element) | hashtag (third element)
    "hfm_filter": False,  # drop the lines the HFM loader drops
}
LAYOUT = """  text/train.txt      ['<id>', '<text>', <label>]  (one per line)
  text/valid2.txt     ['<id>', '<text>', <hashtag label>, <annotator label>]
  text/test2.txt
  dataset_image/<id>.jpg"""


def parse_line(line: str, split: str, eval_label: str) -> tuple[str, str, int]:
    """(id, text, label) of one line; ValueError with the reason if it is malformed."""
    try:
        value = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"is not a Python literal list ({type(exc).__name__}: {exc})") from None
    size = 3 if split == "train" else 4
    if not isinstance(value, (list, tuple)) or len(value) != size:
        raise ValueError(
            f"must be a list of {size} elements ['<id>', '<text>', <label>"
            f"{'' if size == 3 else ', <label>'}], got {line.strip()[:80]!r}"
        )
    ident, text = value[0], value[1]
    label = value[2] if split == "train" or eval_label == "hashtag" else value[3]
    if not isinstance(ident, (str, int)) or not str(ident).strip() or not isinstance(text, str):
        raise ValueError("must start with the id and the text as strings")
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"has label {label!r}, not 0 or 1")
    return str(ident).strip(), text, int(label)


def prepare(job: PrepareJob) -> dict[str, Any]:
    raw = raw_folder(job, NAME, LAYOUT)
    check_layout(raw, [*FILES.values(), "dataset_image/"], NAME, LAYOUT)
    eval_label = choice(job, "eval_label", ("annotator", "hashtag"))
    hfm_filter = job.option("hfm_filter", bool)
    entries: dict[str, list[dict[str, Any]]] = {}
    known_bad: list[dict[str, Any]] = []
    dropped = 0
    for split, rel in FILES.items():
        path = raw / rel
        rows = []
        for number, line in enumerate(read_text_file(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                ident, text, label = parse_line(line, split, eval_label)
            except ValueError as exc:
                reject(
                    job,
                    known_bad,
                    split=split,
                    ident=f"{Path(rel).name}:{number}",
                    path=f"{path}:{number}",
                    reason=str(exc),
                )
                continue
            if hfm_filter and HFM_FILTER_WORDS & set(text.split()):
                dropped += 1
                continue
            rows.append(
                {"id": ident, "label": label, "text": text, "image": str(raw / "dataset_image" / f"{ident}.jpg")}
            )
        entries[split] = rows
    plan = text_image_plan(
        job,
        entries,
        CLASSES,
        known_bad,
        {"eval_label": eval_label, "hfm_filter": hfm_filter, "hfm_filtered_lines": dropped},
    )
    return driver.run(job, plan, preparer=NAME, version=VERSION)
