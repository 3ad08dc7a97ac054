"""Property-based fuzzing of the safetensors header validation and the step-name parser.

Example counts are bounded so CI stays fast; derandomized so a failure reproduces.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptavg.errors import CkptavgError
from ckptavg.io.dtypes import DTYPES
from ckptavg.io.safetensors import read_header
from ckptavg.local import parse_step

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

dtype_names = st.sampled_from(sorted(DTYPES) + ["F42", "", "f32", "U128"])
shapes = st.lists(st.integers(-2, 6), max_size=3)
entries = st.fixed_dictionaries({
    "dtype": dtype_names,
    "shape": shapes,
    "data_offsets": st.lists(st.integers(-4, 200), min_size=0, max_size=3),
})
headers = st.dictionaries(st.text(min_size=1, max_size=6), entries, max_size=4)


def _file(tmp: Path, header: object, data_len: int, n_delta: int = 0) -> Path:
    raw = json.dumps(header).encode()
    p = tmp / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw) + n_delta) + raw + b"\0" * data_len)
    return p


def _safetensors_accepts(p: Path) -> dict[str, tuple[int, ...]] | None:
    from safetensors import safe_open

    try:
        with safe_open(p, framework="np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        return None


@FUZZ
@given(header=headers, data_len=st.integers(0, 220), n_delta=st.sampled_from([0, 0, 0, -1, 3, 10**6]))
def test_header_validation_agrees_with_safetensors(tmp_path, header, data_len, n_delta):
    p = _file(tmp_path, header, data_len, n_delta)
    try:
        tensors, _ = read_header(p)
    except CkptavgError as e:
        assert str(p) in str(e) and "\n" not in str(e)
        ours = None
    else:
        # what we accept is laid out contiguously over exactly the data section
        pos = 8 + struct.unpack("<Q", p.read_bytes()[:8])[0]
        for t in sorted(tensors.values(), key=lambda t: t.offset):
            assert t.offset == pos
            pos += t.nbytes
        assert pos == p.stat().st_size
        ours = {k: t.shape for k, t in tensors.items()}
    theirs = _safetensors_accepts(p)
    if ours is not None:
        assert theirs == ours  # never accept what safetensors itself rejects
    if theirs is not None and all(DTYPES.get(e["dtype"]) for e in header.values()):
        assert ours == theirs


@FUZZ
@given(blob=st.binary(max_size=64))
def test_random_bytes_never_crash_the_parser(tmp_path, blob):
    p = tmp_path / "r.safetensors"
    p.write_bytes(blob)
    try:
        read_header(p)
    except CkptavgError:
        pass


@FUZZ
@given(name=st.text(max_size=30))
def test_step_parser_is_total(name):
    step, known = parse_step(name)
    assert step is None or (isinstance(step, int) and step >= 0)
    if step is None:
        assert not known


@FUZZ
@given(prefix=st.sampled_from(["step", "checkpoint", "global_step", "iter", "ckpt", "iteration", "STEP"]),
       sep=st.sampled_from(["", "-", "_"]), num=st.integers(0, 10**12), pad=st.integers(0, 8),
       ext=st.sampled_from(["", ".pt", ".bin", ".safetensors", ".pth", ".ckpt"]),
       tail=st.sampled_from(["", "-tokens419M", "_final"]))
def test_step_parser_reads_conventional_names(prefix, sep, num, pad, ext, tail):
    name = f"{prefix}{sep}{num:0{pad}d}{tail}{ext}"
    assert parse_step(name) == (num, True)


tensor_specs = st.lists(
    st.tuples(st.text(alphabet="abcdefgh.", min_size=1, max_size=5),
              st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)),
    min_size=1, max_size=4, unique_by=lambda t: t[0],
)
mutations = st.sampled_from(["none", "shift", "grow", "shape", "tail", "cut", "swap"])


@FUZZ
@given(specs=tensor_specs, mutation=mutations, amount=st.integers(1, 9))
def test_near_valid_headers_agree_with_safetensors(tmp_path, specs, mutation, amount):
    header, pos = {}, 0
    for name, dt, shape in specs:
        n = DTYPES[dt].itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    data_len = pos
    first = header[specs[0][0]]
    if mutation == "shift":
        first["data_offsets"] = [first["data_offsets"][0] + amount, first["data_offsets"][1] + amount]
    elif mutation == "grow":
        first["data_offsets"][1] += amount
    elif mutation == "shape":
        first["shape"] = first["shape"] + [amount + 1]
    elif mutation == "tail":
        data_len += amount
    elif mutation == "cut":
        data_len = max(0, data_len - amount)
    elif mutation == "swap" and len(specs) > 1:
        second = header[specs[1][0]]
        first["data_offsets"], second["data_offsets"] = second["data_offsets"], first["data_offsets"]
    p = _file(tmp_path, header, data_len)
    try:
        ours = {k: t.shape for k, t in read_header(p)[0].items()}
    except CkptavgError:
        ours = None
    assert ours == _safetensors_accepts(p), (mutation, header, data_len)
    if mutation == "none":
        assert ours is not None
