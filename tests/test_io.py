"""Readers and the streaming writer agree with safetensors and torch themselves."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptavg.errors import CkptavgError
from ckptavg.io.dtypes import DTYPES, bf16_to_f32, f32_to_bf16
from ckptavg.io.safetensors import SafetensorsFile, SafetensorsWriter, TensorInfo, parse_size, read_header


def test_bf16_to_f32_all_bit_patterns_match_torch():
    bits = np.arange(65536, dtype=np.uint16)
    ours = bf16_to_f32(bits, np.empty(65536, np.float32))
    ref = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_f32_to_bf16_rounds_to_nearest_even_like_torch():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    # ties, carries into the exponent, infinities, the largest finite values, zeros, denormals
    special = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0xFF7FFFFF, 0x7F800000,
                        0xFF800000, 0, 0x80000000, 0x00008000, 0x00018000], np.uint32)
    x = np.concatenate([u, special]).view(np.float32)
    ours = f32_to_bf16(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], ref[~nan])
    back = bf16_to_f32(ours[nan], np.empty(nan.sum(), np.float32))
    assert np.isnan(back).all()


def test_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(5, dtype=np.float16),
        "c": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "i": np.array([[1, -2]], np.int64),
    }
    dts = {"a": "F32", "b": "F16", "c": "BOOL", "empty": "F32", "i": "I64"}
    entries = [TensorInfo(k, DTYPES[dts[k]], v.shape) for k, v in tensors.items()]
    w = SafetensorsWriter(tmp_path / "x.safetensors", entries, {"note": "hi"})
    for k in reversed(list(tensors)):  # any order, in pieces
        flat = tensors[k].reshape(-1).view(DTYPES[dts[k]].storage) if k == "c" else tensors[k].reshape(-1)
        for s in range(0, flat.size, 2):
            w.write(k, s, flat[s : s + 2])
    w.close()
    with safe_open(tmp_path / "x.safetensors", framework="np") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
        for k, v in tensors.items():
            assert np.array_equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # data section aligned like safetensors writes it


def test_reader_reads_chunks_of_safetensors_written_by_safetensors(tmp_path):
    t = torch.randn(7, 11).to(torch.bfloat16)
    save_file({"w": t, "v": torch.arange(5.0)}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    info = f.tensors["w"]
    assert info.dtype.name == "BF16" and info.shape == (7, 11)
    chunk = f.read(info, 10, 20)
    ref = t.reshape(-1)[10:30].view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(chunk, ref)
    f.close()


def _st_bytes(header: dict, data: bytes, n: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


@pytest.mark.parametrize("blob, msg", [
    (b"\x01\x02", "shorter than the 8-byte header"),
    (struct.pack("<Q", 2**40) + b"{}", "exceeds"),
    (struct.pack("<Q", 50) + b"{}", "runs past the end"),
    (_st_bytes({}, b"")[:8] + b"\xff\xfe", "not UTF-8 JSON"),
    (_st_bytes({"a": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype"),
    (_st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "outside"),
    (_st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8"),
    (_st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8), "overlaps"),
    (_st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "truncated or padded"),
    (_st_bytes([1, 2], b""), "not a JSON object"),
    (_st_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "bad shape"),
], ids=["tiny", "absurd-header", "header-past-eof", "garbage", "dtype", "range", "size", "overlap", "tail",
        "not-object", "negative-shape"])
def test_header_validation_names_file_and_problem(tmp_path, blob, msg):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(CkptavgError, match=msg) as e:
        read_header(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("five")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_reader_serves_views_tied_and_bf16_like_torch(tmp_path, legacy):
    from ckptavg.io.torchfile import TorchFile

    a = torch.randn(6, 5)
    sd = {"a": a, "tied": a, "col": a[:, 1], "bf": torch.randn(9).to(torch.bfloat16),
          "mask": torch.tril(torch.ones(4, 4, dtype=torch.bool)), "n": torch.arange(7)}
    p = tmp_path / "m.bin"
    torch.save({"model": sd, "optimizer": {"lr": 1.0}}, p, _use_new_zipfile_serialization=not legacy)
    f = TorchFile(p)
    if not legacy:  # everything, views included, is read from the file with pread: no mapping is kept
        assert set(f._where) == set(sd) and f._sd is None
    for k, v in sd.items():
        info = f.tensors[k]
        assert info.shape == tuple(v.shape)
        ref = v.reshape(-1).contiguous()
        ref = ref.view(torch.int16) if v.dtype == torch.bfloat16 else ref.view(torch.uint8) if v.dtype == torch.bool else ref
        assert np.array_equal(f.read(info, 1, info.numel - 2), ref.numpy()[1:-1].view(info.dtype.storage)), k
    f.close()


def test_torch_reader_refuses_code_execution(tmp_path):
    import os
    import pickle

    from ckptavg.io.torchfile import TorchFile

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "x": Evil()}, p)
    with pytest.raises(CkptavgError, match="refused to load"):
        TorchFile(p)
    assert not marker.exists()
    p2 = tmp_path / "evil2.pt"
    p2.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CkptavgError, match=str(p2)):
        TorchFile(p2)
    assert not marker.exists()
