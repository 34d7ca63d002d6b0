"""The prompts a run trains on: `--prompts` in any of its published forms, converted once into a cache on disk that
a run reads one prompt at a time, and each batch's prompts encoded when the batch is drawn.

--prompts takes a text file (one prompt per line), a .json (a list of strings or of objects with a prompt, text or
caption field, or an object mapping ids to either), a .jsonl (one such string or object a line), a .csv (a prompt,
text or caption column), a .parquet (the same column; needs pyarrow), a hub dataset id (its prompt files, through the
hub cache as --model's), or `demo` (12 built-in prompts). Whatever the source, it is converted once, streaming, into
a cache folder keyed by the source's identity: the prompts' UTF-8 bytes in one file and their offsets (uint64) in
another, written whole or not at all. A run then holds no list of the prompts: `PromptList` reads each prompt from
disk when it is drawn, so millions (JourneyDB's 1.4 M, the paper's) cost the memory of a few. Prompts are kept as
they come, duplicates included, as the authors' code keeps them; blank ones are dropped.

Each batch's prompts are then encoded when drawn, by the frozen text encoder kept on the training device, so no table
of every prompt's text states is ever held either. Why per batch and not a memory-mapped cache of precomputed
states, which the authors' code reads: the cache costs a pass over every prompt before the first step, its disk and,
once read, its pages count in the process's memory, while encoding per batch costs one text-encoder forward of the
batch's prompts, a small share of an iteration. docs/memory.md has the measurements. The miniature takes the same path.
"""
import codecs
import csv
import hashlib
import json
import os
import re
import struct
from array import array

import torch

from formats.models import HUB_ID, HubKind, cache_root, hub_snapshot
from formats.text import load_text
from harness.atomic import atomic
from harness.flags import UsageError

PAPER_PROMPTS = "Enderfga/journeyDB_prompt"  # a public copy of JourneyDB's prompts (docs/training.md: its terms)
DEMO = "demo"
DEMO_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road at sunset",
    "a bowl of ramen, studio lighting", "an astronaut riding a horse, digital art",
    "a lighthouse on a cliff during a storm", "a watercolor painting of a fox in the snow",
    "a cozy cabin in the woods, autumn", "a portrait of an old fisherman, photograph",
    "a futuristic city skyline at night, neon lights", "a teddy bear reading a book",
    "a field of sunflowers under a blue sky", "a plate of sushi on a wooden table",
]
FIELDS = ("prompt", "text", "caption")  # the field or column that holds the prompt, the first found (any case)
FIELDS_SAID = "a prompt, text or caption"
EXTENSIONS = (".txt", ".json", ".jsonl", ".csv", ".parquet")  # the files a hub dataset's prompts are read from
CACHE_VERSION = 1  # part of the cache key: a new layout of the cache folder makes new folders
CHUNK = 1 << 20    # bytes of a .json read at a time


# --------------------------------------------------------------------------------------------------
# --prompts: which, said in the run's first lines


def pick_prompts(given):
    """--prompts as given (`demo` with a notice); by default the paper's, JourneyDB's. Says which and why."""
    if given == DEMO:
        print(f"prompts: demo, {len(DEMO_PROMPTS)} built-in prompts: a demo, not the paper's run (without --prompts "
              f"Stable Diffusion trains on JourneyDB's, {PAPER_PROMPTS})")
    elif given:
        print(f"prompts: {given}")
    else:
        print(f"prompts: {PAPER_PROMPTS} (the paper's: JourneyDB's prompts, a public copy on the hub; its terms are "
              f"JourneyDB's, docs/training.md; --prompts FILE for yours)")
    return given or PAPER_PROMPTS


def open_prompts(source):
    """The PromptList of --prompts `source`: a file, a hub dataset id or `demo`, converted on first use."""
    if source == DEMO:
        key, name, read = ["demo", DEMO_PROMPTS], "demo", lambda: iter(DEMO_PROMPTS)
    else:
        files = prompt_source_files(source)
        key = [[os.path.realpath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
        name = os.path.splitext(os.path.basename(source))[0] if os.path.exists(source) else source.replace("/", "--")
        read = lambda: (p for f in files for p in prompts_in_file(f))
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, key]).encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]", "_", name)  # a file name of any language, without separators
    folder = os.path.join(cache_root(), f"prompts-{name}-{digest}")
    if not PromptList.is_whole(folder):
        print(f"prompts: converting {source} once into {folder}")
        with atomic(folder, shared=True) as tmp:
            write_prompt_cache(read(), tmp, source)
    prompts = PromptList(folder)
    if not len(prompts):
        raise UsageError(f"--prompts {source} has no prompts (one prompt per line, or strings / objects with a "
                         f"{FIELDS_SAID[2:]} field)")
    return prompts


