"""Captioned image sets for fine-tuning (`dreamlora finetune DATA`): (image, caption) rows from any of three forms.

- a folder of images, each with a same-named `.txt` caption (`03.jpg` + `03.txt`);
- a folder with `metadata.jsonl` or `metadata.csv` whose rows name an image (`file_name`, relative to the
  folder) and its caption (`--caption-column`, `text` by default): the imagefolder convention of the
  Hugging Face `datasets` library;
- a `datasets` dataset: a `save_to_disk` folder, parquet file(s), or a hub id, with `--image-column` and
  `--caption-column`. It is read with the `datasets` library; images stay encoded (their bytes) until the
  preflight and the latent cache decode them.

Every form gives the same `CaptionedImage` rows in the same order (file name order for folders, row order
for metadata and datasets), so one set written in each form trains identically. A row that cannot be used
(a missing or empty caption, a missing file, a column that does not exist) is a DataError naming the row or
file; undecodable and too-small images are the preflight's (dreamlora.preflight), which names them too.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import DataError
from .preflight import PreflightReport

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMN = "file_name"  # the imagefolder convention's image column in metadata files
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclass(frozen=True)
class CaptionedImage:
    """One training row: where its image is (a file, or the encoded bytes of a dataset row) and its caption."""

    name: str  # for messages: the file name, or 'row 17' of a dataset
    caption: str
    path: Path | None = None  # the image file, when it is one
    data: bytes | None = None  # the encoded image (PNG, JPEG, ...) of a dataset row

    def open(self) -> Image.Image:
        """The image as RGB, decoded exactly as training photos are (EXIF orientation, alpha on white).

        Raises:
            DataError: naming the row or file when it cannot be decoded.
        """
        from .preflight import _decode, _Unreadable

        try:
            return _decode(self.path or Path(self.name), self.data)[0]
        except _Unreadable as exc:
            raise DataError(f"image '{self.name}' {exc}. {exc.advice}") from exc

    def digest(self) -> str:
        """SHA-256 of the image's encoded bytes: a renamed file or a re-saved dataset is the same image."""
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        from .identity import file_digest

        return file_digest(self.path)


