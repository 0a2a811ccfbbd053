"""Cell files: HDF5 / .npy reading and writing, errors, atomic writes, block reads, .vti."""
import base64
import os
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest

import microstructures.io as cell_io
from microstructures import Cell, CellError, default_cell, read_cell, read_header, read_phases_block, write_cell
from microstructures.vti import write_vti


def two_phase(n=(5, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    return Cell(rng.integers(0, 2, size=n).astype(np.uint8), E=[0.0, 2.0], nu=[0.3, 0.25],
                size=(1.0, 2.0, 0.5), name="demo", generator="test", params={"a": 1, "b": [1.5, 2.5]})


def write_raw(path, phases=None, E=(0.0, 1.0), nu=(0.3, 0.3), attrs=None):
    """A cell file written by hand, bypassing write_cell's validation."""
    with h5py.File(path, "w") as f:
        if phases is not None:
            f["phases"] = phases
        if E is not None:
            f["materials/E"] = np.asarray(E, dtype=np.float64)
        if nu is not None:
            f["materials/nu"] = np.asarray(nu, dtype=np.float64)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path


def test_round_trip(tmp_path):
    cell = two_phase()
    path = tmp_path / "cell.h5"
    write_cell(cell, path)
    back = read_cell(path)
    np.testing.assert_array_equal(back.phases, cell.phases)
    assert back.phases.dtype == np.uint8
    np.testing.assert_array_equal(back.E, cell.E)
    np.testing.assert_array_equal(back.nu, cell.nu)
    assert back.size == cell.size and back.name == "demo" and back.generator == "test"
    assert back.params == {"a": 1, "b": [1.5, 2.5]}
    with h5py.File(path, "r") as f:  # the schema of docs/DESIGN.md section 4
        assert f["phases"].dtype == np.uint8 and f["materials/E"].dtype == np.float64
        assert f.attrs["size"].dtype == np.float64 and f.attrs["size"].shape == (3,)
        assert isinstance(f.attrs["params"], str)
    head = read_header(path)
    assert head["shape"] == (5, 4, 3) and head["name"] == "demo" and list(head["E"]) == [0.0, 2.0]


def test_round_trip_generated_cell_and_many_phases(tmp_path):
    cell = default_cell()
    write_cell(cell, tmp_path / "g.h5")
    back = read_cell(tmp_path / "g.h5")
    np.testing.assert_array_equal(back.phases, cell.phases)
    assert back.params == cell.params and back.generator == "tpms"
    many = Cell(np.arange(300, dtype=np.uint16).reshape(10, 10, 3), E=np.linspace(1, 2, 300), nu=np.full(300, 0.3))
    write_cell(many, tmp_path / "m.h5", compression="gzip")
    back = read_cell(tmp_path / "m.h5")
    assert back.phases.dtype == np.uint16
    np.testing.assert_array_equal(back.phases, many.phases)


def test_materials_override(tmp_path):
    write_cell(two_phase(), tmp_path / "c.h5")
    back = read_cell(tmp_path / "c.h5", E=[0.0, 7.0], nu=[0.2, 0.2])
    assert list(back.E) == [0.0, 7.0]


def test_npy_needs_materials(tmp_path):
    path = tmp_path / "scan.npy"
    phases = two_phase().phases
    np.save(path, phases.astype(np.int32))
    cell = read_cell(path, E=[0.0, 1.0], nu=[0.3, 0.3])
    np.testing.assert_array_equal(cell.phases, phases)
    assert cell.phases.dtype == np.uint8 and cell.name == "scan"
    with pytest.raises(CellError, match="a .npy file holds only phase ids: give the materials"):
        read_cell(path)


def _bad_inputs(tmp):
    """(description, path or callable writing it, expected message fragment, read kwargs)."""
    p = lambda name: os.path.join(tmp, name)  # noqa: E731
    ok = np.zeros((4, 4, 4), np.uint8)
    ok[1] = 1
    truncated = p("truncated.h5")
    write_cell(default_cell(), truncated)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    text = p("notes.h5")
    with open(text, "w") as f:
        f.write("not hdf5\n")
    np.save(p("floats.npy"), np.zeros((2, 2, 2)))
    with open(p("garbage.npy"), "w") as f:
        f.write("garbage")
    with open(p("zip.npy"), "wb") as f:                  # np.savez's archive under a .npy name
        np.savez(f, phases=ok)
    np.save(p("objects.npy"), np.array([[[None]]], dtype=object), allow_pickle=True)
    string_E = write_raw(p("strE.h5"), ok, E=None)
    with h5py.File(string_E, "a") as f:
        f["materials/E"] = np.array([b"0", b"x"])
    return [
        ("missing file", p("nothere.h5"), "no such file", {}),
        ("unreadable", truncated, "cannot read", {}),
        ("not HDF5", text, "not an HDF5 file", {}),
        ("not .npy", p("garbage.npy"), "not a .npy array file", {"E": [1], "nu": [0.3]}),
        ("directory", tmp, "is a directory", {}),
        ("no /phases", write_raw(p("nophases.h5")), "no /phases dataset", {}),
        ("2-D phases", write_raw(p("flat.h5"), np.zeros((4, 4), np.uint8)), "must be 3-D", {}),
        ("empty phases", write_raw(p("empty.h5"), np.zeros((0, 4, 4), np.uint8)), "is empty", {}),
        ("float phases", write_raw(p("float.h5"), ok.astype(np.float32)), "phase ids must be integers", {}),
        ("float npy", p("floats.npy"), "phase ids must be integers", {"E": [1], "nu": [0.3]}),
        ("negative ids", write_raw(p("neg.h5"), ok.astype(np.int8) - 1), "must be >= 0", {}),
        ("no materials", write_raw(p("nomat.h5"), ok, E=None, nu=None), "no /materials/E", {}),
        ("length mismatch", write_raw(p("mism.h5"), ok, E=(0, 1), nu=(0.3,)),
         "has 2 values but materials/nu has 1", {}),
        ("phase without material", write_raw(p("nomat2.h5"), ok * 2), "phase id 2 has no material", {}),
        ("negative E", write_raw(p("negE.h5"), ok, E=(1.0, -1.0)), "phase 1: E = -1", {}),
        ("nu too large", write_raw(p("nu.h5"), ok, nu=(0.3, 0.5)), "phase 1: nu = 0.5 must lie in (-1, 0.5)", {}),
        ("nu too small", write_raw(p("nu2.h5"), ok, nu=(-1.0, 0.3)), "phase 0: nu = -1", {}),
        ("NaN material", write_raw(p("nan.h5"), ok, E=(np.nan, 1.0)), "NaN or inf", {}),
        ("inf material", write_raw(p("inf.h5"), ok, nu=(0.3, np.inf)), "NaN or inf", {}),
        ("all void", write_raw(p("void.h5"), ok, E=(0.0, 0.0)), "all void", {}),
        ("bad size attr", write_raw(p("size.h5"), ok, attrs={"size": [1.0, 2.0]}), "size must have 3 entries", {}),
        ("text size attr", write_raw(p("size2.h5"), ok, attrs={"size": "1 1 1"}), "attribute size must be numbers", {}),
        ("text E", string_E, "/materials/E must be numbers", {}),
        (".npz named .npy", p("zip.npy"), "an .npz archive, not a .npy array", {"E": [0, 1], "nu": [0.3, 0.3]}),
        ("object .npy", p("objects.npy"), "not a .npy array file", {"E": [1], "nu": [0.3]}),
        ("E without nu", write_raw(p("c.h5"), ok), "give both E and nu", {"E": [0, 1]}),
    ]


def test_each_bad_input_gives_one_line_cell_error(tmp_path):
    for what, path, fragment, kw in _bad_inputs(str(tmp_path)):
        with pytest.raises(CellError) as info:
            read_cell(path, **kw)
        msg = str(info.value)
        assert fragment in msg, f"{what}: {msg!r}"
        assert "\n" not in msg, f"{what}: message is not one line"


def test_each_bad_input_fails_the_same_in_the_block_reader_and_header(tmp_path):
    """hpc.parallel reads cells through read_header / read_npy_header / read_phases_block:
    an unusable file raises nothing there but a one-line CellError (never ValueError or
    AttributeError); what they pass (e.g. negative ids) is validated after the read."""
    from microstructures.io import read_npy_header
    refused = 0
    for what, path, fragment, kw in _bad_inputs(str(tmp_path)):
        try:
            if str(path).endswith(".npy"):
                read_npy_header(path)
            else:
                read_header(path)
                read_phases_block(path, (0, 0, 0), (1, 1, 1))
        except CellError as e:
            assert "\n" not in str(e), what
            refused += 1
    assert refused >= 14


@pytest.mark.parametrize("suffix", [".h5", ".npy"])
def test_a_boolean_mask_is_read_as_phases_0_and_1(tmp_path, suffix):
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3] = True
    path = tmp_path / f"mask{suffix}"
    if suffix == ".npy":
        np.save(path, mask)
        cell = read_cell(path, E=[0, 1], nu=[0.3, 0.3])
    else:
        cell = read_cell(write_raw(path, mask))
    assert cell.phases.dtype == np.uint8 and np.array_equal(cell.phases, mask.astype(np.uint8))
    assert cell.volume_fraction == mask.mean()
    from microstructures.io import read_phases_block
    block = read_phases_block(path, (-1, 0, 0), (2, 5, 6))
    assert block.dtype == np.uint8 and np.array_equal(block, np.roll(mask, 1, axis=0)[:3].astype(np.uint8))


def test_bad_params_attribute_is_tolerated(tmp_path):
    ok = np.ones((2, 2, 2), np.uint8)
    cell = read_cell(write_raw(tmp_path / "p.h5", ok, attrs={"params": "{not json", "name": b"bytes name"}))
    assert cell.params == {"text": "{not json"} and cell.name == "bytes name"


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "cell.h5"
    write_cell(two_phase(seed=1), path)
    before = path.read_bytes()

    def broken(f, cell, params_json, compression):
        f.create_dataset("phases", data=cell.phases)
        raise OSError("disk full")

    monkeypatch.setattr(cell_io, "_write_contents", broken)
    with pytest.raises(CellError, match="cannot write .*disk full"):
        write_cell(two_phase(seed=2), path)
    with pytest.raises(CellError):
        write_cell(two_phase(seed=2), tmp_path / "new.h5")
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["cell.h5"]  # no temporary left, no new file


def test_write_refuses_invalid_cells_and_missing_directories(tmp_path):
    bad = Cell(np.zeros((2, 2, 2), np.uint8), E=[0.0], nu=[0.3])
    with pytest.raises(CellError, match="all void"):
        write_cell(bad, tmp_path / "bad.h5")
    with pytest.raises(CellError, match="does not exist"):
        write_cell(two_phase(), tmp_path / "no" / "dir.h5")
    with pytest.raises(CellError, match="not JSON serializable"):
        write_cell(Cell(np.zeros((2, 2, 2), np.uint8), E=[1.0], nu=[0.3], params={"f": object()}), tmp_path / "j.h5")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix", [".h5", ".npy"])
def test_block_read_equals_periodic_slice(tmp_path, suffix):
    cell = two_phase(n=(6, 5, 4))
    path = tmp_path / f"cell{suffix}"
    if suffix == ".h5":
        write_cell(cell, path)
    else:
        np.save(path, cell.phases)
    full = cell.phases
    wrapped = np.pad(full, [(n, n) for n in full.shape], mode="wrap")  # index i -> wrapped[i + n]
    cases = [((0, 0, 0), (6, 5, 4)), ((2, 1, 0), (4, 5, 3)), ((-1, -1, -1), (7, 6, 5)),
             ((-1, 0, 2), (3, 5, 5)), ((5, 4, 3), (8, 7, 6)), ((-6, -5, -4), (12, 10, 8)), ((3, 3, 3), (3, 4, 4))]
    for start, stop in cases:
        block = read_phases_block(path, start, stop)
        ref = wrapped[tuple(slice(a + n, b + n) for a, b, n in zip(start, stop, full.shape))]
        np.testing.assert_array_equal(block, ref, err_msg=f"{start} -> {stop}")
        assert block.dtype == full.dtype
    with pytest.raises(CellError, match="before start"):
        read_phases_block(path, (2, 0, 0), (1, 5, 4))


def test_block_read_errors(tmp_path):
    with pytest.raises(CellError, match="no such file"):
        read_phases_block(tmp_path / "x.h5", (0, 0, 0), (1, 1, 1))
    with pytest.raises(CellError, match="no /phases"):
        read_phases_block(write_raw(tmp_path / "e.h5"), (0, 0, 0), (1, 1, 1))


def _decode(array_el, dtype):
    raw = base64.b64decode(array_el.text.strip())
    nbytes = int(np.frombuffer(raw[:8], "<u8")[0])
    assert nbytes == len(raw) - 8
    return np.frombuffer(raw[8:], dtype)


@pytest.mark.parametrize("binary", [True, False])
def test_vti_holds_the_phases_in_vtk_order(tmp_path, binary):
    cell = two_phase(n=(5, 4, 3))
    write_vti(cell, tmp_path / "c.vti", binary=binary)
    root = ET.parse(tmp_path / "c.vti").getroot()
    img = root.find("ImageData")
    assert root.get("type") == "ImageData" and img.get("WholeExtent") == "0 5 0 4 0 3"
    np.testing.assert_allclose([float(v) for v in img.get("Spacing").split()], [0.2, 0.5, 1 / 6])
    arrays = {a.get("Name"): a for a in img.iter("DataArray")}
    ph, E = arrays["phase"], arrays["E"]
    assert ph.get("type") == "UInt8"
    if binary:
        phase_values, E_values = _decode(ph, "<u1"), _decode(E, "<f4")
    else:
        phase_values = np.array(ph.text.split(), dtype=np.uint8)
        E_values = np.array(E.text.split(), dtype=np.float32)
    np.testing.assert_array_equal(phase_values, cell.phases.ravel(order="F"))  # x fastest
    np.testing.assert_array_equal(E_values, cell.E[cell.phases].ravel(order="F"))
    assert sorted(os.listdir(tmp_path)) == ["c.vti"]