def prompt_source_files(source):
    """The files of a --prompts path or hub dataset id; a hub id is looked up in the hub cache, else downloaded."""
    if os.path.isdir(source):
        raise UsageError(f"--prompts {source!r} is a folder: pass a prompt file, a hub dataset id or demo")
    if os.path.exists(source) or not HUB_ID.match(source) or source.lower().endswith(EXTENSIONS):
        if not os.path.exists(source):
            raise UsageError(f"prompt file {source!r} not found")
        return [source]
    folder = hub_snapshot(source, DATASET_REPO)
    return [os.path.join(folder, name) for name in dataset_prompt_files(source, _files_under(folder))]


def dataset_prompt_files(repo_id, names):
    """Of a dataset repository's file names, those its prompts are read from: every file of a prompt format
    (README, licence and dot files aside), the train split's alone where the repository names one."""
    data = [n for n in names if n.lower().endswith(EXTENSIONS) and not os.path.basename(n).startswith(".")
            and not os.path.basename(n).lower().startswith(("readme", "license", "licence"))]
    train = [n for n in data if "train" in n.lower()]
    if not data:
        raise UsageError(f"the hub dataset {repo_id} has no prompt file ({', '.join(EXTENSIONS)}); pass --prompts FILE")
    return sorted(train or data)


def _files_under(folder):
    return [os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files]


def _has_prompt_files(folder):
    try:
        return bool(dataset_prompt_files("", _files_under(folder)))
    except UsageError:
        return False


DATASET_REPO = HubKind("dataset", dataset_prompt_files, _has_prompt_files,
                       "pass a prompt file (--prompts FILE; --prompts demo: 12 built-in prompts)", UsageError)


# --------------------------------------------------------------------------------------------------
# The cache: the prompts' bytes in one file, their offsets in another; read one prompt at a time


def write_prompt_cache(prompts, folder, source):
    """Write `prompts` (any iterable of strings, read once) into `folder`: text.bin (the stripped, non-blank prompts'
    UTF-8, back to back), offsets.bin (uint64: 0, then each prompt's end) and info.json, with the SHA-256 of the
    prompts joined by newlines (a checkpoint's prompt-list hash), computed as they stream past."""
    os.makedirs(folder)
    sha, count, end, offsets = hashlib.sha256(), 0, 0, array("Q", [0])
    with open(os.path.join(folder, "text.bin"), "wb") as text, open(os.path.join(folder, "offsets.bin"), "wb") as index:
        for prompt in prompts:
            data = prompt.strip().encode("utf-8")
            if not data:
                continue
            sha.update(b"\n" if count else b"")
            sha.update(data)
            text.write(data)
            count, end = count + 1, end + len(data)
            offsets.append(end)
            if len(offsets) >= 1 << 16:  # bounded: the offsets go to disk as they come
                index.write(offsets.tobytes())
                offsets = array("Q")
        index.write(offsets.tobytes())
    with open(os.path.join(folder, "info.json"), "w") as f:
        json.dump({"source": source, "count": count, "bytes": end, "sha256": sha.hexdigest()}, f)


class PromptList:
    """The prompts of a cache folder: len(p), p[i] (a string), p[a:b] (a list), each read from disk when asked for:
    nothing held in memory grows with the prompt count. `sha256`: of the prompts joined by newlines."""

    def __init__(self, folder):
        with open(os.path.join(folder, "info.json")) as f:
            info = json.load(f)
        self.folder, self.source, self.count, self.sha256 = folder, info["source"], info["count"], info["sha256"]
        self._text = open(os.path.join(folder, "text.bin"), "rb", buffering=0)
        self._offsets = open(os.path.join(folder, "offsets.bin"), "rb", buffering=0)

    @staticmethod
    def is_whole(folder):
        """True if `folder` holds a cache whose files have the sizes its info.json says (else it is rebuilt)."""
        try:
            with open(os.path.join(folder, "info.json")) as f:
                info = json.load(f)
            return (os.path.getsize(os.path.join(folder, "text.bin")) == info["bytes"] and
                    os.path.getsize(os.path.join(folder, "offsets.bin")) == 8 * (info["count"] + 1))
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.count)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            ends = self._ends(start, max(stop - start, 0))
            data = self._read(self._text, ends[0], ends[-1] - ends[0])
            return [data[a - ends[0]:b - ends[0]].decode("utf-8") for a, b in zip(ends, ends[1:])]
        i = index.__index__()
        i = i + self.count if i < 0 else i
        if not 0 <= i < self.count:
            raise IndexError(f"prompt {index} of {self.count}")
        start, end = self._ends(i, 1)
        return self._read(self._text, start, end - start).decode("utf-8")

    def _ends(self, i, n):
        """The offsets i .. i + n: where prompts i .. i + n - 1 start, and where the last ends."""
        return struct.unpack(f"={n + 1}Q", self._read(self._offsets, 8 * i, 8 * (n + 1)))

    @staticmethod
    def _read(f, offset, size):
        f.seek(offset)
        return f.read(size)


