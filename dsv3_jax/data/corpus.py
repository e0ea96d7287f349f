"""Document sources: the standard library of the running interpreter, text files, or synthetic.

The stdlib default is real code present wherever Python is, the kind of data DeepSeek-V3 saw
with FIM (report §4.1). Reading order is sorted and deterministic so a run can be rebuilt
exactly on resume.
"""

from __future__ import annotations

import glob
import json
import os
import random
import sysconfig
from pathlib import Path

from dsv3_jax.errors import UsageError

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".js", ".ts", ".rs", ".go"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _read_text(path: Path, strict: bool = True) -> list[str]:
    """The documents of one file. `strict`: a file that is not UTF-8 text (a binary, another
    encoding) is refused, naming it, instead of being trained on as replacement characters."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {str(path)!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                         "give UTF-8 text, .jsonl, or convert it (e.g. iconv -t utf-8)") from None
    if "\x00" in text:
        raise UsageError(f"data file {str(path)!r} holds NUL bytes: it is a binary file, not text")
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{n} is not valid JSON (jsonl files hold one object with a 'text' field per line)") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"{path}:{n} has no string 'text' field")
        docs.append(record["text"])
    return docs


def files_for(source: str) -> list[Path]:
    """Files named by a path, a directory (recursively) or a glob."""
    if source == "stdlib":
        return stdlib_files()
    path = Path(source).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
    elif path.is_file():
        found = [path]
    else:
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not found and not glob.has_magic(source):
            raise UsageError(f"data path {source!r} does not exist (use stdlib, synthetic, a file, a directory or a glob)")
    if not found:
        raise UsageError(f"data source {source!r} matches no files (text files: {', '.join(sorted(_TEXT_SUFFIXES))})")
    return found


def synthetic_documents(n_docs: int = 2000, seed: int = 0) -> list[str]:
    """Small, learnable code-like documents for tests."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        a, b = rng.randint(0, 9), rng.randint(1, 9)
        name = rng.choice(["add", "scale", "shift", "mix"])
        body = "\n".join(f"    x{j} = x{j - 1} + {a * j % 10}" for j in range(1, rng.randint(2, 6)))
        docs.append(f"def {name}_{i % 50}(x0):\n{body}\n    return x0 * {b}\n")
    return docs


def load_documents(source: str, max_bytes: int) -> list[str]:
    """Documents from `source`, read in a fixed order until `max_bytes` of text."""
    if source == "synthetic":
        return synthetic_documents()
    docs, total = [], 0
    for path in files_for(source):
        for doc in _read_text(path, strict=source != "stdlib"):
            if not doc.strip():
                continue
            docs.append(doc)
            total += len(doc)
            if total >= max_bytes:
                return docs
    if not docs:
        raise UsageError(f"data source {source!r} holds no text (all files are empty)")
    return docs
