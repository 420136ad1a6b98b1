"""Machinery shared by the dataset recipes: locate, verify, read archives safely, stage, commit, split lists.

A recipe turns the official archives of a benchmark (or their extracted trees) into a dataset root in the
``workbench-dataset/1`` layout (see :mod:`workbench.data.dataset`)::

    <root>/manifest.json        format, classes, palette, split files, plus the recipe record, the sources, the
                                split-list hashes, how the split lists were made, and the recommended evaluation
    <root>/images/...           images (copied out of the archives; hard links when the source is a tree)
    <root>/masks/...            label PNGs (palette PNG: pixel value = class index, 255 = ignore)
    <root>/splits/<name>.txt    "<image> [<mask>]" per line, relative to the root

How one preparation runs (:func:`run_recipe`):

1. *Inspect the root.* A root with a manifest written by the same recipe with the same options is verified (every
   split file matches its recorded sha256, every listed file exists) and left untouched: preparing is idempotent.
   Anything else that a recipe would overwrite (``images/``, ``masks/``, ``splits/``, ``manifest.json``) is refused
   with a message naming it; other content (the archives themselves, say) is left alone.
2. *Locate every input first* in ``--archives`` then the root, as the archive file or its extracted folder. Missing
   inputs fail at once with one message naming each archive and the directory to place it in; with
   ``download=True`` an input with a known public URL is fetched with urllib first (a network failure fails fast
   with the same advice).
3. *Verify* each archive file against the checksum published for it (constants below each recipe, with their
   source) unless ``verify=False``; a mismatch names the file, both digests and the source of the expected one.
4. *Build* into a temporary directory next to the root (``.<root>.tmp-*``), reading archive members in storage
   order (one pass, so .tgz files are read sequentially). Member names are checked: absolute paths, ``..``
   components, links and devices make the archive rejected, and every output path is computed by the recipe and
   checked to lie inside the staging directory, so nothing is ever written outside it.
5. *Commit*: the staging directory is renamed to the root (or, when the root already holds the archives, its
   entries are renamed into the root with ``manifest.json`` last). Any failure before that removes the staging
   directory, so a failed run leaves nothing half-prepared behind.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from workbench.data.dataset import MANIFEST_FORMAT, DataError, load_manifest, read_split, voc_palette  # noqa: F401

IGNORE_INDEX = 255
RESERVED = ("images", "masks", "splits", "manifest.json")
"""Top-level names a recipe writes into the root; existing ones without a matching manifest are refused."""
DOWNLOAD_TIMEOUT_S = 15.0


class RecipeError(DataError):
    """A recipe cannot run: missing or corrupt input, unsafe archive, conflicting root; the message says what to do."""


READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError)


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Requirement:
    """One input of a recipe: an official archive (or plain file) and the folders that count as its extracted form.

    Attributes:
        key: short name used by the recipe (``"voc"``, ``"sbd"``).
        filename: the official file name to look for (``VOCtrainval_11-May-2012.tar``).
        description: what it is, for messages (``"Pascal VOC 2012 trainval, 1.9 GB"``).
        md5: the published md5 of the official file, or None when none is published.
        checksum_source: where ``md5`` comes from (printed on a mismatch).
        url: public download URL, or None (e.g. registration-only datasets).
        tree_dirs: folders, relative to a search directory, that hold the extracted archive.
        tree_marker: a path that must exist inside such a folder for it to count.
        kind: ``"archive"`` (tar/tgz/zip, or an extracted tree) or ``"file"`` (a plain file read directly).
    """

    key: str
    filename: str
    description: str
    md5: str | None = None
    checksum_source: str = ""
    url: str | None = None
    tree_dirs: tuple[str, ...] = ()
    tree_marker: str = ""
    kind: str = "archive"

    def where_text(self) -> str:
        """How the input may be supplied, for messages."""
        text = self.filename
        if self.tree_dirs:
            text += " (or its extracted folder " + " or ".join(f"{d}/" for d in self.tree_dirs) + ")"
        return text


@dataclass
class Member:
    """A regular file inside a source, as yielded by :meth:`Source.stream`.

    ``match`` is the regular-expression match of its name. For archives the file object is only valid until the
    stream moves on: read or copy the member inside the loop. Read errors (a corrupt compressed member, a bad CRC)
    raise RecipeError naming the archive and the member.
    """

    name: str
    match: re.Match
    opener: Callable[[], IO[bytes]]
    path: Path | None = None
    container: Path | None = None

    def _fail(self, e: BaseException) -> RecipeError:
        where = self.container or self.path
        return RecipeError(f"cannot read {self.name!r} from {where}: {e} (corrupt or truncated; re-download it)")

    def read(self) -> bytes:
        """The member's bytes."""
        try:
            with self.opener() as f:
                return f.read()
        except READ_ERRORS as e:
            raise self._fail(e) from None

    def copy_to(self, dest: Path) -> None:
        """Write the member to ``dest`` (parents created): a hard link for tree files on the same file system,
        else a byte copy."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.path is not None:
            try:
                os.link(self.path, dest)
                return
            except OSError:
                pass
        try:
            with self.opener() as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except READ_ERRORS as e:
            raise self._fail(e) from None


def check_member_name(name: str, archive: Path) -> str:
    """The member ``name`` normalised to a relative POSIX path; RecipeError when it is absolute or has ``..``."""
    norm = name.replace("\\", "/")
    parts = PurePosixPath(norm).parts
    if norm.startswith("/") or (parts and re.match(r"^[A-Za-z]:", parts[0])) or ".." in parts:
        raise RecipeError(f"archive {archive} is unsafe: member {name!r} points outside the extraction folder; "
                          "refusing to use it (re-download the official archive)")
    return "/".join(p for p in parts if p not in ("", "."))


class Source:
    """A located input: an archive (tar, tar.gz, zip), an extracted folder, or a plain file."""

    def __init__(self, req: Requirement, path: Path, kind: str, prefix: str = "") -> None:
        self.req, self.path, self.kind = req, path, kind
        self.prefix = prefix.strip("/")
        """For a tree: its folder relative to the search directory; member names start with it, as in the
        archive (``train2017/x.jpg`` for the tree ``<dir>/train2017``)."""

    def describe(self) -> dict[str, Any]:
        """JSON record of this source for the manifest."""
        return {"input": self.req.filename, "path": str(self.path), "kind": self.kind}

    def stream(self, pattern: str | re.Pattern, desc: str | None = None, progress: bool = False) -> Iterator[Member]:
        """Regular files whose relative name matches ``pattern`` (``re.search``), in storage order.

        Every member name of an archive is checked (:func:`check_member_name`); a matching link or device makes
        the archive rejected. Tree files are visited in sorted order (symbolic links to folders are not followed).
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        bar = tqdm(desc=desc or f"reading {self.path.name}", unit=" files", disable=not progress)
        try:
            if self.kind == "tree":
                yield from self._stream_tree(rx, bar)
            elif self.kind == "file":
                m = rx.search(self.path.name)
                if m:
                    yield Member(self.path.name, m, lambda: open(self.path, "rb"), self.path)
            elif zipfile.is_zipfile(self.path):
                yield from self._stream_zip(rx, bar)
            else:
                yield from self._stream_tar(rx, bar)
        finally:
            bar.close()

    def _stream_tree(self, rx: re.Pattern, bar: tqdm) -> Iterator[Member]:
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                rel = p.relative_to(self.path).as_posix()
                if self.prefix:
                    rel = f"{self.prefix}/{rel}"
                m = rx.search(rel)
                if m and p.is_file():
                    bar.update(1)
                    yield Member(rel, m, lambda p=p: open(p, "rb"), p)

    def _stream_zip(self, rx: re.Pattern, bar: tqdm) -> Iterator[Member]:
        try:
            with zipfile.ZipFile(self.path) as zf:
                for info in zf.infolist():
                    name = check_member_name(info.filename, self.path)
                    if info.is_dir():
                        continue
                    m = rx.search(name)
                    if not m:
                        continue
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise RecipeError(f"archive {self.path}: member {info.filename!r} is a symbolic link; "
                                          "refusing to use it")
                    bar.update(1)
                    yield Member(name, m, lambda info=info: zf.open(info), container=self.path)
        except READ_ERRORS as e:
            raise RecipeError(f"archive {self.path} is corrupt or truncated ({e}); re-download it") from None

    def _stream_tar(self, rx: re.Pattern, bar: tqdm) -> Iterator[Member]:
        try:
            with tarfile.open(self.path, mode="r:*") as tf:
                for info in tf:
                    name = check_member_name(info.name, self.path)
                    m = rx.search(name)
                    if info.isdir() or not m:
                        continue
                    if not info.isreg():
                        raise RecipeError(f"archive {self.path}: member {info.name!r} is a link or device, not a "
                                          "regular file; refusing to use it")
                    bar.update(1)
                    yield Member(name, m, lambda info=info: tf.extractfile(info), container=self.path)
        except READ_ERRORS as e:
            raise RecipeError(f"archive {self.path} is corrupt or truncated ({e}); re-download it") from None


