# Hostile and broken checkpoint files: each is one clear ValueError naming the file, nothing in it runs, and
# nothing is allocated at the sizes it claims. The files are made here.
import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from chatglm import AutoModel, AutoTokenizer
from chatglm.checkpoint import load_bin, read_json
from conftest import GOLDEN, ROOT, needs_shared

pytestmark = needs_shared


class _Storage:
    pass


def tensor_pickle(numel: int, size: int, legacy: bool) -> bytes:
    """The pickle torch.save writes for {"w": tensor}, with the storage's element count and the tensor's size
    chosen freely (a file that lies about them)."""
    class T:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (_Storage(), 0, (size,), (1,), False, collections.OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", numel) + ((None,) if legacy else ())

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": T()})
    return buf.getvalue()


def zip_file(path, numel, size):
    """A zip checkpoint of a 4-float tensor whose pickle claims other sizes."""
    torch.save({"w": torch.zeros(4)}, path.with_suffix(".ok"))
    with zipfile.ZipFile(path.with_suffix(".ok")) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, tensor_pickle(numel, size, False) if info.filename.endswith("data.pkl") else data)
    path.with_suffix(".ok").unlink()


def legacy_file(path, numel, size):
    """torch's pre-1.6 format: magic, protocol, system info, the object, storage keys, then each storage's bytes."""
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(obj, f, protocol=2)
        f.write(tensor_pickle(numel, size, True))
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", 4) + bytes(16))


def evil_file(path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"w": Evil()}, path)