def read_captioned(source: str | Path, *, image_column: str = "image",
                   caption_column: str = "text") -> list[CaptionedImage]:
    """Every (image, caption) row of `source`, in one of the three forms (see the module's docstring).

    Args:
        source: a folder, a .parquet file, or a hub id of a `datasets` dataset.
        image_column, caption_column: the columns of a dataset (and the caption column of metadata files).

    Raises:
        DataError: the source does not exist or holds no image, or a row's caption is missing or empty, its
            file is missing, or a column does not exist: each bad row named, all at once.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        metadata = [path / name for name in METADATA_FILES if (path / name).is_file()]
        if metadata:
            return _from_metadata(path, metadata[0], caption_column)
        if any((path / name).is_file() for name in SAVED_DATASET_FILES):
            return _from_dataset(_load_saved(path), str(path), image_column, caption_column)
        parquet = sorted(path.glob("*.parquet")) or sorted(path.glob("data/*.parquet"))
        if parquet:
            return _from_dataset(_load_parquet(parquet), str(path), image_column, caption_column)
        return _from_caption_files(path)
    if path.is_file() and path.suffix == ".parquet":
        return _from_dataset(_load_parquet([path]), str(path), image_column, caption_column)
    if path.exists():
        raise DataError(f"DATA '{source}' is a file but not a .parquet dataset: give a folder of captioned images, "
                        "a folder with metadata.jsonl/metadata.csv, a save_to_disk folder or parquet files.")
    if _looks_like_hub_id(str(source)):
        return _from_dataset(_load_hub(str(source)), str(source), image_column, caption_column)
    raise DataError(f"DATA '{source}' does not exist. Check the path (or give a hub id such as 'user/dataset').")


# ----------------------------------------------------------------------------------------------
# Folders


def _from_caption_files(folder: Path) -> list[CaptionedImage]:
    from .preflight import list_image_files, read_caption

    paths, _skipped = list_image_files(folder, "image")  # hidden and non-image files are passed over
    rows, missing = [], []
    for path in paths:
        caption = read_caption(path.with_suffix(".txt"))
        if caption is None:
            missing.append(path.name)
            continue
        rows.append(CaptionedImage(path.name, caption, path=path))
    if missing:
        raise DataError(f"image folder '{folder}': {len(missing)} of {len(paths)} images have no caption (a missing "
                        f"or empty .txt beside them): {_listed(missing)}. Write a caption for each image (e.g. "
                        f"{Path(missing[0]).stem}.txt), remove them, or give a metadata.jsonl with a 'text' column.")
    return rows


def _from_metadata(folder: Path, metadata: Path, caption_column: str) -> list[CaptionedImage]:
    from .config import prompt_problem

    records = _read_metadata(metadata)
    if not records:
        raise DataError(f"'{metadata}' has no rows. Add a row for each image ({FILE_COLUMN} and {caption_column}).")
    columns = set(records[0][1])
    for column in (FILE_COLUMN, caption_column):
        if column not in columns:
            flag = " (flag --caption-column)" if column == caption_column else ""
            raise DataError(f"'{metadata}' has no column '{column}'{flag}; its columns are "
                            f"{', '.join(sorted(columns))}.")
    rows, problems = [], []
    for line, record in records:
        where = f"row {line} ({record.get(FILE_COLUMN) or 'no file name'})"
        name, caption = record.get(FILE_COLUMN), record.get(caption_column)
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where} has no {FILE_COLUMN}")
            continue
        image = (folder / name).resolve()
        if folder.resolve() not in image.parents:  # '../x.jpg' would read outside the data folder
            problems.append(f"{where}: the file is outside the folder")
            continue
        if not image.is_file():
            problems.append(f"{where}: the file does not exist")
            continue
        text = " ".join(caption.split()) if isinstance(caption, str) else ""
        if not text:
            problems.append(f"{where} has {'no' if caption is None else 'an empty'} caption in '{caption_column}'")
            continue
        if prompt_problem(text):
            problems.append(f"{where}: the caption {prompt_problem(text)}")
            continue
        rows.append(CaptionedImage(name, text, path=image))
    if problems:
        raise DataError(f"'{metadata}': {len(problems)} of {len(records)} rows cannot be used: "
                        f"{_listed(problems)}. Fix or remove those rows.")
    return rows


def _read_metadata(metadata: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a metadata.jsonl or metadata.csv."""
    try:
        text = metadata.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"'{metadata}' cannot be read as UTF-8 text ({exc}). Save it as UTF-8.") from exc
    if metadata.suffix == ".csv":
        return [(i + 2, dict(row)) for i, row in enumerate(csv.DictReader(text.splitlines()))]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"'{metadata}' line {number} is not JSON ({exc.msg}). Fix the line.") from None
        if not isinstance(row, dict):
            raise DataError(f"'{metadata}' line {number} is not a JSON object. Write one object a line.")
        rows.append((number, row))
    return rows


# ----------------------------------------------------------------------------------------------
# `datasets` datasets


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading a datasets dataset needs the 'datasets' package: pip install datasets") from None
    datasets.disable_progress_bars()
    return datasets


def _load_saved(folder: Path):
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001  (datasets raises several kinds for a damaged folder)
        raise DataError(f"'{folder}' looks like a save_to_disk dataset but cannot be read: {exc}") from exc
    return _train_split(loaded, str(folder))


def _load_parquet(files: list[Path]):
    datasets = _datasets()
    try:
        return datasets.Dataset.from_parquet([str(f) for f in files], keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"parquet file(s) {_listed([f.name for f in files])} cannot be read: {exc}") from exc


def _load_hub(repo_id: str):
    datasets = _datasets()
    try:
        return _train_split(datasets.load_dataset(repo_id, split="train"), repo_id)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001  (offline, unknown repo, gated: all mean "cannot be loaded")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"dataset '{repo_id}' cannot be loaded from the hub ({first}). Check the id and the "
                        "network, or download it and give the folder.") from exc