# --------------------------------------------------------------------------------------------------
# Reading each format, streaming: a text or .jsonl file line by line, a .json value by value, a .csv row by row,
# a .parquet batch by batch


def prompts_in_file(path):
    """The prompts of one file, in order, by its extension (anything else is read as text, one prompt per line)."""
    read = {".json": prompts_in_json, ".jsonl": prompts_in_jsonl, ".csv": prompts_in_csv,
            ".parquet": prompts_in_parquet}.get(os.path.splitext(path)[1].lower(), prompts_in_text)
    try:
        yield from read(path)
    except FileNotFoundError:
        raise UsageError(f"prompt file {path!r} not found") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {path!r} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise UsageError(f"cannot read prompt file {path!r}: {e.strerror or e}") from None


def read_prompts(path):
    """The prompts of a text file, one per line, as a list: blank lines dropped, repeats kept (an evaluation's prompt
    list, where each line is an image)."""
    prompts = [p.strip() for p in prompts_in_file(path) if p.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path!r} has no prompts (one prompt per line)")
    return prompts


def prompts_in_text(path):
    with open(path, encoding="utf-8-sig") as f:
        yield from f


def prompts_in_jsonl(path):
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{path}: line {n} is not JSON ({e}); a .jsonl holds one JSON string or object "
                                     f"a line") from None
                yield prompt_of(item, f"{path}: line {n}")


def prompts_in_json(path):
    """A .json's prompts without reading it whole: its top level walked by JsonStream, each element decoded alone.
    A list of strings or of objects; an object mapping ids to either, or wrapping one such list."""
    stream = JsonStream(path)
    first = stream.peek()
    if first == "[":
        yield from (prompt_of(item, f"{path}: element {i}") for i, item in enumerate(stream.elements()))
    elif first == "{":
        for key in stream.keys():
            if stream.peek() == "[":  # {"prompts": [...]}: a list under a key, walked element by element too
                yield from (prompt_of(item, f"{path}: {key!r}[{i}]") for i, item in enumerate(stream.elements()))
            else:
                yield prompt_of(stream.value(), f"{path}: the value of {key!r}")
    else:
        found = "nothing" if not first else f"a {json_type(stream.value())}"
        raise UsageError(f"{path} holds {found} at its top level; a .json of prompts is a list (of strings, or of "
                         f"objects with {FIELDS_SAID} field) or an object mapping ids to them")