HOSTILE = {
    "pickled-code": lambda p: evil_file(p, p.parent / "pwned"),
    "random-bytes": lambda p: p.write_bytes(bytes(range(256)) * 16),
    "text": lambda p: p.write_text("this is not a checkpoint\n" * 20),
    "empty": lambda p: p.write_bytes(b""),
    "dev-zero": lambda p: p.symlink_to("/dev/zero"),
    "fifo": lambda p: os.mkfifo(p),
    "directory": lambda p: p.mkdir(),
    "zip-size-2**31-over-4": lambda p: zip_file(p, 4, 2**31),
    "zip-storage-2**31": lambda p: zip_file(p, 2**31, 2**31),
    "legacy-size-2**31-over-4": lambda p: legacy_file(p, 4, 2**31),
    "legacy-storage-2**31": lambda p: legacy_file(p, 2**31, 2**31),
    "legacy-negative-storage": lambda p: legacy_file(p, -4, 4),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_bin_is_one_clear_error(tmp_path, kind):
    path = tmp_path / "pytorch_model.bin"
    HOSTILE[kind](path)
    with pytest.raises(ValueError) as e:
        load_bin(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert "likely succeed" not in msg  # torch's own advice to retry with weights_only=False never reaches the user
    if "weights_only" in msg:
        assert "Never load it with weights_only=False" in msg
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["pickled-code", "random-bytes", "dev-zero", "zip-size-2**31-over-4"])
def test_hostile_bin_through_the_folder(tmp_path, kind):
    d = tmp_path / "m"
    shutil.copytree(GOLDEN / "chatglm-6b-tiny", d)
    os.chmod(d, 0o755)
    for f in d.glob("pytorch_model*"):
        os.chmod(f, 0o644)
        f.unlink()
    HOSTILE[kind](d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: "):
        AutoModel.from_pretrained(d)


def test_the_pickled_code_error_says_never_to_disable_weights_only(tmp_path):
    evil_file(tmp_path / "a.bin", tmp_path / "pwned")
    with pytest.raises(ValueError, match=r"refused.*posix.system.*Never load it with weights_only=False"):
        load_bin(tmp_path / "a.bin")
    assert not (tmp_path / "pwned").exists()


def test_lying_sizes_allocate_nothing(tmp_path):
    """With the address space capped 1 GiB above what the process has, every file claiming 8.6 GB still gives
    the loader's clear error (an attempted allocation would give torch's 'can't allocate memory')."""
    for kind in ("zip-size-2**31-over-4", "zip-storage-2**31", "legacy-size-2**31-over-4", "legacy-storage-2**31"):
        HOSTILE[kind](tmp_path / f"{kind}.bin")
    code = f"""
import resource, sys
from pathlib import Path
from chatglm.checkpoint import load_bin
vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
for f in sorted(Path({str(tmp_path)!r}).glob('*.bin')):
    try:
        load_bin(f)
        print(f.name, 'LOADED')
    except ValueError as e:
        print(f.name, 'ERROR', e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4, r.stdout
    for line in lines:
        assert " ERROR " in line and "can't allocate" not in line, line


def test_legacy_format_still_loads(tmp_path):
    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    torch.save(sd, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    out, mapped = load_bin(tmp_path / "old.bin")
    assert not mapped and torch.equal(out["a"], sd["a"]) and torch.equal(out["b"], sd["b"])


# ---------------------------------------------------------------- config.json and index files

def folder(tmp_path, name="chatglm3-6b"):
    d = tmp_path / name
    shutil.copytree(GOLDEN / f"{name}-tiny", d)
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)
    return d


def with_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return d


@pytest.mark.parametrize("field,value", [
    ("num_layers", 10**6), ("seq_length", 10**9), ("hidden_size", 3 * 10**9), ("ffn_hidden_size", 2**40),
    ("padded_vocab_size", 10**12), ("num_layers", -2), ("hidden_size", 0), ("seq_length", -1),
    ("kv_channels", -8), ("ffn_hidden_size", -5), ("num_attention_heads", -4),
])
def test_config_sizes_out_of_range(tmp_path, field, value):
    d = with_config(folder(tmp_path), **{field: value})
    with pytest.raises(ValueError, match=rf"config.json: {field} must be between 1 and \d+, got {value}"):
        AutoModel.from_pretrained(d)


@pytest.mark.parametrize("field,value", [("num_layers", -1), ("max_sequence_length", 10**9),
                                         ("inner_hidden_size", 10**10), ("vocab_size", 0)])
def test_config_sizes_out_of_range_chatglm6b(tmp_path, field, value):
    d = with_config(folder(tmp_path, "chatglm-6b"), **{field: value})
    with pytest.raises(ValueError, match=rf"config.json: {field} must be between 1 and \d+, got {value}"):
        AutoModel.from_pretrained(d)


def test_config_larger_than_the_weights_on_disk(tmp_path):
    d = with_config(folder(tmp_path), num_layers=1000, hidden_size=4096, kv_channels=128, ffn_hidden_size=13696)
    with pytest.raises(ValueError, match="config.json: describes a model of at least .* but the weight files hold"):
        AutoModel.from_pretrained(d)


@pytest.mark.parametrize("content,match", [
    (b'{"num_layers": ' + b"9" * 5000 + b"}", "invalid JSON .*integer"),
    (b"[" * 100000 + b"]" * 100000, "invalid JSON"),
    (b'{"a": ' * 100000 + b"1" + b"}" * 100000, "invalid JSON"),
    (b'{"layernorm_epsilon": NaN}', "invalid JSON .*NaN"),
    (b'{"hidden_size": Infinity}', "invalid JSON .*Infinity"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_config_json_escapes_nothing(tmp_path, content, match):
    d = folder(tmp_path)
    (d / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"config.json: {match}"):
        AutoModel.from_pretrained(d)


SPECIAL = {"dev-zero": lambda p: p.symlink_to("/dev/zero"), "fifo": lambda p: os.mkfifo(p),
           "directory": lambda p: p.mkdir(), "too-large": lambda p: p.write_bytes(b" " * (17 << 20))}


@pytest.mark.parametrize("kind", list(SPECIAL))
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "tokenizer_config.json"])
def test_special_files_never_hang_or_fill_memory(tmp_path, kind, name):
    path = tmp_path / name
    SPECIAL[kind](path)
    with pytest.raises(ValueError, match=f"{name}: (not a regular file|larger than 16 MiB)"):
        read_json(path)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_special_config_in_a_folder(tmp_path, kind):
    d = folder(tmp_path)
    (d / "config.json").unlink()
    SPECIAL[kind](d / "config.json")
    with pytest.raises(ValueError, match="config.json: not a regular file"):
        AutoModel.from_pretrained(d)
    with pytest.raises(ValueError, match="config.json: not a regular file"):
        AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_special_weight_and_tokenizer_files(tmp_path, kind):
    d = folder(tmp_path)
    (d / "model.safetensors").unlink()
    SPECIAL[kind](d / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: not a regular file"):
        AutoModel.from_pretrained(d)
    (d / "tokenizer.model").unlink()
    SPECIAL[kind](d / "tokenizer.model")
    with pytest.raises(ValueError, match="tokenizer.model: not a regular file"):
        AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("weight_map,match", [
    ({}, "the weight_map lists no weights"),
    ([1, 2], "no weight_map"),
    ({"a": 3}, "no weight_map"),
    ({"a": "../../etc/passwd"}, "shard name '../../etc/passwd' is not a plain file name"),
])
def test_bad_index_files(tmp_path, weight_map, match):
    d = folder(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"model.safetensors.index.json: {match}"):
        AutoModel.from_pretrained(d)