def _train_split(loaded, where: str):
    if hasattr(loaded, "column_names") and isinstance(loaded.column_names, list):
        return loaded
    splits = list(loaded)
    if "train" not in splits:
        raise DataError(f"dataset '{where}' has no 'train' split (it has {', '.join(splits)}).")
    return loaded["train"]


def _from_dataset(dataset, where: str, image_column: str, caption_column: str) -> list[CaptionedImage]:
    columns = list(dataset.column_names)
    for column, flag in ((image_column, "--image-column"), (caption_column, "--caption-column")):
        if column not in columns:
            raise DataError(f"dataset '{where}' has no column '{column}' (flag {flag}); its columns are "
                            f"{', '.join(columns)}.")
    from datasets import Image as ImageFeature

    if isinstance(dataset.features[image_column], ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))  # keep the bytes: decoded later
    from .config import prompt_problem

    rows, problems = [], []
    for i, row in enumerate(dataset.select_columns([image_column, caption_column])):
        name = f"row {i}"
        data = _image_bytes(row[image_column], where)
        caption = row[caption_column]
        text = " ".join(caption.split()) if isinstance(caption, str) else ""
        if data is None:
            problems.append(f"{name} has no image in '{image_column}'")
        elif not text:
            problems.append(f"{name} has {'no' if caption is None else 'an empty'} caption in '{caption_column}'")
        elif prompt_problem(text):
            problems.append(f"{name}: the caption {prompt_problem(text)}")
        else:
            rows.append(CaptionedImage(name, text, data=data))
    if problems:
        raise DataError(f"dataset '{where}': {len(problems)} of {len(dataset)} rows cannot be used: "
                        f"{_listed(problems)}. Fix or remove those rows.")
    if not rows:
        raise DataError(f"dataset '{where}' has no rows.")
    return rows


def _image_bytes(value, where: str) -> bytes | None:
    """The encoded image of a dataset cell: an Image feature's {bytes, path}, raw bytes or a file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else Path(where) / value
        return path.read_bytes() if path.is_file() else None
    return None


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def _listed(items: list[str], limit: int = 10) -> str:
    shown = "; ".join(f"'{item}'" if " " not in item else item for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------
# Preflight: every row's image decoded before any model loads, as `train` checks its photos


def preflight_captioned(source: str | Path, rows: list[CaptionedImage], resolution: int | None):
    """Decode and size-check every row's image (dreamlora.preflight's rules: unreadable, too small, duplicates).

    Returns:
        A CaptionedReport (a PreflightReport) whose `usable_rows` are the rows training uses, in order.
    """
    from .preflight import _check_file, _mark_duplicates

    files = [_check_file(row.path or Path(row.name), resolution, captions=False, data=row.data) for row in rows]
    _mark_duplicates([f for f in files if f.pixel_hash is not None and f.status != "error"])
    return CaptionedReport(Path(str(source)), "image", resolution, files, rows)


class CaptionedReport(PreflightReport):
    """A preflight report of captioned rows, which need not be files (dataset rows)."""

    def __init__(self, folder: Path, role: str, resolution: int | None, files: list, rows: list[CaptionedImage]):
        super().__init__(folder, role, resolution, files)
        self.rows = rows

    @property
    def usable_rows(self) -> list[CaptionedImage]:
        """The rows training uses (ok or warning), in their order."""
        return [row for row, f in zip(self.rows, self.files) if f.status in ("ok", "warning")]

    def messages(self) -> list[str]:
        return [f"image '{row.name}' {note}" for row, f in zip(self.rows, self.files) if f.status == "warning"
                for note in f.notes]

    def raise_for_errors(self) -> None:
        bad = [(row, f) for row, f in zip(self.rows, self.files) if f.status == "error"]
        if bad:
            listed = _listed([f"'{row.name}' {', and '.join(f.notes)}" for row, f in bad])
            raise DataError(f"DATA '{self.folder}': {len(bad)} of {len(self.rows)} images cannot be used: "
                            f"{listed}. Replace or remove them.")