def find_input(req: Requirement, search_dirs: list[Path]) -> Source | None:
    """The first match of ``req`` in ``search_dirs``: the archive (or plain file), else an extracted folder; for
    ``kind="file"`` the ``tree_dirs`` are folders that may hold the file. None when absent."""
    for d in search_dirs:
        f = d / req.filename
        if f.is_file():
            return Source(req, f, "file" if req.kind == "file" else "archive")
        for sub in req.tree_dirs:
            t = (d / sub) if sub != "." else d
            if req.kind == "file":
                if (t / req.filename).is_file():
                    return Source(req, t / req.filename, "file")
            elif t.is_dir() and (not req.tree_marker or (t / req.tree_marker).exists()):
                return Source(req, t, "tree", "" if sub == "." else sub)
    return None


def download(req: Requirement, dest_dir: Path, timeout: float = DOWNLOAD_TIMEOUT_S, progress: bool = True) -> Path:
    """Fetch ``req.url`` into ``dest_dir/req.filename`` (via ``.part`` + rename); RecipeError naming the archive and
    the directory to place it in when there is no URL or the network fails."""
    if not req.url:
        raise RecipeError(f"{req.filename} has no public download URL; place it in {dest_dir}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / (req.filename + ".part")
    try:
        with urllib.request.urlopen(req.url, timeout=timeout) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {req.filename}",
                      disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        raise RecipeError(f"cannot download {req.filename} from {req.url} ({e}); download it yourself and place it "
                          f"in {dest_dir}") from None
    target = dest_dir / req.filename
    os.replace(part, target)
    return target


def locate(reqs: Iterable[Requirement], search_dirs: list[Path], fetch: bool = False,
           download_dir: Path | None = None, progress: bool = True, recipe: str = "") -> dict[str, Source]:
    """Find every requirement (archive file first, then an extracted folder) or fail naming all missing ones."""
    found: dict[str, Source] = {}
    missing: list[Requirement] = []
    for req in reqs:
        src = find_input(req, search_dirs)
        if src is None:
            missing.append(req)
        else:
            found[req.key] = src
    place = download_dir or search_dirs[0]
    if missing and fetch:
        still = []
        for req in missing:
            if req.url:
                path = download(req, place, progress=progress)
                found[req.key] = Source(req, path, "file" if req.kind == "file" else "archive")
            else:
                still.append(req)
        missing = still
    if missing:
        searched = ", ".join(str(d) for d in search_dirs)
        items = "; ".join(f"{r.where_text()} [{r.description}]" for r in missing)
        hint = "" if fetch else " (inputs with a public URL can be fetched with --download)"
        raise RecipeError(f"recipe {recipe!r}: missing input(s): {items}. Place them in {place} "
                          f"(searched: {searched}){hint}")
    return found


def file_md5(path: Path, progress: bool = False) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"md5 {path.name}", disable=not progress) as bar:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_source(src: Source, progress: bool = False) -> dict[str, Any]:
    """Check an archive file against its published md5; RecipeError on mismatch. Returns the manifest record."""
    rec = src.describe()
    if src.kind == "tree":
        rec.update(verified=False, note="extracted folder: no checksum can be checked")
        return rec
    if not src.req.md5:
        rec.update(verified=False, note="no published checksum for this file")
        return rec
    got = file_md5(src.path, progress)
    if got != src.req.md5:
        raise RecipeError(f"checksum mismatch for {src.path}: md5 {got}, expected {src.req.md5} (published value, "
                          f"source: {src.req.checksum_source}); the file is corrupt or not the official "
                          f"{src.req.filename}: re-download it (or pass --no-verify to use it anyway)")
    rec.update(verified=True, md5=got)
    return rec