def prompt_of(item, where):
    """The prompt of a JSON item: the string itself, or an object's first field of FIELDS (any case); "" for a null
    one (dropped). Anything else is named, with what it was."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        fields = {k.lower(): v for k, v in item.items()}
        field = next((f for f in FIELDS if f in fields), None)
        if field is None:
            raise UsageError(f"{where} is an object with the fields {', '.join(list(item)[:8]) or '(none)'}, none of "
                             f"{FIELDS_SAID[2:]}: no prompt in it")
        value = fields[field]
        if value is None or isinstance(value, str):
            return value or ""
        item, where = value, f"{where}, its {field!r}"
    raise UsageError(f"{where} is a {json_type(item)} ({json.dumps(item)[:40]}), not a prompt: a string, or an object "
                     f"with {FIELDS_SAID} field")


def json_type(value):
    names = {dict: "JSON object", list: "JSON list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


_SPACE = re.compile(r"[ \t\n\r]*")


class JsonStream:
    """A JSON file read CHUNK bytes at a time: the caller walks its top level (`elements`, `keys`), and each
    value is decoded by json.JSONDecoder.raw_decode from a buffer that holds a chunk or so, never the file."""

    def __init__(self, path):
        self.path, self.raw = path, open(path, "rb")
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.buffer, self.pos, self.before, self.eof = "", 0, 0, False  # before: characters dropped off the buffer
        self.decoder = json.JSONDecoder()

    def more(self):
        """Append the next chunk to the buffer (dropping what was read); False at the end of the file."""
        if self.eof:
            return False
        chunk = self.raw.read(CHUNK)
        text = self.utf8.decode(chunk, final=not chunk)
        self.eof = not chunk
        self.before += self.pos
        self.buffer, self.pos = self.buffer[self.pos:] + text, 0
        if self.eof:
            self.raw.close()
        return bool(chunk)

    def peek(self):
        """The next character that is not white space ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self.more():
                return ""

    def expect(self, chars):
        char = self.peek()
        if char not in chars:
            where = f"character {self.before + self.pos}"
            raise UsageError(f"{self.path} is not valid JSON: expected {' or '.join(map(repr, chars))} at {where}, "
                             f"found {char or 'the end of the file'!r}")
        self.pos += 1
        return char

    def value(self):
        """The next value, decoded whole (a string, or one object)."""
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as e:
                at = self.before + e.pos
                if self.more():  # the value goes on in the next chunk
                    continue
                raise UsageError(f"{self.path} is not valid JSON ({e.msg} at character {at})") from None
            if end == len(self.buffer) and not self.eof and self.more():  # a number may go on in the next chunk
                continue
            self.pos = end
            return value

    def elements(self):
        """The values of the list that starts here, one at a time."""
        return self._members("[", "]", self.value)

    def keys(self):
        """The keys of the object that starts here, one at a time; the caller reads each one's value."""
        return self._members("{", "}", self._key)

    def _members(self, opening, closing, read):
        """read() each member of the list or object that starts here, between `opening` and `closing`."""
        self.expect(opening)
        if self.peek() == closing:
            self.pos += 1
            return
        while True:
            yield read()
            if self.expect("," + closing) == closing:
                return

    def _key(self):
        if self.peek() != '"':
            self.expect('"')  # a key is a string: this says what was found instead
        key = self.value()
        self.expect(":")
        return key


def prompts_in_csv(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        column = prompt_column(path, header)
        try:
            for row in rows:
                if len(row) > column:
                    yield row[column]
        except csv.Error as e:
            raise UsageError(f"{path} is not a valid CSV file ({e})") from None


def prompt_column(path, names):
    """The index of the first column named one of FIELDS (any case); one line naming the columns found if none is."""
    lower = [str(n).strip().lower() for n in names]
    for field in FIELDS:
        if field in lower:
            return lower.index(field)
    raise UsageError(f"{path} has no {FIELDS_SAID[2:]} column (its columns: {', '.join(map(str, names[:8])) or 'none'})")


def prompts_in_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"--prompts {path}: reading .parquet needs pyarrow (pip install pyarrow), or give the prompts "
                         f"as .jsonl, .csv or .txt") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for foreign or truncated files
        raise UsageError(f"{path} is not a readable parquet file ({type(e).__name__}: {str(e)[:80]})") from None
    names = table.schema_arrow.names
    column = names[prompt_column(path, names)]
    if str(table.schema_arrow.field(column).type) not in ("string", "large_string"):
        raise UsageError(f"{path}: its {column!r} column holds {table.schema_arrow.field(column).type}, not strings")
    for batch in table.iter_batches(batch_size=1 << 16, columns=[column]):  # row group by row group
        yield from (p or "" for p in batch.column(0).to_pylist())


# --------------------------------------------------------------------------------------------------
# Each batch's prompts, encoded when drawn


class PromptEmbeddings:
    """embeddings[i] -> the context [n, L, D] (fp32; formats/text.Text) of prompts[i] for a slice or a tensor of
    indices, encoded when asked for; `uncond` is CFG's unconditional branch, encoded once."""

    def __init__(self, text, prompts):
        self.text, self.prompts = text, prompts
        self.uncond = text.uncond

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            chosen = self.prompts[index]
        else:
            chosen = [self.prompts[i] for i in torch.as_tensor(index).tolist()]
        return self.text.encode(chosen)


def prompt_embeddings(folder, prompts, device, image_size=None):
    """PromptEmbeddings of `prompts` with the text encoder(s) of the Stable Diffusion folder, on `device` in fp32.
    image_size: (h, w) of the images trained, which SDXL is conditioned on (formats/text.py)."""
    return PromptEmbeddings(load_text(folder, image_size).to(device), prompts)