# ------------------------------------------------------------------------------------------------ outputs
def safe_path(base: Path, rel: str) -> Path:
    """``base / rel``, refusing any ``rel`` that would leave ``base`` (RecipeError)."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not parts or rel.startswith("/") or ".." in parts:
        raise RecipeError(f"refusing to write {rel!r}: outside the dataset folder {base}")
    return base.joinpath(*parts)


def palette_bytes(palette: list[list[int]], ignore_colour: tuple[int, int, int] = (224, 224, 192)) -> list[int]:
    """A 768-entry PNG palette: the class colours, ``ignore_colour`` at index 255, black elsewhere."""
    flat = [0] * 768
    for i, c in enumerate(palette):
        flat[3 * i: 3 * i + 3] = [int(v) for v in c]
    flat[3 * IGNORE_INDEX: 3 * IGNORE_INDEX + 3] = list(ignore_colour)
    return flat


def encode_label_png(mask: np.ndarray, palette: list[int]) -> bytes:
    """PNG bytes of a uint8 [H, W] label array as a palette image."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"label array must be uint8 [H, W], got {mask.dtype} {mask.shape}")
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from an image file's header; RecipeError naming the file when unreadable."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot read image {path}: {e}") from None


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 1) -> Iterator[Any]:
    """``map(fn, items)`` in order, over ``workers`` processes when > 1 (at most 4 x workers jobs in flight)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with cf.ProcessPoolExecutor(workers) as ex:
        pending: list[cf.Future] = []
        for it in items:
            pending.append(ex.submit(fn, it))
            if len(pending) >= 4 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


# ------------------------------------------------------------------------------------------------ splits
@dataclass(frozen=True)
class Sample:
    """One dataset item: its key (unique id), image path and mask path (None = unlabeled), relative to the root."""

    key: str
    image: str
    mask: str | None

    def line(self, with_mask: bool = True) -> str:
        """The split-list line ``"<image> [<mask>]"``."""
        return f"{self.image} {self.mask}" if with_mask and self.mask else self.image


def parse_fraction(name: str) -> tuple[int, int]:
    """``"1-16"`` -> (1, 16); ValueError naming the text otherwise."""
    m = re.fullmatch(r"(\d+)-(\d+)", name)
    if not m or int(m.group(1)) < 1 or int(m.group(1)) > int(m.group(2)):
        raise ValueError(f"label fraction {name!r} must look like '1-16' (numerator <= denominator)")
    return int(m.group(1)), int(m.group(2))


def fraction_size(n: int, num: int, den: int, rounding: str = "ceil") -> int:
    """Labeled images of a ``num/den`` split of ``n``: ``ceil`` (UniMatch/CPS: 10582/16 -> 662) or ``floor`` (at
    least 1; RankMatch's Lucchi: 165/32 -> 5)."""
    if rounding == "ceil":
        return -(-n * num // den)
    if rounding == "floor":
        return max(1, n * num // den)
    raise ValueError(f"rounding must be 'ceil' or 'floor', got {rounding!r}")


def nested_prefixes(order: list[Sample], sizes: dict[str, int]) -> dict[str, list[Sample]]:
    """``{name: order[:size]}`` (so smaller splits are subsets of larger ones); ValueError when a size exceeds n."""
    out = {}
    for name, size in sizes.items():
        if size > len(order):
            raise ValueError(f"split {name!r} needs {size} labeled images but only {len(order)} are available")
        out[name] = order[:size]
    return out


def permuted(items: list[Sample], seed: int, stream: int) -> list[Sample]:
    """``items`` in a seeded random order (numpy Generator seeded with [seed, stream])."""
    rng = np.random.default_rng([int(seed), int(stream)])
    return [items[i] for i in rng.permutation(len(items)).tolist()]


def complement(pool: list[Sample], labeled: list[Sample]) -> list[Sample]:
    """``pool`` minus ``labeled``, in ``pool``'s order."""
    taken = {s.key for s in labeled}
    return [s for s in pool if s.key not in taken]


def default_key(token: str) -> str:
    """Sample key of a split-list token: its file name without extension (``JPEGImages/2007_000032.jpg`` ->
    ``2007_000032``)."""
    name = token.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def load_user_splits(splits_dir: Path, samples: dict[str, Sample], train: list[Sample],
                     key_fn: Callable[[str], str] = default_key) -> dict[str, tuple[list[Sample], list[Sample]]]:
    """User-provided split lists, used verbatim (same images, same order), mapped onto the prepared samples.

    Accepted layouts inside ``splits_dir``: ``<name>/labeled.txt`` (+ optional ``<name>/unlabeled.txt``; the
    UniMatch layout) and ``labeled_<name>.txt`` (+ optional ``unlabeled_<name>.txt``; this workbench's layout).
    A line's first token names the image (any path; ``key_fn`` reduces it to the sample key); a missing unlabeled
    list means "the train list minus the labeled images". Returns ``{name: (labeled, unlabeled)}``; RecipeError
    naming the file and line for an unknown image, an image listed twice, or one both labeled and unlabeled.
    """
    if not splits_dir.is_dir():
        raise RecipeError(f"--splits {splits_dir}: not a directory")
    found: dict[str, tuple[Path, Path | None]] = {}
    for sub in sorted(p for p in splits_dir.iterdir() if p.is_dir()):
        if (sub / "labeled.txt").is_file():
            unl = sub / "unlabeled.txt"
            found[sub.name] = (sub / "labeled.txt", unl if unl.is_file() else None)
    for f in sorted(splits_dir.glob("labeled_*.txt")):
        name = f.stem[len("labeled_"):]
        unl = splits_dir / f"unlabeled_{name}.txt"
        if name in found:
            raise RecipeError(f"--splits {splits_dir}: split {name!r} is given twice ({found[name][0]} and {f})")
        found[name] = (f, unl if unl.is_file() else None)
    if not found:
        raise RecipeError(f"--splits {splits_dir}: no split lists found; expected <name>/labeled.txt "
                          "(UniMatch layout) or labeled_<name>.txt")

    def read(path: Path) -> list[Sample]:
        """The samples named by one list file, in its order."""
        out, seen = [], set()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            key = key_fn(parts[0])
            if key not in samples:
                raise RecipeError(f"{path}:{n}: image {parts[0]!r} (key {key!r}) is not in the prepared dataset's "
                                  "train set")
            if key in seen:
                raise RecipeError(f"{path}:{n}: image {parts[0]!r} is listed twice")
            seen.add(key)
            out.append(samples[key])
        if not out:
            raise RecipeError(f"{path}: empty split list")
        return out

    result = {}
    for name, (lab_path, unl_path) in found.items():
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise RecipeError(f"{lab_path}: split name {name!r} may only use letters, digits, '_', '.', '-'")
        lab = read(lab_path)
        if any(s.mask is None for s in lab):
            bad = next(s for s in lab if s.mask is None)
            raise RecipeError(f"{lab_path}: image {bad.image} has no mask, so it cannot be labeled")
        unl = read(unl_path) if unl_path else complement(train, lab)
        both = {s.key for s in lab} & {s.key for s in unl}
        if both:
            raise RecipeError(f"{unl_path}: {len(both)} image(s) are also in {lab_path}, e.g. {sorted(both)[0]}")
        result[name] = (lab, unl)
    return result


PUBLISHED_SPLITS = Path(__file__).resolve().parents[1] / "splits"
"""The published label partitions shipped with the package (UniMatch's lists, MIT licence; see its README.md):
``<dataset>/<split>/labeled.txt`` (+ ``unlabeled.txt``) and ``<dataset>/val.txt``, one image key a line."""
SPLIT_LISTS = ("published", "generated")
"""Values of the recipes' ``split_lists`` option: the shipped published lists (default) or seeded generated ones."""


def published_name(folder: str) -> str:
    """The prepared split name of a published split folder: an ``_`` between digits becomes ``-`` (``1_16`` ->
    ``1-16``, ``u2pl_1_16`` -> ``u2pl_1-16``, ``92`` -> ``92``)."""
    return re.sub(r"(?<=\d)_(?=\d)", "-", folder)


def published_source(dataset: str) -> str:
    """The ``split_sources`` text of a split taken from the shipped published lists of ``dataset``."""
    return f"published: UniMatch's lists (workbench/data/splits/{dataset})"


def load_published_splits(dataset: str, samples: dict[str, Sample], train: list[Sample],
                          key_fn: Callable[[str], str] = default_key,
                          check_lists: dict[str, set[str]] | None = None,
                          ) -> dict[str, tuple[list[Sample], list[Sample]]]:
    """The shipped published splits of ``dataset`` (a folder of :data:`PUBLISHED_SPLITS`) mapped onto the prepared
    samples, verbatim (same images, same order).

    Args:
        dataset: ``pascal``, ``cityscapes`` or ``coco``.
        samples: prepared train samples by key.
        train: the train samples in order (the unlabeled set of a split without ``unlabeled.txt`` is ``train`` minus
            its labeled images, e.g. COCO).
        key_fn: reduces a list token to a sample key.
        check_lists: other list files of the folder (``{"val.txt": keys}``) whose keys must all be in ``keys``.
    Returns:
        ``{prepared split name: (labeled, unlabeled)}`` in sorted folder order.
    Raises:
        RecipeError: one message naming how many listed keys the prepared dataset lacks and the first of them
            (checked over every list), or a malformed folder.
    """
    folder = PUBLISHED_SPLITS / dataset
    if not folder.is_dir():
        raise RecipeError(f"the published split lists {folder} are missing from the installation; reinstall "
                          "workbench or prepare with --generated-splits")
    lists: dict[str, tuple[Path, Path | None]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / "labeled.txt").is_file():
            unl = sub / "unlabeled.txt"
            lists[published_name(sub.name)] = (sub / "labeled.txt", unl if unl.is_file() else None)
    if not lists:
        raise RecipeError(f"{folder}: no published split lists (<split>/labeled.txt) found")
    missing: dict[str, list[str]] = {}

    def take(path: Path, pool: dict[str, Any]) -> list[str]:
        """The sample keys of one list file, in order; keys absent from ``pool`` are collected in ``missing``."""
        keys = [key_fn(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]
        for k in keys:
            if k not in pool:
                missing.setdefault(k, []).append(path.relative_to(folder).as_posix())
        return keys

    wanted = {name: (take(lab, samples), take(unl, samples) if unl else None) for name, (lab, unl) in lists.items()}
    for fname, pool in (check_lists or {}).items():
        if (folder / fname).is_file():
            take(folder / fname, dict.fromkeys(pool))
    if missing:
        first = sorted(missing)[:5]
        files = sorted({f for k in missing for f in missing[k]})
        raise RecipeError(
            f"{len(missing)} image key(s) of the published {dataset} split lists are not in the prepared dataset: "
            f"{', '.join(first)}{', ...' if len(missing) > len(first) else ''} (listed in {', '.join(files[:6])}"
            f"{', ...' if len(files) > 6 else ''}); the archives are incomplete or not the official ones. Use "
            "complete official archives, or prepare with --generated-splits (split_lists='generated') to draw "
            "seeded lists from the images present")
    result = {}
    for name, (lab_keys, unl_keys) in wanted.items():
        if len(set(lab_keys)) != len(lab_keys) or (unl_keys and set(lab_keys) & set(unl_keys)):
            raise RecipeError(f"{lists[name][0]}: an image is listed twice or is both labeled and unlabeled")
        lab = [samples[k] for k in lab_keys]
        unl = [samples[k] for k in unl_keys] if unl_keys is not None else complement(train, lab)
        result[name] = (lab, unl)
    return result


def use_published_splits(ctx: "BuildContext", dataset: str, splits: dict[str, list[str]],
                         sources_of: dict[str, str], train: list[Sample],
                         key_fn: Callable[[str], str] = default_key,
                         check_lists: dict[str, set[str]] | None = None) -> None:
    """When the build asks for the published lists (:func:`split_lists_option`): replace the generated splits of
    ``splits`` by the shipped published ones of ``dataset`` (:func:`load_published_splits`) and record each split's
    source in ``sources_of``; generated splits without a published list say so."""
    if split_lists_option(ctx) != "published":
        return
    published = load_published_splits(dataset, {s.key: s for s in train}, train, key_fn, check_lists=check_lists)
    for name in sources_of:
        if name not in published:
            sources_of[name] = f"generated, seed {ctx.seed} (no published list)"
    for name, (lab, unl) in published.items():
        label_splits(splits, name, lab, unl)
        sources_of[name] = published_source(dataset)


def split_lists_option(ctx: "BuildContext") -> str:
    """The build's ``split_lists`` option: ``published`` or ``generated`` (:func:`run_recipe` sets ``published``
    for a recipe with published lists unless asked otherwise)."""
    return ctx.options.get("split_lists", "generated")


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class BuildContext:
    """What a recipe's build function gets besides the staging folder and its sources."""

    seed: int = 0
    splits_dir: Path | None = None
    progress: bool = True
    workers: int = 1
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A dataset recipe: its inputs and the function that builds the dataset into a staging folder.

    ``build(out, sources, ctx)`` writes images/masks under ``out`` and returns a :class:`BuildResult`.
    """

    name: str
    version: int
    requirements: tuple[Requirement, ...]
    build: Callable[[Path, dict[str, Source], BuildContext], "BuildResult"]
    summary: str = ""
    published: str | None = None
    """Folder of :data:`PUBLISHED_SPLITS` holding this dataset's published lists (``pascal``, ``cityscapes``,
    ``coco``); such a recipe uses them by default (option ``split_lists``: ``published`` or ``generated``)."""


@dataclass
class BuildResult:
    """What a build produced: the manifest fields and the split lists (name -> lines)."""

    manifest: dict[str, Any]
    splits: dict[str, list[str]]


@dataclass
class PrepareResult:
    """Outcome of :func:`run_recipe`: the root, ``"prepared"`` or ``"up-to-date"``, and the manifest."""

    root: Path
    status: str
    manifest: dict[str, Any]


def split_lines(samples: list[Sample], with_mask: bool = True) -> list[str]:
    """Split-list lines of ``samples``."""
    return [s.line(with_mask) for s in samples]


def label_splits(result: dict[str, list[str]], name: str, labeled: list[Sample], unlabeled: list[Sample]) -> None:
    """Add ``labeled_<name>`` and ``unlabeled_<name>`` to ``result`` (unlabeled lines keep their masks when they have
    one: the trainer reads them for diagnostics only)."""
    result[f"labeled_{name}"] = split_lines(labeled)
    result[f"unlabeled_{name}"] = split_lines(unlabeled)


def generated_splits(result: dict[str, list[str]], train: list[Sample], sizes: dict[str, int], seed: int,
                     extra_unlabeled: list[Sample] | tuple = ()) -> dict[str, str]:
    """Seeded nested label splits of ``train``: for each ``name -> count`` of ``sizes``, the first ``count`` samples
    of one seeded permutation are ``labeled_<name>`` and the rest (plus ``extra_unlabeled``) ``unlabeled_<name>``,
    added to ``result``. Returns ``{name: "generated, seed <seed>"}`` (the source of each split)."""
    sources_of = {}
    for name, lab in nested_prefixes(permuted(train, seed, 1), sizes).items():
        label_splits(result, name, lab, complement(train, lab) + list(extra_unlabeled))
        sources_of[name] = f"generated, seed {seed}"
    return sources_of


def describe_sources(sources_of: dict[str, str], ctx: BuildContext) -> str:
    """The manifest's one-line ``split_source``: the one source of every split (``generated, seed N``, published,
    user-provided), or each source followed by the splits it made (``published: ... for 92, 183; generated, seed 0
    (no published list) for 1-2``)."""
    kinds = list(dict.fromkeys(sources_of.values()))
    if len(kinds) == 1:
        return kinds[0]
    return "; ".join(f"{k} for " + ", ".join(n for n, s in sources_of.items() if s == k) for k in kinds)


def sha256_text(text: str) -> str:
    """Hex sha256 of a text (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()


def _record(recipe: Recipe, ctx: BuildContext) -> dict[str, Any]:
    """The manifest's "recipe" entry: what must match for a root to count as already prepared."""
    splits = None
    if ctx.splits_dir is not None:
        files = sorted(p for p in Path(ctx.splits_dir).rglob("*.txt") if p.is_file())
        splits = {"dir": str(Path(ctx.splits_dir).resolve()),
                  "sha256": {p.relative_to(ctx.splits_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                             for p in files}}
    return {"name": recipe.name, "version": recipe.version, "seed": ctx.seed, "user_splits": splits,
            "options": {k: v for k, v in sorted(ctx.options.items())}}


def check_prepared(root: Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify a prepared root: manifest readable, split files matching their sha256, every listed file present.

    When ``record`` is given it must equal the manifest's recipe record. Returns the manifest; RecipeError naming
    the first problem otherwise.
    """
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise RecipeError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    if record is not None and manifest.get("recipe") != record:
        raise RecipeError(f"{root} holds a dataset prepared with {manifest.get('recipe')!r}, not the requested "
                          f"{record!r}; choose another --root, or delete {', '.join(RESERVED)} there")
    hashes = manifest.get("split_sha256", {})
    m = load_manifest(root)
    for name, rel in m.splits.items():
        p = root / rel
        if not p.is_file():
            raise RecipeError(f"{root} is incomplete: split list {p} is missing; delete {', '.join(RESERVED)} "
                              "there and prepare again")
        if hashes.get(name) != sha256_text(p.read_text()):
            raise RecipeError(f"{p} was modified after preparation (sha256 differs from the manifest); delete "
                              f"{', '.join(RESERVED)} in {root} and prepare again")
    seen: set[Path] = set()
    for name in m.splits:
        for img, mask in read_split(m, name, check_files=False):
            for f in (img, mask):
                if f is not None and f not in seen:
                    seen.add(f)
                    if not f.is_file():
                        raise RecipeError(f"{root} is incomplete: {f} (listed in split {name!r}) is missing; delete "
                                          f"{', '.join(RESERVED)} there and prepare again")
    return manifest


def _commit(tmp: Path, root: Path) -> None:
    """Move the staged dataset into place: rename the folder, or (root holds other files) its entries, manifest
    last; on a failure the entries already moved are removed again."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        if root.exists():
            root.rmdir()
        os.rename(tmp, root)
        return
    moved: list[Path] = []
    try:
        entries = sorted(tmp.iterdir(), key=lambda p: p.name == "manifest.json")
        for entry in entries:
            target = root / entry.name
            if target.exists():
                raise RecipeError(f"{target} appeared while preparing; refusing to overwrite it")
            os.rename(entry, target)
            moved.append(target)
    except BaseException:
        for target in reversed(moved):
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        raise
    tmp.rmdir()


def run_recipe(recipe: Recipe, root: str | Path, archives: str | Path | None = None, *, seed: int = 0,
               splits_dir: str | Path | None = None, verify: bool = True, fetch: bool = False,
               progress: bool = True, workers: int = 1, options: dict[str, Any] | None = None) -> PrepareResult:
    """Prepare ``root`` with ``recipe`` (see the module docstring for the steps and guarantees).

    Args:
        recipe: the recipe.
        root: dataset root to create (its parent is created when missing).
        archives: folder holding the archives or extracted trees (searched before ``root``).
        seed: seed of the generated split lists (recorded in the manifest).
        splits_dir: folder of user-provided split lists, used verbatim instead of the generated ones of the same
            name (see :func:`load_user_splits`).
        verify: check archive checksums against the published values.
        fetch: download missing inputs that have a public URL (urllib).
        progress: tqdm progress bars.
        workers: processes for the label conversion (1 = in this process).
        options: recipe-specific options (recorded in the manifest).
    Returns:
        PrepareResult with status ``"up-to-date"`` when the root already held the same preparation.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RecipeError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(root)
    options = dict(options or {})
    if recipe.published:
        options.setdefault("split_lists", "published")
        if options["split_lists"] not in SPLIT_LISTS:
            raise RecipeError(f"split_lists must be 'published' (the shipped published lists) or 'generated' (seeded "
                              f"lists), got {options['split_lists']!r}")
    elif options.pop("split_lists", "generated") != "generated":
        raise RecipeError(f"recipe {recipe.name!r} has no published split lists: split_lists can only be "
                          "'generated'")
    ctx = BuildContext(seed=seed, splits_dir=Path(splits_dir) if splits_dir is not None else None,
                       progress=progress, workers=max(1, int(workers)), options=options)
    record = _record(recipe, ctx)
    if (root / "manifest.json").exists():
        return PrepareResult(root, "up-to-date", check_prepared(root, record))
    if root.exists() and not root.is_dir():
        raise RecipeError(f"--root {root} exists and is not a directory")
    clash = [n for n in RESERVED if (root / n).exists()]
    if clash:
        raise RecipeError(f"--root {root} already contains {', '.join(clash)} but no manifest.json (not written by a "
                          "recipe, or left by an interrupted run); move them away or choose another --root")
    search = [Path(archives)] if archives is not None else []
    search.append(root)
    sources = locate(recipe.requirements, search, fetch=fetch, download_dir=search[0], progress=progress,
                     recipe=recipe.name)
    records = {}
    for key, src in sources.items():
        records[key] = verify_source(src, progress) if verify else {**src.describe(), "verified": False,
                                                                     "note": "verification skipped (--no-verify)"}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        res = recipe.build(tmp, sources, ctx)
        (tmp / "splits").mkdir(exist_ok=True)
        texts = {name: "".join(line + "\n" for line in lines) for name, lines in res.splits.items()}
        for name, text in texts.items():
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise RecipeError(f"split name {name!r} is not a plain file name")
            if not text:
                raise RecipeError(f"recipe {recipe.name!r} produced an empty split {name!r}")
            (tmp / "splits" / f"{name}.txt").write_text(text)
        manifest = {"format": MANIFEST_FORMAT, **res.manifest, "ignore_index": IGNORE_INDEX,
                    "splits": {name: f"splits/{name}.txt" for name in texts},
                    "counts": {name: len(lines) for name, lines in res.splits.items()},
                    "split_sha256": {name: sha256_text(t) for name, t in texts.items()},
                    "recipe": record, "sources": records}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        check_prepared(tmp, record)
        _commit(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareResult(root, "prepared", manifest)
